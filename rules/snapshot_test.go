package rules_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

const methodSnapshot = "/etcdserverpb.Maintenance/Snapshot"

// upstreamOf answers a Snapshot call with msgs, then err.
func upstreamOf(msgs []*pb.SnapshotResponse, err error) *rules.TestUpstream {
	up := &rules.TestUpstream{Err: err}
	for _, m := range msgs {
		up.Answers = append(up.Answers, m)
	}
	return up
}

// runSnapshotRule runs r on a Snapshot call as the proxy's core does, against up. It returns the messages the
// client got, their bytes, and how the call ended.
func runSnapshotRule(t *testing.T, r *rules.Snapshot, c *rules.TestCall, up *rules.TestUpstream) ([]*pb.SnapshotResponse, []byte, error) {
	t.Helper()
	if got := r.Claim(c.Method()); got != rules.ClaimMessages {
		t.Fatalf("Claim = %d, want ClaimMessages", got)
	}
	err := rules.ServeChain(r, c, up.Handler(c))
	var msgs []*pb.SnapshotResponse
	for _, m := range c.Answers() {
		msgs = append(msgs, m.(*pb.SnapshotResponse))
	}
	return msgs, bytes.Join(c.Sent, nil), err
}

func snapshotCall(t *testing.T) *rules.TestCall {
	return rules.NewCall(t, methodSnapshot, &pb.SnapshotRequest{})
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	if left, _ := os.ReadDir(dir); len(left) > 0 {
		t.Errorf("spool directory keeps %d files, want none: %v", len(left), left)
	}
}

// runFailing runs r against up, which must fail: no message reaches the client, the call ends with code and a
// message containing text that a proxy-proxy above passes on, and the spool directory is left empty. It returns
// what the client got and the status.
func runFailing(t *testing.T, r *rules.Snapshot, up *rules.TestUpstream, code codes.Code, text string) ([]byte, error) {
	t.Helper()
	msgs, raw, err := runSnapshotRule(t, r, snapshotCall(t), up)
	if len(msgs) != 0 {
		t.Errorf("%d messages sent, want none", len(msgs))
	}
	assertStatus(t, err, code, text)
	assertEmptyDir(t, r.SpoolDir)
	return raw, err
}

func assertStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("error %v, want status %s", err, code)
	}
	if !strings.Contains(st.Message(), msg) {
		t.Errorf("status message %q, want it to contain %q", st.Message(), msg)
	}
	if !rules.KnownGRPCMessage(st.Message()) {
		t.Errorf("status message %q is not known: the core would withhold it", st.Message())
	}
}

