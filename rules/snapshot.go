package rules

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"runtime/debug"
	"strconv"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// DefaultMaxSnapshotBytes bounds a snapshot spooled from the upstream: etcd's largest recommended
// --quota-backend-bytes (8 GiB), so that the proxy refuses no database its members may hold.
const DefaultMaxSnapshotBytes = 8 << 30

// CodeDataLoss is the gRPC status of a snapshot that fails its SHA-256 check (google.golang.org/grpc/codes).
const CodeDataLoss = 15

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

// Response implements Rule: it replaces the body of a snapshot stream with the rewritten one. Trailers-only
// answers (errors) pass untouched.
func (s *Snapshot) Response(resp *http.Response) (BodyFunc, error) {
	req := resp.Request
	if req == nil || req.URL.Path != methodSnapshot || !IsGRPC(req) || resp.StatusCode != http.StatusOK ||
		resp.Header.Get(GRPCStatusHeader) != "" {
		return nil, nil
	}
	resp.Header.Del("Content-Length")
	resp.ContentLength = -1
	resp.Body = &snapshotBody{rule: s, resp: resp, up: resp.Body}
	return nil, nil
}

// snapshotChunk is the blob size of each message sent, as etcd's snapshotSendBufferSize.
const snapshotChunk = 32 << 10

// maxSnapshotMessage bounds one message of the upstream's stream (etcd sends 32 KiB blobs).
const maxSnapshotMessage = 4 << 20

// snapshotTxMaxSize is how much the compaction copies per bbolt transaction: it bounds the copy's memory.
const snapshotTxMaxSize = 8 << 20

// snapshotBody is the rewritten stream. Its first Read spools, checks and copies the upstream's snapshot; the
// following ones frame the copy. It is read and closed by the one goroutine that serves the response, which
// also reads the upstream body, so the upstream's trailers (resp.Trailer) are complete when it looks at them.
type snapshotBody struct {
	rule     *Snapshot
	resp     *http.Response
	up       io.ReadCloser
	upClosed bool

	started, done bool
	out           []byte // framed bytes not yet read
	msg           []byte // buffer of the next message

	// The upstream's first message: its header and version go on our first one.
	header  *pb.ResponseHeader
	version string

	files     []string // temporary files, removed by Close
	db        *os.File // the rewritten database
	remaining int64    // its bytes not yet sent
	sent      bool     // the first message went out
	sum       hash.Hash
	blob      []byte
}

// snapshotError ends the stream with a gRPC status; err is for the log.
type snapshotError struct {
	code int
	msg  string
	err  error
}

func (e *snapshotError) Error() string { return e.msg + ": " + e.err.Error() }

// errUpstreamStatus: the upstream ended the stream with an error status, which passes on as it is.
var errUpstreamStatus = errors.New("the upstream ended the snapshot with an error")

func (b *snapshotBody) Read(p []byte) (int, error) {
	if !b.started {
		b.started = true
		if err := b.prepare(); err != nil {
			b.fail(err)
		}
	}
	for len(b.out) == 0 {
		if b.done {
			return 0, io.EOF
		}
		if err := b.next(); err != nil {
			b.fail(&snapshotError{CodeInternal, msgSnapshotRewrite, err})
		}
	}
	n := copy(p, b.out)
	b.out = b.out[n:]
	return n, nil
}

// Close ends the upstream's stream and removes the temporary files.
func (b *snapshotBody) Close() error {
	b.done = true
	err := b.closeUp()
	b.release()
	return err
}

// closeUp closes the upstream's body once: closing it again would let the rules below (GRPCStatus) rewrite the
// status that fail set.
func (b *snapshotBody) closeUp() error {
	if b.upClosed {
		return nil
	}
	b.upClosed = true
	return b.up.Close()
}

// release closes and removes the temporary files.
func (b *snapshotBody) release() {
	if b.db != nil {
		_ = b.db.Close()
		b.db = nil
	}
	for _, f := range b.files {
		_ = os.Remove(f)
	}
	b.files = nil
}

