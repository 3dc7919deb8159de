package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/types"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestSnapshot: a v3 snapshot taken through the proxy — `etcdctl snapshot save` over gRPC, and the JSON
// gateway's /v3/maintenance/snapshot — carries no member name, URL, host:port or ID of anything below the top
// (contract rule 7), and is still a snapshot etcd's tools accept: `snapshot status` reads it and `snapshot
// restore` checks its SHA-256 and restores it. The top proxy spools into a directory of the test, which must be
// empty afterwards; on pp-members it is --readonly, which lets snapshots through.
func TestSnapshot(t *testing.T) {
	t.Parallel()
	top := func(readonly bool, spool *string) harness.Hop {
		return harness.ProxyProxyHop{Configure: func(c *proxy.Config) {
			c.ReadOnly, c.SnapshotSpoolDir = readonly, *spool
		}}
	}
	for _, tc := range []struct {
		name string
		hops func(top harness.Hop) []harness.Hop
	}{
		{"pp-members", func(top harness.Hop) []harness.Hop { return []harness.Hop{top} }},
		{"pp-pp-members", func(top harness.Hop) []harness.Hop { return []harness.Hop{pp(false), top} }},
		{"pp-grpc-proxy", func(top harness.Hop) []harness.Hop {
			return []harness.Hop{harness.GRPCProxyHop{Advertise: false}, top}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := testContext(t, 2*time.Minute)
			spool := t.TempDir()
			s := start(t, ctx, topology{tc.name, func(bool) []harness.Hop {
				return tc.hops(top(tc.name == "pp-members", &spool))
			}}, false)
			members := s.env.Etcdctl(3, s.run.Layers[0])
			members.Endpoint.URLs = members.Endpoint.URLs[:1] // a snapshot is taken from one member
			if err := members.Run(ctx, "put", "snapshot-test-key", "snapshot-test-value").Check(); err != nil {
				t.Fatal(err)
			}
			secrets := snapshotSecrets(s.run)

			// The search can fail: the members' own snapshot names them.
			own := filepath.Join(s.env.Dir, "members.db")
			if err := members.Run(ctx, "snapshot", "save", own).Check(); err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(own); err != nil {
				t.Fatal(err)
			} else if hits := secrets.find(b); len(hits) == 0 {
				t.Fatal("the members' own snapshot names nothing of the cluster: the search below proves nothing")
			}

			ctl := s.env.Etcdctl(3, s.top)
			path := filepath.Join(s.env.Dir, "proxy.db")
			if err := ctl.Run(ctx, "snapshot", "save", path).Check(); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if hits := secrets.find(b); len(hits) > 0 {
				t.Errorf("the snapshot taken through the proxy (%d bytes) names %q", len(b), hits)
			}
			checkSnapshotFile(t, b)
			if !bytes.Contains(b, []byte("snapshot-test-value")) {
				t.Error("the snapshot lost the data: snapshot-test-value is not in it")
			}
			// etcd's own tools accept it.
			st := ctl.Run(ctx, "snapshot", "status", path, "-w", "json")
			var status struct{ Revision, TotalKey int64 }
			if err := st.Check(); err != nil || json.Unmarshal([]byte(st.Stdout), &status) != nil || status.Revision < 2 || status.TotalKey < 1 {
				t.Errorf("snapshot status: %v %q: want a revision and keys", err, st.Stdout)
			}
			restored := filepath.Join(s.env.Dir, "restored")
			if res := ctl.Run(ctx, "snapshot", "restore", path, "--data-dir", restored); res.Check() != nil {
				t.Errorf("snapshot restore (hash check on): %v", res.Check())
			}
			assertNoSpool(t, spool)

			t.Run("gateway", func(t *testing.T) {
				blobs, raw := gatewaySnapshot(t, ctx, s.top)
				if hits := secrets.find(raw); len(hits) > 0 {
					t.Errorf("the gateway's snapshot response names %q", hits)
				}
				if hits := secrets.find(blobs); len(hits) > 0 {
					t.Errorf("the gateway's snapshot (%d bytes) names %q", len(blobs), hits)
				}
				checkSnapshotFile(t, blobs)
				assertNoSpool(t, spool)
			})
			if tc.name == "pp-members" {
				t.Run("too-large", func(t *testing.T) { testSnapshotTooLarge(t, ctx, s) })
			}
			t.Logf("snapshot through %s: %d bytes (the members' own: %s)", tc.name, len(b), fileSize(own))
		})
	}
}

