package rules_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/client/pkg/v3/types"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/raft/v3/raftpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/membership"
	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// upstreamSnapshot is a real member's snapshot stream, message by message, and what its database must not
// show once rewritten.
type upstreamSnapshot struct {
	msgs    []*pb.SnapshotResponse
	secrets []string // member names, URLs, host:ports, IPs and IDs of the cluster
	keys    int      // keys in the key bucket
}

// takeSnapshot starts one embedded member, gives it a learner that never starts, a removed member and an
// active alarm (so that every place a snapshot names members is filled), and takes its snapshot.
func takeSnapshot(t *testing.T) *upstreamSnapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	env := harness.NewTestEnv(t)
	c, err := env.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	m := c.Members[0]
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.ClientURL}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for i := range 50 {
		if _, err := cli.Put(ctx, fmt.Sprintf("snapshot-key-%02d", i), strings.Repeat("v", 1000)); err != nil {
			t.Fatal(err)
		}
	}
	// etcd allows one learner: the removed one goes first.
	removed, err := cli.MemberAddAsLearner(ctx, []string{"http://learner-host.example:2380"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.MemberRemove(ctx, removed.Member.ID); err != nil {
		t.Fatal(err)
	}
	learner, err := cli.MemberAddAsLearner(ctx, []string{"http://10.11.12.13:2380"})
	if err != nil {
		t.Fatal(err)
	}
	maint := pb.NewMaintenanceClient(cli.ActiveConnection())
	if _, err := maint.Alarm(ctx, &pb.AlarmRequest{Action: pb.AlarmRequest_ACTIVATE, MemberID: m.ID, Alarm: pb.AlarmType_NOSPACE}); err != nil {
		t.Fatal(err)
	}
	stream, err := maint.Snapshot(ctx, &pb.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	up := &upstreamSnapshot{keys: 50}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		up.msgs = append(up.msgs, msg)
	}
	for _, u := range []string{m.ClientURL, m.PeerURL} {
		up.secrets = append(up.secrets, u, strings.TrimPrefix(u, "http://"))
	}
	for _, id := range []uint64{m.ID, learner.Member.ID, removed.Member.ID} {
		up.secrets = append(up.secrets, types.ID(id).String(), strconv.FormatUint(id, 10))
	}
	up.secrets = append(up.secrets, m.Name, "10.11.12.13", "learner-host.example")
	// The search must be able to fail: the member's own snapshot shows its name and URLs.
	db := up.blobs()
	for _, s := range []string{m.Name, strings.TrimPrefix(m.PeerURL, "http://"), "10.11.12.13:2380", types.ID(removed.Member.ID).String()} {
		if !bytes.Contains(db, []byte(s)) {
			t.Fatalf("the member's own snapshot does not contain %q: the test searches in vain", s)
		}
	}
	return up
}

func (u *upstreamSnapshot) blobs() []byte {
	var b []byte
	for _, m := range u.msgs {
		b = append(b, m.Blob...)
	}
	return b
}

// grpcFrame frames one message, gzip-compressed (flag 1) when compress is set.
func grpcFrame(t *testing.T, m *pb.SnapshotResponse, compress bool) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	flag := byte(0)
	if compress {
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		_, _ = zw.Write(b)
		_ = zw.Close()
		b, flag = z.Bytes(), 1
	}
	out := append([]byte{flag, 0, 0, 0, 0}, b...)
	binary.BigEndian.PutUint32(out[1:5], uint32(len(b)))
	return out
}

// upstreamBody is a gRPC response body as net/http's HTTP/2 transport delivers it: the trailers appear in
// resp.Trailer when the body ends. err, if set, ends the body instead of EOF.
type upstreamBody struct {
	r       io.Reader
	resp    *http.Response
	trailer http.Header
	err     error
	closed  bool
	closes  int
}

func (b *upstreamBody) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errors.New("read after close")
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		if b.err != nil {
			return n, b.err
		}
		b.resp.Trailer = b.trailer
	}
	return n, err
}

func (b *upstreamBody) Close() error { b.closed = true; b.closes++; return nil }

