package rules

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"regexp"
	"runtime/debug"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// DefaultMaxSnapshotBytes bounds a snapshot spooled from the upstream: etcd's largest recommended
// --quota-backend-bytes (8 GiB), so that the proxy refuses no database its members may hold.
const DefaultMaxSnapshotBytes = 8 << 30

const methodSnapshot = "/etcdserverpb.Maintenance/Snapshot"

// Client messages of the Snapshot rule; the details go to the log.
const (
	msgSnapshotTooLarge  = "etcd-proxy-proxy: snapshot larger than --max-snapshot-bytes"
	msgSnapshotHash      = "etcd-proxy-proxy: the upstream's snapshot failed its SHA-256 check"
	msgSnapshotBroken    = "etcd-proxy-proxy: the snapshot stream from the upstream broke off"
	msgSnapshotMalformed = "etcd-proxy-proxy: malformed snapshot stream from the upstream"
	msgSnapshotRewrite   = "etcd-proxy-proxy: could not rewrite the snapshot's membership"
	msgSnapshotSpool     = "etcd-proxy-proxy: could not spool the snapshot"
)

// Snapshot hides the membership inside v3 snapshots (Maintenance.Snapshot, and the JSON gateway's
// /v3/maintenance/snapshot, which the proxy serves through the same gRPC path). A snapshot is the member's bbolt
// database followed by its SHA-256, and the database's members bucket holds every member's name, peer and client
// URLs. The rule spools the upstream's stream to a file, checks its SHA-256, rewrites the membership to Self
// alone (members: Self; members_removed: empty; meta/confState and alarms: Self's ID), copies the database into
// a fresh file with bbolt's compaction (an edit in place would leave the old member records in freed pages),
// and streams that with a new SHA-256, in 32 KiB messages as etcd sends them. `etcdutl snapshot restore`
// replaces the membership anyway; `etcdctl snapshot status` and the hash check accept the copy.
//
// The client receives nothing until the whole snapshot has been spooled and copied. Failures end the stream
// with a gRPC status: ResourceExhausted over MaxBytes, DataLoss when the upstream's hash does not match, the
// upstream's own status when it failed. Spooled files are removed when the response ends, whichever way.
type Snapshot struct {
	Passthrough
	// Self is the one member the snapshot's membership names.
	Self Self
	// SpoolDir holds the spooled and copied databases; empty means os.TempDir().
	SpoolDir string
	// MaxBytes bounds the snapshot received from the upstream (database and hash); the copy needs at most as
	// much again. Zero means DefaultMaxSnapshotBytes.
	MaxBytes int64
	// Log receives why a snapshot failed (the client gets a fixed message); nil means slog.Default().
	Log *slog.Logger
}

// snapshotRule is the Snapshot rule of the default chain.
func snapshotRule(o Options) *Snapshot {
	return &Snapshot{Self: o.Self, SpoolDir: o.SnapshotSpoolDir, MaxBytes: o.MaxSnapshotBytes, Log: o.Log}
}

// Name implements Rule.
func (*Snapshot) Name() string { return "snapshot" }

// Claim implements MessageRule: the messages of Maintenance.Snapshot.
func (s *Snapshot) Claim(m *Method) Claim {
	if m.Name == methodSnapshot {
		return ClaimMessages
	}
	return ClaimNone
}

// Serve implements MessageRule: it spools the upstream's stream, checks and rewrites it, and sends the copy.
// An upstream that ends the stream with an error status passes it on as it is.
func (s *Snapshot) Serve(st Stream, next Handler) error {
	w := &snapshotCall{rule: s}
	defer w.release()
	if err := w.startSpool(); err != nil {
		return w.fail(err)
	}
	err := next(&StreamFuncs{Stream: st, Send: func(m any) error {
		msg, ok := m.(*pb.SnapshotResponse)
		if !ok {
			return &snapshotError{codes.Internal, msgSnapshotMalformed, fmt.Errorf("a %T", m)}
		}
		return w.add(msg)
	}})
	var se *snapshotError
	switch {
	case errors.As(err, &se):
		return w.fail(se)
	case err != nil:
		return err // the upstream's status, or the client went away
	}
	if err := w.prepare(); err != nil {
		return w.fail(err)
	}
	for !w.done {
		msg, err := w.next()
		if err != nil {
			return w.fail(&snapshotError{codes.Internal, msgSnapshotRewrite, err})
		}
		if err := st.SendMsg(msg); err != nil {
			return err
		}
	}
	return nil
}

