package rules

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v2store"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

func testEncrypt(t *testing.T) (*Encrypt, *crypt.Keyring) {
	t.Helper()
	k, err := crypt.NewKey("k1", bytes.Repeat([]byte{1}, crypt.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	ring, _ := crypt.NewKeyring(k)
	return &Encrypt{Prefixes: []string{"/s/"}, Keys: ring}, ring
}

func enc(t *testing.T, ring *crypt.Keyring, key, value string) []byte {
	t.Helper()
	b, err := ring.Encrypt([]byte(key), []byte(value))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEncryptRefuses: what cannot work on ciphertext is refused before it goes up, whatever range names the
// encrypted keys (etcd's range_end: "\x00" runs to the end of the keyspace); the same outside passes.
func TestEncryptRefuses(t *testing.T) {
	t.Parallel()
	e, _ := testEncrypt(t)
	sortByValue := func(key, end string) *pb.RangeRequest {
		return &pb.RangeRequest{Key: []byte(key), RangeEnd: []byte(end), SortTarget: pb.RangeRequest_VALUE, SortOrder: pb.RangeRequest_ASCEND}
	}
	cmpValue := func(key, end string) *pb.TxnRequest {
		return &pb.TxnRequest{Compare: []*pb.Compare{{Key: []byte(key), RangeEnd: []byte(end), Target: pb.Compare_VALUE,
			TargetUnion: &pb.Compare_Value{Value: []byte("x")}}}}
	}
	inTxn := func(r *pb.RangeRequest) *pb.TxnRequest {
		return &pb.TxnRequest{Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{RequestRange: r}}}}}}}}
	}
	for _, c := range []struct {
		name, method string
		req          Message
		refused      bool
	}{
		{"sort by value, the key", methodRange, sortByValue("/s/a", ""), true},
		{"sort by value, from a key before", methodRange, sortByValue("/a", "\x00"), true},
		{"sort by value, the keyspace", methodRange, sortByValue("\x00", "\x00"), true},
		{"sort by value, a range ending at the prefix", methodRange, sortByValue("/a", "/s/"), false},
		{"sort by value, from after the prefix", methodRange, sortByValue("/s0", "\x00"), false},
		{"sort by value, in a txn in a txn", methodTxn, inTxn(sortByValue("/s/", "/s0")), true},
		{"sort by key", methodRange, &pb.RangeRequest{Key: []byte("/s/"), RangeEnd: []byte("/s0"), SortOrder: pb.RangeRequest_ASCEND}, false},
		{"compare value", methodTxn, cmpValue("/s/a", ""), true},
		{"compare value over a range", methodTxn, cmpValue("/", "\x00"), true},
		{"compare value outside", methodTxn, cmpValue("/t/a", ""), false},
		{"compare version", methodTxn, &pb.TxnRequest{Compare: []*pb.Compare{{Key: []byte("/s/a"), Target: pb.Compare_VERSION}}}, false},
	} {
		up := &testUpstream{Answers: []Message{LookupMethod(c.method).NewResponse()}}
		_, err := serve(t, e, c.method, up, c.req)
		if c.refused {
			st, _ := status.FromError(err)
			if err == nil || up.Called && len(up.Got) > 0 || st.Code() != codes.InvalidArgument || !KnownGRPCMessage(st.Message()) {
				t.Errorf("%s: %v (sent up: %d); want InvalidArgument with a known text, nothing sent up", c.name, err, len(up.Got))
			}
		} else if err != nil || len(up.Got) != 1 {
			t.Errorf("%s: %v; want it passed", c.name, err)
		}
	}
}