// snapshotResponse is the upstream's answer to a Snapshot call carrying frames, ending with trailer.
func snapshotResponse(frames []byte, trailer http.Header, err error) (*http.Response, *upstreamBody) {
	req := httptest.NewRequest(http.MethodPost, "/etcdserverpb.Maintenance/Snapshot", nil)
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
	req.Header.Set("Content-Type", rules.GRPCContentType)
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {rules.GRPCContentType}},
		ContentLength: -1, Request: req}
	body := &upstreamBody{r: bytes.NewReader(frames), resp: resp, trailer: trailer, err: err}
	resp.Body = body
	return resp, body
}

func statusOK() http.Header { return http.Header{"Grpc-Status": {"0"}} }

// runSnapshotRule passes resp through the rule as the proxy does and returns the messages the client gets.
func runSnapshotRule(t *testing.T, r *rules.Snapshot, resp *http.Response) ([]*pb.SnapshotResponse, []byte) {
	t.Helper()
	if fn, err := r.Response(resp); err != nil || fn != nil {
		t.Fatalf("Response = %v, %v; want no error and no body claimed", fn, err)
	}
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the rewritten stream: %v", err)
	}
	if err := resp.Body.Close(); err != nil {
		t.Fatal(err)
	}
	var msgs []*pb.SnapshotResponse
	for rest := raw; len(rest) > 0; {
		if len(rest) < 5 || rest[0] != 0 {
			t.Fatalf("bad frame header % x", rest[:min(5, len(rest))])
		}
		n := binary.BigEndian.Uint32(rest[1:5])
		var m pb.SnapshotResponse
		if err := m.Unmarshal(rest[5 : 5+n]); err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, &m)
		rest = rest[5+n:]
	}
	return msgs, raw
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	if left, _ := os.ReadDir(dir); len(left) > 0 {
		t.Errorf("spool directory keeps %d files, want none: %v", len(left), left)
	}
}

// runFailing runs r on resp, which must fail: no message reaches the client, the stream ends with code and a
// message containing text, and the spool directory is left empty. It returns what the client read.
func runFailing(t *testing.T, r *rules.Snapshot, resp *http.Response, code int, text string) []byte {
	t.Helper()
	msgs, raw := runSnapshotRule(t, r, resp)
	if len(msgs) != 0 {
		t.Errorf("%d messages sent, want none", len(msgs))
	}
	assertStatus(t, resp, code, text)
	assertEmptyDir(t, r.SpoolDir)
	return raw
}

func assertStatus(t *testing.T, resp *http.Response, code int, msg string) {
	t.Helper()
	if got := resp.Trailer.Get(rules.GRPCStatusHeader); got != strconv.Itoa(code) {
		t.Errorf("grpc-status %q (%q), want %d", got, resp.Trailer.Get(rules.GRPCMessageHeader), code)
	}
	if got := resp.Trailer.Get(rules.GRPCMessageHeader); !strings.Contains(got, msg) {
		t.Errorf("grpc-message %q, want it to contain %q", got, msg)
	}
}