// snapshotChunk is the blob size of each message sent, as etcd's snapshotSendBufferSize.
const snapshotChunk = 32 << 10

// snapshotTxMaxSize is how much the compaction copies per bbolt transaction: it bounds the copy's memory.
const snapshotTxMaxSize = 8 << 20

// snapshotCall is one snapshot on its way: the spool of the upstream's blobs, then the rewritten copy.
type snapshotCall struct {
	rule *Snapshot

	// Spooling.
	spool   *os.File
	w       *bufio.Writer
	tail    *tailHasher
	total   int64
	started bool

	// The upstream's first message: its header and version go on our first one.
	header  *pb.ResponseHeader
	version string

	files     []string // temporary files, removed by release
	db        *os.File // the rewritten database
	remaining int64    // its bytes not yet sent
	sent      bool     // the first message went out
	done      bool     // the last message went out
	sum       hash.Hash
	blob      []byte
}

// snapshotError ends the stream with a gRPC status; err is for the log.
type snapshotError struct {
	code codes.Code
	msg  string
	err  error
}

func (e *snapshotError) Error() string { return e.msg + ": " + e.err.Error() }

// fail logs why the snapshot failed and returns the status the client gets.
func (w *snapshotCall) fail(err error) error {
	var se *snapshotError
	if !errors.As(err, &se) {
		se = &snapshotError{codes.Internal, msgSnapshotRewrite, err}
	}
	log := w.rule.Log
	if log == nil {
		log = slog.Default()
	}
	log.Warn("snapshot failed", "code", se.code, "err", se)
	return status.Error(se.code, se.msg)
}

// release closes and removes the temporary files.
func (w *snapshotCall) release() {
	for _, f := range []*os.File{w.spool, w.db} {
		if f != nil {
			_ = f.Close()
		}
	}
	for _, f := range w.files {
		_ = os.Remove(f)
	}
	w.files = nil
}

func (w *snapshotCall) maxBytes() int64 {
	if w.rule.MaxBytes > 0 {
		return w.rule.MaxBytes
	}
	return DefaultMaxSnapshotBytes
}

func (w *snapshotCall) tempFile() (*os.File, error) {
	f, err := os.CreateTemp(w.rule.SpoolDir, "etcd-proxy-proxy-snapshot-*.db")
	if err != nil {
		return nil, &snapshotError{codes.Internal, msgSnapshotSpool, err}
	}
	w.files = append(w.files, f.Name())
	return f, nil
}

func (w *snapshotCall) startSpool() error {
	f, err := w.tempFile()
	if err != nil {
		return err
	}
	w.spool, w.w, w.tail = f, bufio.NewWriterSize(f, 64<<10), &tailHasher{h: sha256.New()}
	return nil
}

func (w *snapshotCall) tooLarge(n int64) error {
	return &snapshotError{codes.ResourceExhausted, fmt.Sprintf("%s (%d bytes)", msgSnapshotTooLarge, w.maxBytes()),
		fmt.Errorf("%d bytes announced or received", n)}
}

// add spools one message of the upstream's stream.
func (w *snapshotCall) add(msg *pb.SnapshotResponse) error {
	limit := w.maxBytes()
	if !w.started {
		w.started = true
		w.header, w.version = msg.Header, snapshotVersion(msg.XXX_unrecognized)
		if announced := int64(len(msg.Blob)) + int64(min(msg.RemainingBytes, uint64(limit))) + sha256.Size; announced > limit {
			return w.tooLarge(announced)
		}
	}
	if w.total += int64(len(msg.Blob)); w.total > limit {
		return w.tooLarge(w.total)
	}
	if _, err := w.w.Write(msg.Blob); err != nil {
		return &snapshotError{codes.ResourceExhausted, msgSnapshotSpool, err}
	}
	w.tail.Write(msg.Blob)
	return nil
}