// TestEncryptRequests: puts are encrypted under their own key, at any depth of a txn; ignore_value and keys
// outside pass as they are; a write that encryption pushes past the upstream's limit is refused.
func TestEncryptRequests(t *testing.T) {
	t.Parallel()
	e, ring := testEncrypt(t)
	put := func(k, v string) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(k), Value: []byte(v)}}}
	}
	txn := &pb.TxnRequest{Success: []*pb.RequestOp{put("/s/a", "1"), put("/t/a", "2"),
		{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{Failure: []*pb.RequestOp{put("/s/b", "3")}}}}}}
	up := &testUpstream{Answers: []Message{&pb.TxnResponse{}}}
	if _, err := serve(t, e, methodTxn, up, txn); err != nil || len(up.Got) != 1 {
		t.Fatalf("txn: %v", err)
	}
	got := up.Got[0].(*pb.TxnRequest)
	check := func(op *pb.RequestOp, want string) {
		t.Helper()
		p := op.GetRequestPut()
		v, _, err := ring.Decrypt(p.Key, p.Value)
		if err != nil || string(v) != want {
			t.Errorf("%s sent up as %q: %q, %v; want it encrypted, of %q", p.Key, p.Value, v, err, want)
		}
	}
	check(got.Success[0], "1")
	check(got.Success[2].GetRequestTxn().Failure[0], "3")
	if v := got.Success[1].GetRequestPut().Value; string(v) != "2" {
		t.Errorf("a put outside the prefix went up as %q", v)
	}

	up = &testUpstream{Answers: []Message{&pb.PutResponse{}}}
	if _, err := serve(t, e, methodPut, up, &pb.PutRequest{Key: []byte("/s/a"), IgnoreValue: true}); err != nil ||
		len(up.Got[0].(*pb.PutRequest).Value) != 0 {
		t.Errorf("ignore_value: %v, %v; want it passed with no value", err, up.Got)
	}

	// An election's value is stored under the name, a slash and the lease in hex; its leader is read back.
	up = &testUpstream{Answers: []Message{&v3electionpb.CampaignResponse{}}}
	if _, err := serve(t, e, "/v3electionpb.Election/Campaign", up, &v3electionpb.CampaignRequest{Name: []byte("/s/e"), Lease: 0x694d7a1b, Value: []byte("me")}); err != nil {
		t.Fatal(err)
	}
	if v, _, err := ring.Decrypt([]byte("/s/e/694d7a1b"), up.Got[0].(*v3electionpb.CampaignRequest).Value); err != nil || string(v) != "me" {
		t.Errorf("campaign value sent up: %q, %v; want it encrypted under /s/e/694d7a1b", v, err)
	}
	c, err := serve(t, e, "/v3electionpb.Election/Leader", &testUpstream{Answers: []Message{&v3electionpb.LeaderResponse{
		Kv: &mvccpb.KeyValue{Key: []byte("/s/e/694d7a1b"), Value: enc(t, ring, "/s/e/694d7a1b", "me")}}}}, &v3electionpb.LeaderRequest{Name: []byte("/s/e")})
	if err != nil || string(c.answer().(*v3electionpb.LeaderResponse).Kv.Value) != "me" {
		t.Errorf("leader: %v; want the value decrypted", err)
	}

	small := &Encrypt{Prefixes: e.Prefixes, Keys: ring, MaxRequestBytes: 2000}
	up = &testUpstream{Answers: []Message{&pb.PutResponse{}}}
	_, err = serve(t, small, methodPut, up, &pb.PutRequest{Key: []byte("/s/a"), Value: bytes.Repeat([]byte("x"), 700)})
	if st, _ := status.FromError(err); err == nil || st.Code() != codes.InvalidArgument || len(up.Got) > 0 {
		t.Errorf("a put encrypted past the limit: %v; want InvalidArgument, nothing sent up", err)
	}
	up = &testUpstream{Answers: []Message{&pb.PutResponse{}}}
	if _, err := serve(t, small, methodPut, up, &pb.PutRequest{Key: []byte("/t/a"), Value: bytes.Repeat([]byte("x"), 1500)}); err != nil {
		t.Errorf("the same size outside the prefix: %v", err)
	}
}