func TestSnapshotRewrite(t *testing.T) {
	t.Parallel()
	up := takeSnapshot(t)
	self := rules.NewSelf("etcd-proxy-proxy", []string{"https://proxy.example:2379"})
	var frames []byte
	for i, m := range up.msgs {
		frames = append(frames, grpcFrame(t, m, i%2 == 1)...) // every other one compressed
	}
	logs := slog.New(slog.NewTextHandler(io.Discard, nil))

	t.Run("rewritten", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		resp, _ := snapshotResponse(frames, statusOK(), nil)
		msgs, raw := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp)
		assertEmptyDir(t, dir)
		if got := resp.Trailer.Get(rules.GRPCStatusHeader); got != "0" {
			t.Fatalf("grpc-status %q (%q), want 0", got, resp.Trailer.Get(rules.GRPCMessageHeader))
		}
		for _, s := range up.secrets {
			if bytes.Contains(raw, []byte(s)) {
				t.Errorf("the rewritten snapshot contains %q", s)
			}
		}
		// Messages as etcd sends them: 32 KiB blobs, remaining_bytes counting down to 0, then the hash alone.
		var db []byte
		for i, m := range msgs[:len(msgs)-1] {
			if len(m.Blob) == 0 || len(m.Blob) > 32<<10 {
				t.Errorf("message %d: blob of %d bytes", i, len(m.Blob))
			}
			db = append(db, m.Blob...)
		}
		if msgs[0].Header == nil || msgs[0].Header.MemberId != self.ID {
			t.Errorf("first header %v, want member_id %d", msgs[0].Header, self.ID)
		}
		sent := 0
		for i, m := range msgs[:len(msgs)-1] {
			sent += len(m.Blob)
			if m.RemainingBytes != uint64(len(db)-sent) {
				t.Errorf("message %d: remaining_bytes %d, want %d", i, m.RemainingBytes, len(db)-sent)
			}
		}
		last := msgs[len(msgs)-1]
		if sum := sha256.Sum256(db); last.RemainingBytes != 0 || !bytes.Equal(last.Blob, sum[:]) {
			t.Errorf("last message: remaining %d, blob %x; want 0 and the database's SHA-256 %x", last.RemainingBytes, last.Blob, sum)
		}
		if len(db)%512 != 0 {
			t.Errorf("database of %d bytes: etcdutl finds the hash only after a multiple of 512", len(db))
		}
		checkRewrittenDB(t, db, self, up.keys)
		t.Logf("upstream %d bytes in %d messages, rewritten %d bytes in %d", len(up.blobs()), len(up.msgs), len(db)+sha256.Size, len(msgs))
	})

	t.Run("version", func(t *testing.T) {
		t.Parallel()
		// A 3.6 member's first message carries its version (field 4); any other unknown field is dropped.
		version := protowire.AppendString(protowire.AppendTag(nil, 4, protowire.BytesType), "3.6.5")
		other := protowire.AppendString(protowire.AppendTag(nil, 9, protowire.BytesType), "http://10.9.9.9:2380")
		var fr []byte
		for i, m := range up.msgs {
			if i == 0 {
				m = &pb.SnapshotResponse{RemainingBytes: m.RemainingBytes, Blob: m.Blob,
					XXX_unrecognized: append(slices.Clone(other), version...)}
			}
			fr = append(fr, grpcFrame(t, m, false)...)
		}
		resp, _ := snapshotResponse(fr, statusOK(), nil)
		msgs, raw := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: t.TempDir(), Log: logs}, resp)
		if len(msgs) == 0 || !bytes.Equal(msgs[0].XXX_unrecognized, version) {
			t.Errorf("first message's unknown fields %q, want the version alone %q", msgs[0].XXX_unrecognized, version)
		}
		if bytes.Contains(raw, []byte("10.9.9.9")) {
			t.Error("an unknown field of the upstream's message reached the client")
		}
	})

	t.Run("too-large", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		resp, body := snapshotResponse(frames, statusOK(), nil)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, MaxBytes: int64(len(up.blobs()) - 1), Log: logs}, resp, rules.CodeResourceExhausted, "--max-snapshot-bytes")
		// Once, before the status is set: the rules below (GRPCStatus) rewrite trailers when it closes.
		if body.closes != 1 {
			t.Errorf("the upstream's stream was closed %d times, want once", body.closes)
		}
	})

	t.Run("bad-hash", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		var bad []byte
		for i, m := range up.msgs {
			if i == len(up.msgs)/2 {
				m = &pb.SnapshotResponse{RemainingBytes: m.RemainingBytes, Blob: bytes.Clone(m.Blob)}
				m.Blob[len(m.Blob)/2] ^= 1
			}
			bad = append(bad, grpcFrame(t, m, false)...)
		}
		resp, _ := snapshotResponse(bad, statusOK(), nil)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp, rules.CodeDataLoss, "SHA-256")
	})

	t.Run("upstream-error", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		half := grpcFrame(t, up.msgs[0], false)
		trailer := http.Header{"Grpc-Status": {"14"}, "Grpc-Message": {"etcdserver: leader changed"}}
		resp, _ := snapshotResponse(half, trailer, nil)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp, 14, "etcdserver: leader changed")
	})

	t.Run("broken-stream", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		resp, _ := snapshotResponse(frames[:len(frames)/2], nil, io.ErrUnexpectedEOF)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp, rules.CodeUnavailable, "broke off")
	})

	t.Run("no-status", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		resp, _ := snapshotResponse(frames, nil, nil)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp, rules.CodeUnavailable, "broke off")
	})

	t.Run("not-a-database", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		junk := bytes.Repeat([]byte("http://10.0.0.1:2380 "), 4096)
		sum := sha256.Sum256(junk)
		var fr []byte
		fr = append(fr, grpcFrame(t, &pb.SnapshotResponse{RemainingBytes: 0, Blob: junk}, false)...)
		fr = append(fr, grpcFrame(t, &pb.SnapshotResponse{Blob: sum[:]}, false)...)
		resp, _ := snapshotResponse(fr, statusOK(), nil)
		raw := runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, resp, rules.CodeInternal, "could not rewrite")
		if bytes.Contains(raw, []byte("10.0.0.1")) {
			t.Error("the upstream's bytes reached the client")
		}
	})

	t.Run("client-gone", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		resp, body := snapshotResponse(frames, statusOK(), nil)
		r := &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}
		if _, err := r.Response(resp); err != nil {
			t.Fatal(err)
		}
		if _, err := resp.Body.Read(make([]byte, 100)); err != nil {
			t.Fatal(err)
		}
		if left, _ := os.ReadDir(dir); len(left) != 1 {
			t.Errorf("while streaming, the spool directory holds %d files, want the copy alone", len(left))
		}
		_ = resp.Body.Close()
		assertEmptyDir(t, dir)
		if !body.closed {
			t.Error("the upstream's stream is left open")
		}
	})

	t.Run("trailers-only", func(t *testing.T) {
		t.Parallel()
		resp, body := snapshotResponse(nil, nil, nil)
		resp.Header.Set(rules.GRPCStatusHeader, "7")
		if fn, err := (&rules.Snapshot{Self: self}).Response(resp); fn != nil || err != nil || resp.Body != body {
			t.Errorf("an error answer was taken over: %v, %v", fn, err)
		}
	})
}