// prepare checks the spooled snapshot's SHA-256, cuts it off, and leaves the rewritten copy open in w.db. A
// database from the upstream is a file bbolt maps into memory: a corrupt one must fail this call, not the
// process.
func (w *snapshotCall) prepare() (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = &snapshotError{codes.Internal, msgSnapshotRewrite, fmt.Errorf("panic: %v", r)}
		}
	}()
	if !w.tail.full || !bytes.Equal(w.tail.Sum(), w.tail.tail[:]) {
		return &snapshotError{codes.DataLoss, msgSnapshotHash, fmt.Errorf("%d bytes received", w.total)}
	}
	if err := w.w.Flush(); err != nil {
		return &snapshotError{codes.ResourceExhausted, msgSnapshotSpool, err}
	}
	if err := w.spool.Truncate(w.total - sha256.Size); err != nil {
		return &snapshotError{codes.Internal, msgSnapshotSpool, err}
	}
	spool := w.spool.Name()
	err = w.spool.Close()
	w.spool = nil
	if err != nil {
		return &snapshotError{codes.Internal, msgSnapshotSpool, err}
	}
	copyPath, size, err := w.rewrite(spool)
	if err != nil {
		return err
	}
	_ = os.Remove(spool) // the disk it holds is free before the copy is sent
	if w.db, err = os.Open(copyPath); err != nil {
		return &snapshotError{codes.Internal, msgSnapshotSpool, err}
	}
	w.remaining, w.sum = size, sha256.New()
	return nil
}

// tailHasher hashes everything written to it but the last sha256.Size bytes, which it keeps: a snapshot's
// trailing hash, known to be the last only when the stream ends.
type tailHasher struct {
	h    hash.Hash
	tail [sha256.Size]byte
	n    int // bytes held in tail
	full bool
}

func (t *tailHasher) Write(p []byte) {
	if len(p) >= sha256.Size {
		t.h.Write(t.tail[:t.n])
		t.h.Write(p[:len(p)-sha256.Size])
		t.n = copy(t.tail[:], p[len(p)-sha256.Size:])
	} else {
		held := append(t.tail[:t.n:t.n], p...)
		if over := len(held) - sha256.Size; over > 0 {
			t.h.Write(held[:over])
			held = held[over:]
		}
		t.n = copy(t.tail[:], held)
	}
	t.full = t.n == sha256.Size
}

func (t *tailHasher) Sum() []byte { return t.h.Sum(nil) }

// rewrite gives the spooled database a membership of Self alone and copies it into a fresh file with bbolt's
// compaction, which copies the live keys only: the old member records in the spooled file's freed pages stay
// behind. It returns the copy's path and the size to send (the copy's last page).
func (w *snapshotCall) rewrite(spool string) (string, int64, error) {
	src, err := bolt.Open(spool, 0o600, &bolt.Options{NoSync: true, NoGrowSync: true})
	if err != nil {
		return "", 0, &snapshotError{codes.Internal, msgSnapshotRewrite, fmt.Errorf("opening the upstream's database: %w", err)}
	}
	defer src.Close()
	if err := src.Update(func(tx *bolt.Tx) error { return rewriteMembership(tx, w.rule.Self) }); err != nil {
		return "", 0, &snapshotError{codes.Internal, msgSnapshotRewrite, err}
	}
	f, err := w.tempFile()
	if err != nil {
		return "", 0, err
	}
	_ = f.Close()
	dst, err := bolt.Open(f.Name(), 0o600, &bolt.Options{NoSync: true, NoGrowSync: true})
	if err != nil {
		return "", 0, &snapshotError{codes.Internal, msgSnapshotRewrite, err}
	}
	defer dst.Close()
	if err := bolt.Compact(dst, src, snapshotTxMaxSize); err != nil {
		return "", 0, &snapshotError{codes.Internal, msgSnapshotRewrite, fmt.Errorf("compaction: %w", err)}
	}
	var size int64
	_ = dst.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil })
	if err := dst.Close(); err != nil {
		return "", 0, &snapshotError{codes.Internal, msgSnapshotRewrite, err}
	}
	return f.Name(), size, nil
}

// etcd's bucket and key names (server/mvcc/buckets/bucket.go, server/etcdserver/api/membership).
var (
	bucketMembers        = []byte("members")
	bucketMembersRemoved = []byte("members_removed")
	bucketMeta           = []byte("meta")
	bucketAlarm          = []byte("alarm")
	keyConfState         = []byte("confState")
)

// snapshotMember is the JSON of etcd's membership.Member, as the members bucket stores it.
type snapshotMember struct {
	ID         uint64   `json:"id"`
	PeerURLs   []string `json:"peerURLs"`
	Name       string   `json:"name,omitempty"`
	ClientURLs []string `json:"clientURLs,omitempty"`
}

// snapshotConfState is the JSON of raftpb.ConfState, as meta/confState stores it (etcd 3.5 and later).
type snapshotConfState struct {
	Voters    []uint64 `json:"voters,omitempty"`
	AutoLeave bool     `json:"auto_leave"`
}