// fail ends the stream: with the upstream's status as it is, or with ours in the trailers.
func (b *snapshotBody) fail(err error) {
	b.done, b.out = true, nil
	_ = b.closeUp()
	b.release()
	if errors.Is(err, errUpstreamStatus) {
		return
	}
	var se *snapshotError
	if !errors.As(err, &se) {
		se = &snapshotError{CodeInternal, msgSnapshotRewrite, err}
	}
	log := b.rule.Log
	if log == nil {
		log = slog.Default()
	}
	log.Warn("snapshot failed", "code", se.code, "err", se)
	if b.resp.Trailer == nil {
		b.resp.Trailer = http.Header{}
	}
	b.resp.Trailer.Del(GRPCDetailsHeader)
	b.resp.Trailer.Set(GRPCStatusHeader, strconv.Itoa(se.code))
	b.resp.Trailer.Set(GRPCMessageHeader, encodeGRPCMessage(se.msg))
}

// prepare spools the upstream's snapshot, checks it and leaves the rewritten copy open in b.db. A database
// from the upstream is a file bbolt maps into memory: a corrupt one must fail this call, not the process.
func (b *snapshotBody) prepare() (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = &snapshotError{CodeInternal, msgSnapshotRewrite, fmt.Errorf("panic: %v", r)}
		}
	}()
	spool, err := b.spool()
	if err != nil {
		return err
	}
	copyPath, size, err := b.rewrite(spool)
	if err != nil {
		return err
	}
	_ = os.Remove(spool) // the disk it holds is free before the copy is sent
	if b.db, err = os.Open(copyPath); err != nil {
		return &snapshotError{CodeInternal, msgSnapshotSpool, err}
	}
	b.remaining, b.sum = size, sha256.New()
	return nil
}

func (b *snapshotBody) maxBytes() int64 {
	if b.rule.MaxBytes > 0 {
		return b.rule.MaxBytes
	}
	return DefaultMaxSnapshotBytes
}

func (b *snapshotBody) tempFile() (*os.File, error) {
	f, err := os.CreateTemp(b.rule.SpoolDir, "etcd-proxy-proxy-snapshot-*.db")
	if err != nil {
		return nil, &snapshotError{CodeInternal, msgSnapshotSpool, err}
	}
	b.files = append(b.files, f.Name())
	return f, nil
}