// checkRewrittenDB opens the database a client received: its membership is self alone, and the data is all there.
func checkRewrittenDB(t *testing.T, db []byte, self rules.Self, keys int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "db")
	if err := os.WriteFile(path, db, 0o600); err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	err = bdb.View(func(tx *bolt.Tx) error {
		var members []membership.Member
		if err := tx.Bucket([]byte("members")).ForEach(func(k, v []byte) error {
			var m membership.Member
			if err := json.Unmarshal(v, &m); err != nil {
				return err
			}
			if string(k) != m.ID.String() {
				t.Errorf("member key %q for ID %s", k, m.ID)
			}
			members = append(members, m)
			return nil
		}); err != nil {
			return err
		}
		if len(members) != 1 || uint64(members[0].ID) != self.ID || members[0].Name != self.Name ||
			len(members[0].PeerURLs) != 0 || !equal(members[0].ClientURLs, self.ClientURLs) {
			t.Errorf("members = %+v, want the proxy alone", members)
		}
		if n := tx.Bucket([]byte("members_removed")).Stats().KeyN; n != 0 {
			t.Errorf("members_removed holds %d IDs, want none", n)
		}
		var cs raftpb.ConfState
		if err := json.Unmarshal(tx.Bucket([]byte("meta")).Get([]byte("confState")), &cs); err != nil {
			return fmt.Errorf("confState: %w", err)
		}
		if len(cs.Voters) != 1 || cs.Voters[0] != self.ID || len(cs.Learners) != 0 {
			t.Errorf("confState = %+v, want the proxy as the one voter", cs)
		}
		var alarms []pb.AlarmMember
		_ = tx.Bucket([]byte("alarm")).ForEach(func(k, _ []byte) error {
			var a pb.AlarmMember
			if err := a.Unmarshal(k); err != nil {
				return err
			}
			alarms = append(alarms, a)
			return nil
		})
		if len(alarms) != 1 || alarms[0].MemberID != self.ID || alarms[0].Alarm != pb.AlarmType_NOSPACE {
			t.Errorf("alarms = %v, want NOSPACE raised by the proxy", alarms)
		}
		// The key bucket holds every revision: 50 puts at least, and each value intact.
		n := 0
		_ = tx.Bucket([]byte("key")).ForEach(func(_, v []byte) error {
			if bytes.Contains(v, []byte("snapshot-key-")) && bytes.Contains(v, bytes.Repeat([]byte("v"), 1000)) {
				n++
			}
			return nil
		})
		if n != keys {
			t.Errorf("the key bucket holds %d of the %d keys put", n, keys)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func equal(a, b []string) bool { return strings.Join(a, "\x00") == strings.Join(b, "\x00") }