// TestEncryptAnswers: values are decrypted with the request at hand: keys_only ranges have none, a txn's
// answers are matched with the branch it took, and an answer that does not fit its request fails.
func TestEncryptAnswers(t *testing.T) {
	t.Parallel()
	e, ring := testEncrypt(t)
	kv := func(k, v string) *mvccpb.KeyValue { return &mvccpb.KeyValue{Key: []byte(k), Value: []byte(v)} }
	ekv := func(k, v string) *mvccpb.KeyValue { return &mvccpb.KeyValue{Key: []byte(k), Value: enc(t, ring, k, v)} }

	up := &testUpstream{Answers: []Message{&pb.RangeResponse{Kvs: []*mvccpb.KeyValue{kv("/s/a", "")}}}}
	if _, err := serve(t, e, methodRange, up, &pb.RangeRequest{Key: []byte("/s/"), RangeEnd: []byte("/s0"), KeysOnly: true}); err != nil {
		t.Errorf("keys_only range: %v", err)
	}

	rangeOp := func(k string) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte(k)}}}
	}
	rangeAnswer := func(kvs ...*mvccpb.KeyValue) *pb.ResponseOp {
		return &pb.ResponseOp{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{Kvs: kvs}}}
	}
	req := &pb.TxnRequest{Success: []*pb.RequestOp{rangeOp("/s/a")}, Failure: []*pb.RequestOp{rangeOp("/s/b"), rangeOp("/t/c")}}
	c, err := serve(t, e, methodTxn, &testUpstream{Answers: []Message{&pb.TxnResponse{Succeeded: false,
		Responses: []*pb.ResponseOp{rangeAnswer(ekv("/s/b", "B")), rangeAnswer(kv("/t/c", "C"))}}}}, req)
	if err != nil {
		t.Fatal(err)
	}
	r := c.answer().(*pb.TxnResponse)
	if v := r.Responses[0].GetResponseRange().Kvs[0].Value; string(v) != "B" {
		t.Errorf("the failure branch's range: %q; want B", v)
	}
	_, err = serve(t, e, methodTxn, &testUpstream{Answers: []Message{&pb.TxnResponse{Succeeded: true,
		Responses: []*pb.ResponseOp{rangeAnswer(ekv("/s/b", "B")), rangeAnswer(kv("/t/c", "C"))}}}}, req)
	if st, _ := status.FromError(err); st.Code() != codes.DataLoss {
		t.Errorf("a txn answer that does not fit its branch: %v; want DataLoss", err)
	}
}

// TestEncryptWatchCancel: an event that does not decrypt cancels its watch: the client gets the events before
// it and a canceled answer with the reason, the upstream a cancel request; what the upstream sends for that
// watch until it confirms is dropped, the confirmation too; other watches go on.
func TestEncryptWatchCancel(t *testing.T) {
	t.Parallel()
	e, ring := testEncrypt(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newCall(t, methodWatch, &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: []byte("/s/"), RangeEnd: []byte("/s0")}}})
	c.Ctx = ctx
	put := func(k string, v []byte) *mvccpb.Event {
		return &mvccpb.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{Key: []byte(k), Value: v}}
	}
	var upSaw []any
	err := serveChain(e, c, func(s Stream) error {
		send := func(r *pb.WatchResponse) {
			if err := s.SendMsg(r); err != nil {
				t.Fatal(err)
			}
		}
		m, err := s.RecvMsg()
		if err != nil {
			return err
		}
		upSaw = append(upSaw, m)
		send(&pb.WatchResponse{WatchId: 7, Created: true})
		send(&pb.WatchResponse{WatchId: 7, Events: []*mvccpb.Event{
			put("/s/a", enc(t, ring, "/s/a", "good")), {Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte("/s/a")}},
			put("/s/b", []byte("plain")), put("/s/c", enc(t, ring, "/s/c", "after"))}})
		m, err = s.RecvMsg()
		if err != nil {
			return err
		}
		upSaw = append(upSaw, m)
		send(&pb.WatchResponse{WatchId: 7, Events: []*mvccpb.Event{put("/s/d", enc(t, ring, "/s/d", "late"))}})
		send(&pb.WatchResponse{WatchId: 8, Events: []*mvccpb.Event{put("/s/e", enc(t, ring, "/s/e", "other"))}})
		send(&pb.WatchResponse{WatchId: 7, Canceled: true})
		send(&pb.WatchResponse{WatchId: 7, Created: true})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(upSaw) != 2 || upSaw[1].(*pb.WatchRequest).GetCancelRequest().GetWatchId() != 7 {
		t.Errorf("the upstream got %v; want the create, then a cancel of watch 7", upSaw)
	}
	var got []string
	for _, a := range c.answers() {
		r := a.(*pb.WatchResponse)
		s := []string{string(rune('0' + r.WatchId))}
		if r.Created {
			s = append(s, "created")
		}
		if r.Canceled {
			s = append(s, "canceled: "+r.CancelReason)
		}
		for _, ev := range r.Events {
			s = append(s, ev.Type.String()+" "+string(ev.Kv.Key)+"="+string(ev.Kv.Value))
		}
		got = append(got, strings.Join(s, " "))
	}
	want := []string{"7 created", "7 PUT /s/a=good DELETE /s/a=", "7 canceled: " + msgEncWatch, "8 PUT /s/e=other", "7 created"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("the client got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if e.WatchesCanceled() != 1 {
		t.Errorf("WatchesCanceled = %d; want 1", e.WatchesCanceled())
	}
}

// TestEncryptV2Stream: a stream=true watch is decrypted an event per Read, so that each is flushed as it comes;
// etcd's error objects pass as they are; an event that does not decrypt ends the stream with an error object.
func TestEncryptV2Stream(t *testing.T) {
	t.Parallel()
	e, ring := testEncrypt(t)
	good := string(enc(t, ring, "/s/a", "one"))
	pr, pw := io.Pipe()
	req := httptest.NewRequest(http.MethodGet, "/v2/keys/s/?wait=true&recursive=true&stream=true", nil)
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Body: pr, ContentLength: -1, Request: req}
	if fn, err := e.Response(resp); fn != nil || err != nil {
		t.Fatalf("Response = %v, %v; want the body wrapped, not claimed", fn, err)
	}
	write := func(s string) {
		go func() { _, _ = io.WriteString(pw, s) }()
	}
	read := func() string {
		b := make([]byte, 64<<10)
		n, err := resp.Body.Read(b)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		return string(b[:n])
	}
	write(`{"action":"set","node":{"key":"/s/a","value":` + strconv.Quote(good) + `,"modifiedIndex":5,"createdIndex":5}}` + "\n")
	if got := read(); got != `{"action":"set","node":{"key":"/s/a","value":"one","modifiedIndex":5,"createdIndex":5}}`+"\n" {
		t.Errorf("first event: %s", got)
	}
	write(`{"errorCode":401,"message":"The event in requested index is outdated and cleared","index":9}` + "\n")
	if got := read(); !strings.HasPrefix(got, `{"errorCode":401`) {
		t.Errorf("an error object: %s", got)
	}
	write(`{"action":"set","node":{"key":"/s/b","value":"plain","modifiedIndex":6,"createdIndex":6}}` + "\n")
	if got := read(); !strings.Contains(got, msgEncWatch) {
		t.Errorf("an event that does not decrypt: %s; want the error object", got)
	}
	if n, err := resp.Body.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Errorf("after the error: %d, %v; want the stream ended", n, err)
	}
	_ = resp.Body.Close()
}