// spool writes the upstream's blobs to a file and checks the trailing SHA-256 of the database, which it cuts
// off. It returns the file's path.
func (b *snapshotBody) spool() (string, error) {
	f, err := b.tempFile()
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := bufio.NewWriterSize(f, 64<<10)
	sum := &tailHasher{h: sha256.New()}
	r := bufio.NewReaderSize(b.up, 64<<10)
	limit := b.maxBytes()
	var (
		total int64
		frame []byte
		msg   pb.SnapshotResponse
	)
	tooLarge := func(n int64) error {
		return &snapshotError{CodeResourceExhausted, fmt.Sprintf("%s (%d bytes)", msgSnapshotTooLarge, limit),
			fmt.Errorf("%d bytes announced or received", n)}
	}
	for first := true; ; first = false {
		var hdr [5]byte
		if _, err := io.ReadFull(r, hdr[:]); err == io.EOF {
			break
		} else if err != nil {
			return "", &snapshotError{CodeUnavailable, msgSnapshotBroken, err}
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n > maxSnapshotMessage {
			return "", &snapshotError{CodeInternal, msgSnapshotMalformed, fmt.Errorf("a message of %d bytes", n)}
		}
		frame = grow(frame, 5+int(n))
		copy(frame, hdr[:])
		if _, err := io.ReadFull(r, frame[5:]); err != nil {
			return "", &snapshotError{CodeUnavailable, msgSnapshotBroken, err}
		}
		payload, err := unframe(frame)
		if err == nil {
			blob := msg.Blob[:0] // Unmarshal appends to it: one buffer for every blob
			msg.Reset()
			msg.Blob = blob
			err = msg.Unmarshal(payload)
		}
		if err != nil {
			return "", &snapshotError{CodeInternal, msgSnapshotMalformed, err}
		}
		if first {
			b.header, b.version = msg.Header, snapshotVersion(msg.XXX_unrecognized)
			if announced := int64(len(msg.Blob)) + int64(min(msg.RemainingBytes, uint64(limit))) + sha256.Size; announced > limit {
				return "", tooLarge(announced)
			}
		}
		if total += int64(len(msg.Blob)); total > limit {
			return "", tooLarge(total)
		}
		if _, err := w.Write(msg.Blob); err != nil {
			return "", &snapshotError{CodeResourceExhausted, msgSnapshotSpool, err}
		}
		sum.Write(msg.Blob)
	}
	switch st := b.resp.Trailer.Get(GRPCStatusHeader); st {
	case "0":
	case "":
		return "", &snapshotError{CodeUnavailable, msgSnapshotBroken, errors.New("the stream ended without a status")}
	default:
		return "", errUpstreamStatus
	}
	if !sum.full || !bytes.Equal(sum.Sum(), sum.tail[:]) {
		return "", &snapshotError{CodeDataLoss, msgSnapshotHash, fmt.Errorf("%d bytes received", total)}
	}
	if err := w.Flush(); err != nil {
		return "", &snapshotError{CodeResourceExhausted, msgSnapshotSpool, err}
	}
	if err := f.Truncate(total - sha256.Size); err != nil {
		return "", &snapshotError{CodeInternal, msgSnapshotSpool, err}
	}
	if err := f.Close(); err != nil {
		return "", &snapshotError{CodeInternal, msgSnapshotSpool, err}
	}
	return f.Name(), nil
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
func (b *snapshotBody) rewrite(spool string) (string, int64, error) {
	src, err := bolt.Open(spool, 0o600, &bolt.Options{NoSync: true, NoGrowSync: true})
	if err != nil {
		return "", 0, &snapshotError{CodeInternal, msgSnapshotRewrite, fmt.Errorf("opening the upstream's database: %w", err)}
	}
	defer src.Close()
	if err := src.Update(func(tx *bolt.Tx) error { return rewriteMembership(tx, b.rule.Self) }); err != nil {
		return "", 0, &snapshotError{CodeInternal, msgSnapshotRewrite, err}
	}
	f, err := b.tempFile()
	if err != nil {
		return "", 0, err
	}
	_ = f.Close()
	dst, err := bolt.Open(f.Name(), 0o600, &bolt.Options{NoSync: true, NoGrowSync: true})
	if err != nil {
		return "", 0, &snapshotError{CodeInternal, msgSnapshotRewrite, err}
	}
	defer dst.Close()
	if err := bolt.Compact(dst, src, snapshotTxMaxSize); err != nil {
		return "", 0, &snapshotError{CodeInternal, msgSnapshotRewrite, fmt.Errorf("compaction: %w", err)}
	}
	var size int64
	_ = dst.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil })
	if err := dst.Close(); err != nil {
		return "", 0, &snapshotError{CodeInternal, msgSnapshotRewrite, err}
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

// next frames the next message of the rewritten stream: the database in snapshotChunk blobs, then its SHA-256
// with remaining_bytes 0, as etcd sends them.
func (b *snapshotBody) next() error {
	var m pb.SnapshotResponse
	switch {
	case b.remaining > 0:
		n := min(b.remaining, snapshotChunk)
		b.blob = grow(b.blob, int(n))
		if _, err := io.ReadFull(b.db, b.blob); err != nil {
			return err
		}
		b.sum.Write(b.blob)
		b.remaining -= n
		m.RemainingBytes, m.Blob = uint64(b.remaining), b.blob
	default:
		m.Blob = b.sum.Sum(nil)
		b.done = true
	}
	var version []byte
	if !b.sent {
		b.sent = true
		h := &pb.ResponseHeader{MemberId: b.rule.Self.ID}
		if u := b.header; u != nil {
			h.ClusterId, h.Revision, h.RaftTerm = u.ClusterId, u.Revision, u.RaftTerm
		}
		m.Header = h
		if b.version != "" {
			version = protowire.AppendString(protowire.AppendTag(nil, snapshotVersionField, protowire.BytesType), b.version)
		}
	}
	size := m.Size() + len(version)
	b.msg = grow(b.msg, 5+size)
	b.msg[0] = 0
	binary.BigEndian.PutUint32(b.msg[1:5], uint32(size))
	n, err := m.MarshalTo(b.msg[5:])
	if err != nil {
		return err
	}
	copy(b.msg[5+n:], version)
	b.out = b.msg
	return nil
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

var _ Rule = (*Snapshot)(nil)
