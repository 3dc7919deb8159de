package rules

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// Rule is a rule's HTTP half (v2, and everything else that comes over HTTP; gRPC calls go to the message half,
// MessageRule, which the same value may implement too). It acts on the requests going up to the upstream and on
// the responses coming back. The proxy runs the request side first rule to last and the response side last rule
// to first, so a chain reads like a stack. A rule always sees the request and the response after hop-by-hop
// headers have been removed.
type Rule interface {
	// Name identifies the rule in errors, logs and metrics.
	Name() string
	// Request may change req before it is forwarded. A non-nil response answers the client without contacting
	// the upstream: the rules after this one are skipped, and the response sides of the rules before it still
	// see the answer. Use Reply to build an error in etcd's style.
	Request(req *http.Request) (*http.Response, error)
	// Response may change resp's status and headers; it runs before the body is read and decides from the
	// status, the request (resp.Request) and the headers alone. A rule that needs the body claims it by
	// returning a BodyFunc: only then is the body buffered, up to a bound, and handed to the function.
	// Responses nobody claims, watches above all, stream through untouched.
	Response(resp *http.Response) (BodyFunc, error)
}

// BodyFunc rewrites a claimed response body. It gets the whole body and returns the new one; the proxy fixes
// Content-Length.
type BodyFunc func(body []byte) ([]byte, error)

// Passthrough is a Rule half that does nothing: embed it and implement only the side you need.
type Passthrough struct{}

// Request forwards req unchanged.
func (Passthrough) Request(*http.Request) (*http.Response, error) { return nil, nil }

// Response leaves resp as it is and claims no body.
func (Passthrough) Response(*http.Response) (BodyFunc, error) { return nil, nil }

// Self is the one member that every membership view shows: the proxy itself.
type Self struct {
	// ID is stable for a set of advertise URLs (see NewSelf) and never an upstream member's.
	ID uint64
	// Name is --name.
	Name string
	// ClientURLs are the advertise client URLs.
	ClientURLs []string
}

// NewSelf derives the member ID from the advertise URLs, independent of their order, so that a restarted proxy
// keeps its ID and two proxies that advertise different URLs never share one.
func NewSelf(name string, clientURLs []string) Self {
	urls := slices.Clone(clientURLs)
	slices.Sort(urls)
	sum := sha256.Sum256([]byte("etcd-proxy-proxy\x00" + strings.Join(urls, "\x00")))
	id := binary.BigEndian.Uint64(sum[:8])
	if id == 0 { // etcd treats ID 0 as "none"
		id = 1
	}
	return Self{ID: id, Name: name, ClientURLs: slices.Clone(clientURLs)}
}

// IDString is the ID as etcd prints it: lower-case hex without leading zeros.
func (s Self) IDString() string { return strconv.FormatUint(s.ID, 16) }

// Error is an answer in etcd's error style, {"message": "..."} with an HTTP status.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Reply builds the response that answers req with an etcd-style JSON error.
func Reply(req *http.Request, status int, message string) *http.Response {
	b, _ := json.Marshal(&Error{Status: status, Message: message})
	return JSONResponse(req, status, append(b, '\n'))
}

// JSONResponse builds a complete JSON response to req.
func JSONResponse(req *http.Request, status int, body []byte) *http.Response {
	h := make(http.Header, 2)
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	return &http.Response{
		Status:        fmt.Sprintf("%d %s", status, http.StatusText(status)),
		StatusCode:    status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       req,
	}
}