// endless serves `{"action":"set","node":{"key":"/s/a","value":"aaa…`, a value that does not end (up to 4 MiB,
// then EOF), counting what it served.
type endless struct{ served int }

func (r *endless) Read(p []byte) (int, error) {
	const head, most = `{"action":"set","node":{"key":"/s/a","value":"`, 4 << 20
	if r.served >= most {
		return 0, io.EOF
	}
	n := min(len(p), most-r.served)
	for i := range n {
		if r.served+i < len(head) {
			p[i] = head[r.served+i]
		} else {
			p[i] = 'a'
		}
	}
	r.served += n
	return n, nil
}

// TestEncryptV2StreamBound: an event of a stream=true watch that does not end (a hostile upstream) ends the
// stream once it passes the bound, instead of being buffered whole.
func TestEncryptV2StreamBound(t *testing.T) {
	t.Parallel()
	e, _ := testEncrypt(t)
	up := &endless{}
	req := httptest.NewRequest(http.MethodGet, "/v2/keys/s/?wait=true&recursive=true&stream=true", nil)
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Body: io.NopCloser(up), ContentLength: -1, Request: req}
	if fn, err := e.Response(resp); fn != nil || err != nil {
		t.Fatalf("Response = %v, %v; want the body wrapped, not claimed", fn, err)
	}
	const bound = 64 << 10
	resp.Body.(*v2EventStream).max = bound
	if _, err := resp.Body.Read(make([]byte, 512)); !errors.Is(err, errBodyTooLargeToDecrypt) {
		t.Errorf("read: %v; want %v", err, errBodyTooLargeToDecrypt)
	}
	if up.served > bound {
		t.Errorf("%d bytes read from the upstream; want at most %d", up.served, bound)
	}
}

