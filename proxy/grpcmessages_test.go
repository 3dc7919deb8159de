package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// Every status message the forwarder answers a gRPC call with is in the GRPCStatus rule's allow-list, so that a
// proxy-proxy above passes it on instead of replacing it.
func TestGRPCAnswersKnown(t *testing.T) {
	t.Parallel()
	f := &Forwarder{log: slog.New(slog.DiscardHandler), maxRequestBytes: 1 << 20}
	shutdown, stop := context.WithCancelCause(context.Background())
	stop(errShuttingDown)
	errs := map[string]error{
		"rule":          &ruleError{Rule: "members", Err: errors.New("decoding")},
		"rule too big":  &ruleError{Rule: "members", Err: errBodyTooLarge},
		"tls":           x509.UnknownAuthorityError{},
		"no endpoint":   &noEndpointError{err: errors.New("all down")},
		"timeout":       context.DeadlineExceeded,
		"net timeout":   &net.OpError{Op: "dial", Err: os.ErrDeadlineExceeded},
		"refused":       &net.OpError{Op: "dial", Err: errors.New("connection refused")},
		"http/1":        fmt.Errorf("http2: unexpected frame"),
		"too large":     errRequestTooLarge,
		"shutting down": errors.New("stream ended"),
	}
	for name, err := range errs {
		req := httptest.NewRequest(http.MethodPost, "/etcdserverpb.KV/Range", nil)
		req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
		req.Header.Set("Content-Type", rules.GRPCContentType)
		if name == "shutting down" {
			req = req.WithContext(shutdown)
		}
		w := httptest.NewRecorder()
		f.handleError(w, req, err)
		msg, _ := url.PathUnescape(w.Header().Get(rules.GRPCMessageHeader))
		if msg == "" || !rules.KnownGRPCMessage(msg) {
			t.Errorf("%s: answered %q, which a proxy-proxy above would replace: add it to the rules' ownMessages", name, msg)
		}
		_, _ = io.Copy(io.Discard, w.Result().Body)
	}
	for _, msg := range []string{msgShuttingDown, msgTooLarge} { // the trailers of a drained stream
		if !rules.KnownGRPCMessage(msg) {
			t.Errorf("%q is not in the rules' ownMessages", msg)
		}
	}
}
