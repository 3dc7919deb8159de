package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
)

// errRequestTooLarge: a request body, or one message of a gRPC call, is larger than --max-request-bytes.
var errRequestTooLarge = errors.New("request too large")

// limitRequest bounds the body of r: a request that says it is too large is answered at once (it reports
// false); one that turns out too large while it is sent fails there, before the upstream has all of it, so the
// upstream acts on none of it. gRPC calls are bounded per message by the gRPC core (grpccore.go).
func (f *Forwarder) limitRequest(w http.ResponseWriter, r *http.Request) (*http.Request, bool) {
	if r.Body == nil || r.Body == http.NoBody {
		return r, true
	}
	if r.ContentLength > f.maxRequestBytes {
		f.tooLarge(w, r)
		return r, false
	}
	// net/http's HTTP/1 writers report a body's read error without wrapping it: the body is found again from
	// the request's context.
	b := &limitBody{ReadCloser: r.Body, left: f.maxRequestBytes}
	r = r.WithContext(context.WithValue(r.Context(), limitKey{}, b))
	r.Body = b
	return r, true
}

type limitKey struct{}

// exceeded reports whether r's body went over the limit (handleError).
func exceeded(r *http.Request, err error) bool {
	if b, ok := r.Context().Value(limitKey{}).(*limitBody); ok && b.exceeded {
		return true
	}
	return errors.Is(err, errRequestTooLarge)
}

// msgTooLarge is what a client whose request went over --max-request-bytes reads.
const msgTooLarge = "etcd-proxy-proxy: request larger than --max-request-bytes"

// tooLarge answers a request over the limit: 413 as etcd's v2 API would.
func (f *Forwarder) tooLarge(w http.ResponseWriter, _ *http.Request) {
	writeError(w, http.StatusRequestEntityTooLarge, f.msgTooLarge())
}

// msgTooLarge is msgTooLarge with the limit.
func (f *Forwarder) msgTooLarge() string {
	return msgTooLarge + " (" + strconv.FormatInt(f.maxRequestBytes, 10) + " bytes)"
}

// limitBody fails a body once it has gone past its limit, and remembers a body the client broke.
type limitBody struct {
	io.ReadCloser
	left     int64
	exceeded bool
	// broken: reading the client's body failed (a bad chunk size, a connection cut mid-body): the client's fault,
	// answered 400, not an upstream failure.
	broken bool
}

// malformed reports whether reading r's body from the client failed (handleError).
func malformed(r *http.Request) bool {
	b, ok := r.Context().Value(limitKey{}).(*limitBody)
	return ok && b.broken
}

// msgMalformed is what a client whose request body could not be read gets.
const msgMalformed = "etcd-proxy-proxy: malformed request body"

func (b *limitBody) Read(p []byte) (int, error) {
	if b.left < int64(len(p)) {
		p = p[:b.left+1] // one byte more than allowed tells a body at the limit from one over it
	}
	n, err := b.ReadCloser.Read(p)
	if int64(n) > b.left {
		b.exceeded = true
		n, b.left = int(b.left), 0
		return n, errRequestTooLarge
	}
	b.left -= int64(n)
	if err != nil && err != io.EOF {
		b.broken = true
	}
	return n, err
}