// TestEncryptV2Requests: prevValue is refused under an encrypted prefix (query or form) and passes elsewhere; an
// in-order create is bound to its directory.
func TestEncryptV2Requests(t *testing.T) {
	t.Parallel()
	e, ring := testEncrypt(t)
	form := func(method, target, body string) *http.Request {
		r := httptest.NewRequest(method, target, strings.NewReader(body))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		return r
	}
	for _, r := range []*http.Request{form(http.MethodPut, "/v2/keys/s/a?prevValue=x", "value=y"),
		form(http.MethodPut, "/v2/keys/s/a", "value=y&prevValue=x"), form(http.MethodDelete, "/v2/keys/s/a?prevValue=x", "")} {
		if reply, err := e.Request(r); err != nil || reply == nil || reply.StatusCode != http.StatusBadRequest {
			t.Errorf("%s %s: %v, %v; want 400", r.Method, r.URL, reply, err)
		}
	}
	if reply, err := e.Request(form(http.MethodPut, "/v2/keys/t/a?prevValue=x", "value=y")); reply != nil || err != nil {
		t.Errorf("prevValue outside the prefix: %v, %v", reply, err)
	}
	r := form(http.MethodPost, "/v2/keys/s", "value=job")
	if reply, err := e.Request(r); reply != nil || err != nil {
		t.Fatalf("POST: %v, %v", reply, err)
	}
	b, _ := io.ReadAll(r.Body)
	vs, _ := url.ParseQuery(string(b))
	if v, _, err := ring.Decrypt([]byte("/s/00000000000000000007"), []byte(vs.Get("value"))); err != nil || string(v) != "job" ||
		r.ContentLength != int64(len(b)) {
		t.Errorf("POSTed value %q: %q, %v; want it bound to the directory", vs.Get("value"), v, err)
	}
}

// TestEncryptRawOnDecryptError: under a resource with RawOnDecryptError a value that does not decrypt (tampered
// with, plaintext) reads as it is stored, v3 and v2, and is counted as failed; under one without, the same
// read fails; values that decrypt read as their plaintext in both.
func TestEncryptRawOnDecryptError(t *testing.T) {
	t.Parallel()
	_, ring := testEncrypt(t)
	e := &Encrypt{Resources: []EncryptResource{{Prefixes: []string{"/raw/"}, Keys: ring, RawOnDecryptError: true},
		{Prefixes: []string{"/s/"}, Keys: ring}}}
	tampered := func(k string) []byte {
		b := enc(t, ring, k, "secret")
		b[len(b)-3] ^= 1
		return b
	}
	for _, prefix := range []string{"/raw/", "/s/"} {
		bad, moved := tampered(prefix+"a"), enc(t, ring, "/elsewhere", "moved")
		kvs := []*mvccpb.KeyValue{{Key: []byte(prefix + "a"), Value: bad}, {Key: []byte(prefix + "b"), Value: []byte("plain")},
			{Key: []byte(prefix + "c"), Value: moved}, {Key: []byte(prefix + "d"), Value: enc(t, ring, prefix+"d", "good")}}
		before := failures(ring)
		c, err := serve(t, e, methodRange, &testUpstream{Answers: []Message{&pb.RangeResponse{Kvs: kvs}}},
			&pb.RangeRequest{Key: []byte(prefix), RangeEnd: []byte(prefix[:len(prefix)-1] + "0")})
		if prefix == "/s/" {
			if st, _ := status.FromError(err); st.Code() != codes.DataLoss {
				t.Errorf("without raw: %v; want DataLoss", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("raw: %v", err)
		}
		got := c.answer().(*pb.RangeResponse).Kvs
		for i, want := range [][]byte{bad, []byte("plain"), moved, []byte("good")} {
			if !bytes.Equal(got[i].Value, want) {
				t.Errorf("raw: %s = %.40q; want %.40q", got[i].Key, got[i].Value, want)
			}
		}
		if n := failures(ring) - before; n != 3 {
			t.Errorf("raw: %d failures counted; want 3", n)
		}
	}
	// v2: a node's value, the same way.
	for prefix, wantErr := range map[string]bool{"/raw/": false, "/s/": true} {
		v := string(tampered(prefix + "a"))
		n := &v2store.NodeExtern{Key: prefix + "a", Value: &v}
		err := e.v2Node(n)
		if (err != nil) != wantErr || (!wantErr && *n.Value != v) {
			t.Errorf("v2 %s: %v, %.40q", prefix, err, *n.Value)
		}
	}
}

func failures(r *crypt.Keyring) uint64 {
	n := r.UnattributedFailures()
	for _, s := range r.Stats() {
		n += s.Failures
	}
	return n
}
