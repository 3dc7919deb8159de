package rules

import (
	"bytes"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// DefaultEncryptMaxRequestBytes is etcd's default --max-request-bytes (1.5 MiB): the largest request a member
// accepts unless told otherwise.
const DefaultEncryptMaxRequestBytes = 3 << 19

// encryptRaftOverhead is what a member adds to a request before it checks the request's size (the raft
// request's header: its ID, the user name, the auth revision), with room to spare.
const encryptRaftOverhead = 1 << 10

// The texts of Encrypt, each a gRPC status (or a watch's CancelReason).
const (
	msgEncCompareValue = "etcd-proxy-proxy: a compare on the value of a key under an encrypted prefix cannot work on ciphertext"
	msgEncSortValue    = "etcd-proxy-proxy: a range over an encrypted prefix cannot be sorted by value (the values are ciphertext)"
	msgEncTooLarge     = "etcd-proxy-proxy: with its values encrypted, the request is larger than the upstream accepts (--encryption-max-request-bytes)"
	msgEncFailed       = "etcd-proxy-proxy: a value could not be encrypted"
	msgEncDecrypt      = "etcd-proxy-proxy: a value under an encrypted prefix does not decrypt (unknown key, tampered with, or moved from another key)"
	msgEncPlaintext    = "etcd-proxy-proxy: a value under an encrypted prefix is not encrypted (--encryption-read-plaintext reads it as it is)"
	msgEncTxnApplied   = "etcd-proxy-proxy: the transaction was applied, but a value it read under an encrypted prefix does not decrypt"
	msgEncWatch        = "etcd-proxy-proxy: a value under an encrypted prefix does not decrypt; watch canceled"
)

// encryptMessages are the texts above, for ownMessages.
var encryptMessages = []string{msgEncCompareValue, msgEncSortValue, msgEncTooLarge, msgEncFailed, msgEncDecrypt,
	msgEncPlaintext, msgEncTxnApplied, msgEncWatch}

// Encrypt encrypts the values of the keys under its prefixes on their way up and decrypts them on their way back,
// with the etcd key as the associated data (crypt): v3's Put, Range, DeleteRange's prev_kvs, Txn to any depth,
// Watch events, the values of elections (Campaign, Proclaim, Leader, Observe), and the JSON gateway, which comes
// through the same path; and v2 keys (encrypt_v2.go). Keys are never encrypted.
//
// It fails closed: a value that does not decrypt is an error for the read (gRPC DataLoss; FailedPrecondition for
// plaintext the keyring does not read), never an empty or raw value; an applied write whose answer carries a
// prev_kv that does not decrypt succeeds with that prev_kv left out (counted in PrevKVsDropped); a watch event
// that does not decrypt cancels its watch, with a CancelReason, upstream too. What cannot work on ciphertext is
// refused: a Compare on the value of an encrypted key, a Range sorted by value over an encrypted prefix; and
// so is a write whose encrypted values would make it larger than the upstream accepts.
type Encrypt struct {
	// Prefixes are the key prefixes whose values are encrypted with Keys (the simple case); none, and no
	// Resources, turns the rule off.
	Prefixes []string
	// Keys encrypt (the first) and decrypt (all); required with Prefixes.
	Keys *crypt.Keyring
	// Resources, when set, replace Prefixes and Keys: a keyring per set of prefixes (a key takes the keyring of
	// the longest prefix it has). SetResources replaces them while the proxy runs.
	Resources []EncryptResource
	// MaxRequestBytes is the largest request the upstream accepts (etcd's --max-request-bytes); zero means
	// DefaultEncryptMaxRequestBytes.
	MaxRequestBytes int64
	// Log receives the reads that failed, with their keys; nil means slog.Default().
	Log *slog.Logger

	prevKVsDropped, watchesCanceled atomic.Uint64
	state                           atomic.Pointer[encryptState]
}

// EncryptResource is a set of key prefixes and the keyring of their values.
type EncryptResource struct {
	Prefixes []string
	Keys     *crypt.Keyring
}

// encryptState is what the rule encrypts with: every prefix with its keyring, longest first.
type encryptState struct {
	prefixes []string
	keys     []*crypt.Keyring
}

// current is the state in use: Resources (or Prefixes and Keys) until SetResources replaces them.
func (e *Encrypt) current() *encryptState {
	if st := e.state.Load(); st != nil {
		return st
	}
	rs := e.Resources
	if rs == nil {
		rs = []EncryptResource{{Prefixes: e.Prefixes, Keys: e.Keys}}
	}
	e.state.CompareAndSwap(nil, newEncryptState(rs))
	return e.state.Load()
}

func newEncryptState(rs []EncryptResource) *encryptState {
	st := &encryptState{}
	for _, r := range rs {
		for _, p := range r.Prefixes {
			st.prefixes = append(st.prefixes, p)
			st.keys = append(st.keys, r.Keys)
		}
	}
	idx := make([]int, len(st.prefixes))
	for i := range idx {
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int { return len(st.prefixes[b]) - len(st.prefixes[a]) })
	sorted := &encryptState{}
	for _, i := range idx {
		sorted.prefixes = append(sorted.prefixes, st.prefixes[i])
		sorted.keys = append(sorted.keys, st.keys[i])
	}
	return sorted
}

// SetResources replaces what the rule encrypts with (a reload of the encryption configuration); calls under
// way finish with what they started with, value by value.
func (e *Encrypt) SetResources(rs []EncryptResource) { e.state.Store(newEncryptState(rs)) }

// Keyrings are the keyrings in use, each once.
func (e *Encrypt) Keyrings() []*crypt.Keyring {
	var out []*crypt.Keyring
	for _, k := range e.current().keys {
		if k != nil && !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

// on reports whether the rule was given anything to encrypt.
func (e *Encrypt) on() bool { return len(e.Prefixes) > 0 || e.Resources != nil }

func encryptRule(o Options) *Encrypt {
	return &Encrypt{Prefixes: o.EncryptPrefixes, Keys: o.EncryptionKeys, Resources: o.EncryptionResources,
		MaxRequestBytes: o.EncryptionMaxRequestBytes, Log: o.Log}
}

// Name implements Rule.
func (*Encrypt) Name() string { return "encrypt" }

// PrevKVsDropped counts the prev_kvs left out of write answers because they did not decrypt.
func (e *Encrypt) PrevKVsDropped() uint64 { return e.prevKVsDropped.Load() }

// WatchesCanceled counts the watches canceled because an event did not decrypt.
func (e *Encrypt) WatchesCanceled() uint64 { return e.watchesCanceled.Load() }

// gRPC methods whose messages carry values.
const (
	methodRange       = "/etcdserverpb.KV/Range"
	methodPut         = "/etcdserverpb.KV/Put"
	methodDeleteRange = "/etcdserverpb.KV/DeleteRange"
	methodTxn         = "/etcdserverpb.KV/Txn"
	methodWatch       = "/etcdserverpb.Watch/Watch"
	methodCampaign    = "/v3electionpb.Election/Campaign"
	methodProclaim    = "/v3electionpb.Election/Proclaim"
	methodLeader      = "/v3electionpb.Election/Leader"
	methodObserve     = "/v3electionpb.Election/Observe"
)

// Claim implements MessageRule: the messages of the methods that carry values, when the rule is on.
func (e *Encrypt) Claim(m *Method) Claim {
	if !e.on() {
		return ClaimNone
	}
	switch m.Name {
	case methodRange, methodPut, methodDeleteRange, methodTxn, methodWatch,
		methodCampaign, methodProclaim, methodLeader, methodObserve:
		return ClaimMessages
	}
	return ClaimNone
}

// Serve implements MessageRule. Unary calls: the request is encrypted (or refused) on its way up, and the
// answer decrypted with the request at hand (a keys_only range has no values to decrypt). Observe's answers
// need no request (and its request is received on another goroutine than its answers are sent).
func (e *Encrypt) Serve(s Stream, next Handler) error {
	if s.Method().Name == methodWatch {
		return e.serveWatch(s, next)
	}
	unary := !s.Method().IsStream()
	var req any
	return next(&StreamFuncs{Stream: s,
		Recv: func() (any, error) {
			m, err := s.RecvMsg()
			if err != nil {
				return m, err
			}
			if err := e.request(m); err != nil {
				return nil, err
			}
			if unary {
				req = m
			}
			return m, nil
		},
		Send: func(m any) error {
			if err := e.response(req, m); err != nil {
				return err
			}
			return s.SendMsg(m)
		}})
}

// keysFor is the keyring of key's value, nil when it is not encrypted.
func (e *Encrypt) keysFor(key []byte) *crypt.Keyring {
	st := e.current()
	for i, p := range st.prefixes {
		if bytes.HasPrefix(key, []byte(p)) {
			return st.keys[i]
		}
	}
	return nil
}

// under reports whether key's value is encrypted.
func (e *Encrypt) under(key []byte) bool { return e.keysFor(key) != nil }

// touches reports whether the range [key, end), with etcd's meaning of end (empty: the key alone; "\x00":
// every key from key on), meets an encrypted prefix.
func (e *Encrypt) touches(key, end []byte) bool {
	if len(end) == 0 {
		return e.under(key)
	}
	toEnd := bytes.Equal(end, []byte{0})
	for _, p := range e.current().prefixes {
		prefix := []byte(p)
		prefixEnd := []byte(clientv3.GetPrefixRangeEnd(p))
		noPrefixEnd := bytes.Equal(prefixEnd, []byte{0}) // a prefix of 0xff bytes runs to the end
		if (noPrefixEnd || bytes.Compare(key, prefixEnd) < 0) && (toEnd || bytes.Compare(prefix, end) < 0) {
			return true
		}
	}
	return false
}

// request encrypts the values of a request, or refuses it.
func (e *Encrypt) request(m any) error {
	var (
		changed bool
		err     error
	)
	switch r := m.(type) {
	case *pb.PutRequest:
		changed, err = e.put(r)
	case *pb.RangeRequest:
		err = e.rangeRequest(r)
	case *pb.TxnRequest:
		changed, err = e.txn(r)
	case *v3electionpb.CampaignRequest:
		// The member stores the value under the name, a slash and the lease in hex (concurrency.Election).
		changed, err = e.value(append(slices.Clip(r.Name), "/"+strconv.FormatInt(r.Lease, 16)...), &r.Value)
	case *v3electionpb.ProclaimRequest:
		if r.Leader != nil {
			changed, err = e.value(r.Leader.Key, &r.Value)
		}
	default:
		return nil
	}
	if err != nil {
		return err
	}
	if changed && int64(m.(Message).Size())+encryptRaftOverhead > e.maxRequestBytes() {
		return status.Error(codes.InvalidArgument, msgEncTooLarge)
	}
	return nil
}

func (e *Encrypt) maxRequestBytes() int64 {
	if e.MaxRequestBytes > 0 {
		return e.MaxRequestBytes
	}
	return DefaultEncryptMaxRequestBytes
}

func (e *Encrypt) put(r *pb.PutRequest) (bool, error) {
	if r.IgnoreValue { // the stored value stays: there is none to encrypt
		return false, nil
	}
	return e.value(r.Key, &r.Value)
}

// value encrypts *v, to be stored under key, when key is under an encrypted prefix.
func (e *Encrypt) value(key []byte, v *[]byte) (bool, error) {
	keys := e.keysFor(key)
	if keys == nil {
		return false, nil
	}
	out, err := keys.Encrypt(key, *v)
	if err != nil {
		e.log().Error("encryption failed", "key", string(key), "err", err)
		return false, status.Error(codes.Internal, msgEncFailed)
	}
	*v = out
	return true, nil
}

func (e *Encrypt) rangeRequest(r *pb.RangeRequest) error {
	if r.SortTarget == pb.RangeRequest_VALUE && r.SortOrder != pb.RangeRequest_NONE && e.touches(r.Key, r.RangeEnd) {
		return status.Error(codes.InvalidArgument, msgEncSortValue)
	}
	return nil
}

// txn encrypts the puts and checks the compares and ranges of a Txn, and of the Txns in it, to any depth.
func (e *Encrypt) txn(r *pb.TxnRequest) (bool, error) {
	for _, c := range r.Compare {
		if c.Target == pb.Compare_VALUE && e.touches(c.Key, c.RangeEnd) {
			return false, status.Error(codes.InvalidArgument, msgEncCompareValue)
		}
	}
	changed := false
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			var (
				c   bool
				err error
			)
			switch {
			case op.GetRequestPut() != nil:
				c, err = e.put(op.GetRequestPut())
			case op.GetRequestRange() != nil:
				err = e.rangeRequest(op.GetRequestRange())
			case op.GetRequestTxn() != nil:
				c, err = e.txn(op.GetRequestTxn())
			}
			if err != nil {
				return false, err
			}
			changed = changed || c
		}
	}
	return changed, nil
}

// errDecrypt is a read that failed: the status says why.
type errDecrypt struct{ plaintext bool }

func (e errDecrypt) Error() string { return "value does not decrypt" }

func (e errDecrypt) status() error {
	if e.plaintext {
		return status.Error(codes.FailedPrecondition, msgEncPlaintext)
	}
	return status.Error(codes.DataLoss, msgEncDecrypt)
}

// decrypt replaces the value of kv by its plaintext when its key is under an encrypted prefix.
func (e *Encrypt) decrypt(kv *mvccpb.KeyValue) error {
	if kv == nil {
		return nil
	}
	keys := e.keysFor(kv.Key)
	if keys == nil {
		return nil
	}
	plain, _, err := keys.Decrypt(kv.Key, kv.Value)
	if err != nil {
		e.log().Warn("value does not decrypt", "key", string(kv.Key), "err", err)
		return errDecrypt{plaintext: errors.Is(err, crypt.ErrNotEncrypted)}
	}
	kv.Value = plain
	return nil
}

// decryptKVs decrypts the values of a range's answer (a keys_only one has none).
func (e *Encrypt) decryptKVs(req *pb.RangeRequest, kvs []*mvccpb.KeyValue) error {
	if req != nil && (req.KeysOnly || req.CountOnly) {
		return nil
	}
	for _, kv := range kvs {
		if err := e.decrypt(kv); err != nil {
			return err
		}
	}
	return nil
}

// prevKV decrypts the prev_kv of an applied write, or leaves it out.
func (e *Encrypt) prevKV(kv **mvccpb.KeyValue) {
	if *kv != nil && e.decrypt(*kv) != nil {
		*kv = nil
		e.prevKVsDropped.Add(1)
	}
}

// prevKVs decrypts the prev_kvs of an applied delete, leaving out those that do not decrypt.
func (e *Encrypt) prevKVs(kvs []*mvccpb.KeyValue) []*mvccpb.KeyValue {
	out := kvs[:0]
	for _, kv := range kvs {
		if e.decrypt(kv) != nil {
			e.prevKVsDropped.Add(1)
			continue
		}
		out = append(out, kv)
	}
	return out
}

// response decrypts the values of an answer to req.
func (e *Encrypt) response(req, m any) error {
	switch r := m.(type) {
	case *pb.RangeResponse:
		rr, _ := req.(*pb.RangeRequest)
		if err := e.decryptKVs(rr, r.Kvs); err != nil {
			return err.(errDecrypt).status()
		}
	case *pb.PutResponse:
		e.prevKV(&r.PrevKv)
	case *v3electionpb.LeaderResponse: // Leader, and each answer of Observe
		if err := e.decrypt(r.Kv); err != nil {
			return err.(errDecrypt).status()
		}
	case *pb.DeleteRangeResponse:
		r.PrevKvs = e.prevKVs(r.PrevKvs)
	case *pb.TxnResponse:
		tr, _ := req.(*pb.TxnRequest)
		if err := e.txnResponse(tr, r); err != nil {
			var de errDecrypt
			if errors.As(err, &de) && txnWrites(tr, r) {
				return status.Error(codes.DataLoss, msgEncTxnApplied)
			}
			if errors.As(err, &de) {
				return de.status()
			}
			return err
		}
	}
	return nil
}

// txnResponse decrypts the answers of the branch a Txn took, each with its request.
func (e *Encrypt) txnResponse(req *pb.TxnRequest, r *pb.TxnResponse) error {
	ops := branch(req, r)
	if len(ops) != len(r.Responses) { // not what this request gets from etcd: nothing in it can be trusted
		return errDecrypt{}
	}
	for i, resp := range r.Responses {
		switch x := resp.Response.(type) {
		case *pb.ResponseOp_ResponseRange:
			if err := e.decryptKVs(ops[i].GetRequestRange(), x.ResponseRange.GetKvs()); err != nil {
				return err
			}
		case *pb.ResponseOp_ResponsePut:
			if x.ResponsePut != nil {
				e.prevKV(&x.ResponsePut.PrevKv)
			}
		case *pb.ResponseOp_ResponseDeleteRange:
			if x.ResponseDeleteRange != nil {
				x.ResponseDeleteRange.PrevKvs = e.prevKVs(x.ResponseDeleteRange.PrevKvs)
			}
		case *pb.ResponseOp_ResponseTxn:
			if err := e.txnResponse(ops[i].GetRequestTxn(), x.ResponseTxn); err != nil {
				return err
			}
		}
	}
	return nil
}

// branch is the list of operations a Txn ran.
func branch(req *pb.TxnRequest, r *pb.TxnResponse) []*pb.RequestOp {
	if req == nil || r == nil {
		return nil
	}
	if r.Succeeded {
		return req.Success
	}
	return req.Failure
}

// txnWrites reports whether the branch a Txn took changed something (a put or delete, at any depth).
func txnWrites(req *pb.TxnRequest, r *pb.TxnResponse) bool {
	ops := branch(req, r)
	for i, op := range ops {
		switch {
		case op.GetRequestPut() != nil, op.GetRequestDeleteRange() != nil:
			return true
		case op.GetRequestTxn() != nil && i < len(r.Responses):
			if txnWrites(op.GetRequestTxn(), r.Responses[i].GetResponseTxn()) {
				return true
			}
		}
	}
	return false
}

// serveWatch decrypts the events of a watch stream one answer at a time, as they come. An event that does not
// decrypt cancels its watch: the client gets the events before it and a canceled answer with a CancelReason,
// and the upstream a cancel request (the client's requests go up through a pump, so that one can be put
// among them); what comes for that watch until the upstream confirms the cancel is dropped.
func (e *Encrypt) serveWatch(s Stream, next Handler) error {
	ctx := s.Context()
	type received struct {
		m   any
		err error
	}
	var (
		in       = make(chan received)
		mu       sync.Mutex
		injected []any
		wake     = make(chan struct{}, 1)
		start    sync.Once
		canceled = map[int64]bool{} // watches canceled here, until the upstream confirms; Send's alone
	)
	pump := func() {
		for {
			m, err := s.RecvMsg()
			select {
			case in <- received{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}
	return next(&StreamFuncs{Stream: s,
		Recv: func() (any, error) {
			start.Do(func() { go pump() })
			for {
				mu.Lock()
				if len(injected) > 0 {
					m := injected[0]
					injected = injected[1:]
					mu.Unlock()
					return m, nil
				}
				mu.Unlock()
				select {
				case r := <-in:
					return r.m, r.err
				case <-wake:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
		},
		Send: func(m any) error {
			r, ok := m.(*pb.WatchResponse)
			if !ok {
				return s.SendMsg(m)
			}
			if canceled[r.WatchId] {
				if r.Canceled { // the upstream's confirmation: the ID may be used again
					delete(canceled, r.WatchId)
				}
				return nil
			}
			bad := -1
			for i, ev := range r.Events {
				if ev.Type != mvccpb.DELETE && e.decrypt(ev.Kv) != nil {
					bad = i
					break
				}
				if ev.PrevKv != nil && e.decrypt(ev.PrevKv) != nil {
					bad = i
					break
				}
			}
			if bad < 0 {
				return s.SendMsg(r)
			}
			e.watchesCanceled.Add(1)
			canceled[r.WatchId] = true
			mu.Lock()
			injected = append(injected, &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{
				CancelRequest: &pb.WatchCancelRequest{WatchId: r.WatchId}}})
			mu.Unlock()
			select {
			case wake <- struct{}{}:
			default:
			}
			if bad > 0 {
				before := &pb.WatchResponse{Header: r.Header, WatchId: r.WatchId, Events: r.Events[:bad]}
				if err := s.SendMsg(before); err != nil {
					return err
				}
			}
			return s.SendMsg(&pb.WatchResponse{Header: r.Header, WatchId: r.WatchId, Canceled: true, CancelReason: msgEncWatch})
		}})
}

func (e *Encrypt) log() *slog.Logger {
	if e.Log != nil {
		return e.Log
	}
	return slog.Default()
}

var (
	_ Rule        = (*Encrypt)(nil)
	_ MessageRule = (*Encrypt)(nil)
)