// rewriteMembership makes Self the one member: the members bucket holds Self alone, members_removed nothing,
// the raft configuration (meta/confState) names Self's ID, and every active alarm is raised by Self.
func rewriteMembership(tx *bolt.Tx, self Self) error {
	members, err := recreateBucket(tx, bucketMembers)
	if err != nil {
		return err
	}
	m, _ := json.Marshal(snapshotMember{ID: self.ID, PeerURLs: []string{}, Name: self.Name, ClientURLs: self.ClientURLs})
	if err := members.Put([]byte(self.IDString()), m); err != nil {
		return err
	}
	if _, err := recreateBucket(tx, bucketMembersRemoved); err != nil {
		return err
	}
	if meta := tx.Bucket(bucketMeta); meta != nil && meta.Get(keyConfState) != nil {
		cs, _ := json.Marshal(snapshotConfState{Voters: []uint64{self.ID}})
		if err := meta.Put(keyConfState, cs); err != nil {
			return err
		}
	}
	if alarms := tx.Bucket(bucketAlarm); alarms != nil {
		var raised []pb.AlarmType
		if err := alarms.ForEach(func(k, _ []byte) error {
			var a pb.AlarmMember
			if err := a.Unmarshal(k); err != nil {
				return fmt.Errorf("alarm: %w", err)
			}
			raised = append(raised, a.Alarm)
			return nil
		}); err != nil {
			return err
		}
		if alarms, err = recreateBucket(tx, bucketAlarm); err != nil {
			return err
		}
		for _, a := range raised {
			k, _ := (&pb.AlarmMember{MemberID: self.ID, Alarm: a}).Marshal()
			if err := alarms.Put(k, []byte{}); err != nil {
				return err
			}
		}
	}
	return nil
}

func recreateBucket(tx *bolt.Tx, name []byte) (*bolt.Bucket, error) {
	if tx.Bucket(name) != nil {
		if err := tx.DeleteBucket(name); err != nil {
			return nil, fmt.Errorf("bucket %s: %w", name, err)
		}
	}
	b, err := tx.CreateBucket(name)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", name, err)
	}
	return b, nil
}

// next is the next message of the rewritten stream: the database in snapshotChunk blobs, then its SHA-256 with
// remaining_bytes 0, as etcd sends them. Its blob is reused by the call after it.
func (w *snapshotCall) next() (*pb.SnapshotResponse, error) {
	m := &pb.SnapshotResponse{}
	switch {
	case w.remaining > 0:
		n := min(w.remaining, snapshotChunk)
		w.blob = grow(w.blob, int(n))
		if _, err := io.ReadFull(w.db, w.blob); err != nil {
			return nil, err
		}
		w.sum.Write(w.blob)
		w.remaining -= n
		m.RemainingBytes, m.Blob = uint64(w.remaining), w.blob
	default:
		m.Blob = w.sum.Sum(nil)
		w.done = true
	}
	if !w.sent {
		w.sent = true
		h := &pb.ResponseHeader{MemberId: w.rule.Self.ID}
		if u := w.header; u != nil {
			h.ClusterId, h.Revision, h.RaftTerm = u.ClusterId, u.Revision, u.RaftTerm
		}
		m.Header = h
		if w.version != "" {
			m.XXX_unrecognized = protowire.AppendString(protowire.AppendTag(nil, snapshotVersionField, protowire.BytesType), w.version)
		}
	}
	return m, nil
}

// grow returns b with length n, reusing its array when it is large enough.
func grow(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

// snapshotVersionField is SnapshotResponse.version (etcd 3.6 and later: the storage version of the member that
// made the snapshot); unknown to the 3.5 messages this proxy is built with, so read from the unknown fields.
const snapshotVersionField = 4

// versionPattern is what a version must look like to be passed on: nothing else of an unknown field is.
var versionPattern = regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$`)

// snapshotVersion returns the version field among a message's unknown fields, if it looks like a version.
func snapshotVersion(unknown []byte) string {
	for len(unknown) > 0 {
		num, typ, n := protowire.ConsumeTag(unknown)
		if n < 0 {
			return ""
		}
		unknown = unknown[n:]
		if num == snapshotVersionField && typ == protowire.BytesType {
			v, n := protowire.ConsumeString(unknown)
			if n < 0 || !versionPattern.MatchString(v) {
				return ""
			}
			return v
		}
		if n = protowire.ConsumeFieldValue(num, typ, unknown); n < 0 {
			return ""
		}
		unknown = unknown[n:]
	}
	return ""
}

var (
	_ Rule        = (*Snapshot)(nil)
	_ MessageRule = (*Snapshot)(nil)
)