// testSnapshotTooLarge: a snapshot over --max-snapshot-bytes ends with ResourceExhausted and a message that
// names the flag, no file is saved and nothing stays in the spool directory.
func testSnapshotTooLarge(t *testing.T, ctx context.Context, s *started) {
	spool := t.TempDir()
	small, err := s.env.StartProxyProxy(ctx, s.run.Layers[0], harness.ProxyProxyHop{Configure: func(c *proxy.Config) {
		c.SnapshotSpoolDir, c.MaxSnapshotBytes = spool, 4096
	}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "small.db")
	res := s.env.Etcdctl(3, small.Endpoint).Run(ctx, "snapshot", "save", path)
	if res.Exit == 0 || !strings.Contains(res.Stderr, "ResourceExhausted") || !strings.Contains(res.Stderr, "--max-snapshot-bytes") {
		t.Errorf("snapshot over --max-snapshot-bytes: exit %d, stderr %q; want ResourceExhausted naming the flag", res.Exit, res.Stderr)
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("a snapshot over the bound was saved")
	}
	assertNoSpool(t, spool)
}

// snapshotNeedles is what a snapshot through the top must not contain.
type snapshotNeedles struct {
	leaks *leakSet
	words []string
}

// snapshotSecrets: the URLs and host:ports of every layer below the top and of the members' peers (leakSet),
// the members' names and their IDs as etcd writes them (hex keys of the members bucket, decimal in JSON).
func snapshotSecrets(r *harness.Running) *snapshotNeedles {
	n := &snapshotNeedles{leaks: newLeakSet(r)}
	for _, m := range r.Cluster.Members {
		n.words = append(n.words, m.Name, types.ID(m.ID).String(), strconv.FormatUint(m.ID, 10))
	}
	return n
}

func (n *snapshotNeedles) find(b []byte) []string {
	hits, _ := n.leaks.find(string(b))
	for _, w := range n.words {
		if bytes.Contains(b, []byte(w)) {
			hits = append(hits, w)
		}
	}
	return hits
}

// checkSnapshotFile: the database and its SHA-256, where etcdutl looks for it (after a multiple of 512 bytes).
func checkSnapshotFile(t *testing.T, b []byte) {
	t.Helper()
	if len(b)%512 != sha256.Size {
		t.Fatalf("snapshot of %d bytes: no trailing SHA-256 after a multiple of 512", len(b))
	}
	db, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if want := sha256.Sum256(db); !bytes.Equal(sum, want[:]) {
		t.Errorf("trailing hash %x, want the database's SHA-256 %x", sum, want)
	}
}

func assertNoSpool(t *testing.T, dir string) {
	t.Helper()
	if left, _ := os.ReadDir(dir); len(left) > 0 {
		t.Errorf("the spool directory keeps %d files after the snapshot", len(left))
	}
}

// gatewaySnapshot POSTs /v3/maintenance/snapshot and returns the decoded blobs and the raw response.
func gatewaySnapshot(t *testing.T, ctx context.Context, ep harness.Endpoint) (blobs, raw []byte) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ep.URLs[0]+"/v3/maintenance/snapshot", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpClient(t, ep).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var dump bytes.Buffer
	_ = resp.Header.Write(&dump)
	raw = append(dump.Bytes(), raw...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("gateway snapshot: %s\n%.500s", resp.Status, raw)
	}
	sc := bufio.NewScanner(bytes.NewReader(raw[dump.Len():]))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var msg struct {
			Result *struct {
				Blob []byte `json:"blob"`
			} `json:"result"`
			Error json.RawMessage `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &msg); err != nil || msg.Result == nil {
			t.Fatalf("gateway snapshot: message %.200q (%v)", sc.Text(), err)
		}
		blobs = append(blobs, msg.Result.Blob...)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return blobs, raw
}

func fileSize(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Sprint(err)
	}
	return fmt.Sprint(fi.Size())
}