func TestSnapshotRewrite(t *testing.T) {
	t.Parallel()
	up := takeSnapshot(t)
	self := rules.NewSelf("etcd-proxy-proxy", []string{"https://proxy.example:2379"})
	logs := slog.New(slog.DiscardHandler)
	// withFirst is the upstream's messages with the first one replaced.
	withFirst := func(f func(m *pb.SnapshotResponse) *pb.SnapshotResponse) []*pb.SnapshotResponse {
		out := slices.Clone(up.msgs)
		out[0] = f(out[0])
		return out
	}

	t.Run("rewritten", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		upstream := upstreamOf(up.msgs, nil)
		msgs, raw, err := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, snapshotCall(t), upstream)
		assertEmptyDir(t, dir)
		if err != nil {
			t.Fatal(err)
		}
		if upstream.Relayed != len(up.msgs) || len(upstream.Got) != 1 {
			t.Errorf("the upstream got %d requests and relayed %d of %d messages", len(upstream.Got), upstream.Relayed, len(up.msgs))
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
		if h := msgs[0].Header; h == nil || h.MemberId != self.ID {
			t.Errorf("first header %v, want member_id %d", h, self.ID)
		}
		for i, m := range msgs[1:] {
			if m.Header != nil {
				t.Errorf("message %d has a header", i+1)
			}
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
		// A 3.6 member's first message carries its header and version (field 4); any other unknown field is dropped,
		// and so is a version field that does not read as a version.
		other := protowire.AppendString(protowire.AppendTag(nil, 9, protowire.BytesType), "http://10.9.9.9:2380")
		header := &pb.ResponseHeader{ClusterId: 7, MemberId: 99, Revision: 9, RaftTerm: 2, XXX_unrecognized: other}
		version := func(v string) []byte {
			return protowire.AppendString(protowire.AppendTag(nil, 4, protowire.BytesType), v)
		}
		for _, tt := range []struct {
			unknown, want []byte
		}{
			{append(slices.Clone(other), version("3.6.5")...), version("3.6.5")},
			{version("3.7.0-rc.1"), version("3.7.0-rc.1")},
			{version("3.6.5 at 10.9.9.9"), nil},
			{version("10.9.9.9:2380"), nil},
			{other, nil},
		} {
			msgs, raw, err := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: t.TempDir(), Log: logs}, snapshotCall(t),
				upstreamOf(withFirst(func(m *pb.SnapshotResponse) *pb.SnapshotResponse {
					return &pb.SnapshotResponse{Header: header, RemainingBytes: m.RemainingBytes, Blob: m.Blob, XXX_unrecognized: tt.unknown}
				}), nil))
			if err != nil {
				t.Fatal(err)
			}
			if h := msgs[0].Header; h == nil || h.ClusterId != 7 || h.MemberId != self.ID || h.Revision != 9 || h.RaftTerm != 2 {
				t.Errorf("first header %v, want the upstream's with our member ID", h)
			}
			if !bytes.Equal(msgs[0].XXX_unrecognized, tt.want) {
				t.Errorf("upstream's unknown fields %q: first message's %q, want %q", tt.unknown, msgs[0].XXX_unrecognized, tt.want)
			}
			for _, m := range msgs[1:] {
				if len(m.XXX_unrecognized) != 0 {
					t.Errorf("a later message has unknown fields %q", m.XXX_unrecognized)
				}
			}
			if bytes.Contains(raw, []byte("10.9.9.9")) {
				t.Error("an unknown field of the upstream's message reached the client")
			}
		}
	})

	t.Run("too-large", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		upstream := upstreamOf(up.msgs, nil)
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, MaxBytes: int64(len(up.blobs()) - 1), Log: logs}, upstream,
			codes.ResourceExhausted, "--max-snapshot-bytes")
		// The first message announces the size: nothing more is read.
		if upstream.Relayed != 0 || upstream.Failed == nil {
			t.Errorf("the upstream relayed %d messages (%v), want the first refused", upstream.Relayed, upstream.Failed)
		}
	})

	t.Run("too-large-understated", func(t *testing.T) {
		t.Parallel()
		// An upstream that announces less than it sends is cut off when what it sent passes the bound.
		dir := t.TempDir()
		var lying []*pb.SnapshotResponse
		for _, m := range up.msgs {
			lying = append(lying, &pb.SnapshotResponse{Header: m.Header, Blob: m.Blob})
		}
		upstream := upstreamOf(lying, nil)
		limit := len(up.blobs()) / 2
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: dir, MaxBytes: int64(limit), Log: logs}, upstream,
			codes.ResourceExhausted, "--max-snapshot-bytes")
		if upstream.Relayed >= len(up.msgs)-1 || upstream.Failed == nil {
			t.Errorf("the upstream relayed %d of %d messages, want it cut off past %d bytes", upstream.Relayed, len(up.msgs), limit)
		}
	})

	t.Run("bad-hash", func(t *testing.T) {
		t.Parallel()
		bad := slices.Clone(up.msgs)
		i := len(bad) / 2
		bad[i] = &pb.SnapshotResponse{RemainingBytes: bad[i].RemainingBytes, Blob: bytes.Clone(bad[i].Blob)}
		bad[i].Blob[len(bad[i].Blob)/2] ^= 1
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: t.TempDir(), Log: logs}, upstreamOf(bad, nil), codes.DataLoss, "SHA-256")
	})

	t.Run("cut-short", func(t *testing.T) {
		t.Parallel()
		// The stream ends with OK before the hash: what came cannot be checked.
		runFailing(t, &rules.Snapshot{Self: self, SpoolDir: t.TempDir(), Log: logs}, upstreamOf(up.msgs[:len(up.msgs)/2], nil),
			codes.DataLoss, "SHA-256")
	})

	// The upstream's status reaches the client as it is (the core scrubs its message), whenever it comes.
	for name, tt := range map[string]struct {
		msgs []*pb.SnapshotResponse
		err  error
	}{
		"upstream-error":  {up.msgs[:1], status.Error(codes.Unavailable, "etcdserver: leader changed")},
		"trailers-only":   {nil, status.Error(codes.PermissionDenied, "etcdserver: permission denied")},
		"broken-stream":   {up.msgs[:len(up.msgs)/2], status.Error(codes.Unavailable, "transport is closing")},
		"not-a-status":    {up.msgs[:2], io.ErrUnexpectedEOF},
		"after-the-whole": {up.msgs, status.Error(codes.Internal, "server closed the stream without sending trailers")},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			msgs, _, err := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, snapshotCall(t), upstreamOf(tt.msgs, tt.err))
			if !errors.Is(err, tt.err) {
				t.Errorf("error %v, want the upstream's %v", err, tt.err)
			}
			if len(msgs) != 0 {
				t.Errorf("%d messages sent, want none", len(msgs))
			}
			assertEmptyDir(t, dir)
		})
	}

	t.Run("not-a-database", func(t *testing.T) {
		t.Parallel()
		junk := bytes.Repeat([]byte("http://10.0.0.1:2380 "), 4096)
		sum := sha256.Sum256(junk)
		raw, _ := runFailing(t, &rules.Snapshot{Self: self, SpoolDir: t.TempDir(), Log: logs},
			upstreamOf([]*pb.SnapshotResponse{{Blob: junk}, {Blob: sum[:]}}, nil), codes.Internal, "could not rewrite")
		if bytes.Contains(raw, []byte("10.0.0.1")) {
			t.Error("the upstream's bytes reached the client")
		}
	})

	t.Run("malformed", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		c := snapshotCall(t)
		err := rules.ServeChain(&rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, c, func(s rules.Stream) error {
			if _, err := s.RecvMsg(); err != nil {
				return err
			}
			return s.SendMsg(&pb.StatusResponse{})
		})
		assertStatus(t, err, codes.Internal, "malformed")
		assertEmptyDir(t, dir)
	})

	t.Run("no-spool", func(t *testing.T) {
		t.Parallel()
		upstream := upstreamOf(up.msgs, nil)
		_, _, err := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: filepath.Join(t.TempDir(), "missing"), Log: logs},
			snapshotCall(t), upstream)
		assertStatus(t, err, codes.Internal, "could not spool")
		if upstream.Called {
			t.Error("the call went upstream though nothing could be spooled")
		}
	})

	t.Run("client-gone", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		c := snapshotCall(t)
		gone := status.Error(codes.Canceled, "context canceled")
		c.SendHook = func(n int) error {
			if n == 0 {
				if left, _ := os.ReadDir(dir); len(left) != 1 {
					t.Errorf("while sending, the spool directory holds %d files, want the copy alone", len(left))
				}
				return nil
			}
			return gone
		}
		msgs, _, err := runSnapshotRule(t, &rules.Snapshot{Self: self, SpoolDir: dir, Log: logs}, c, upstreamOf(up.msgs, nil))
		if !errors.Is(err, gone) || len(msgs) != 1 {
			t.Errorf("error %v after %d messages, want %v after one", err, len(msgs), gone)
		}
		assertEmptyDir(t, dir)
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
