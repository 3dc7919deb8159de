package rules

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// gRPC wire names.
const (
	GRPCContentType   = "application/grpc"
	GRPCStatusHeader  = "Grpc-Status"
	GRPCMessageHeader = "Grpc-Message"
)

// gRPC status codes used here (google.golang.org/grpc/codes).
const (
	CodeDeadlineExceeded   = 4
	CodePermissionDenied   = 7
	CodeResourceExhausted  = 8
	CodeFailedPrecondition = 9
	CodeInternal           = 13
	CodeUnavailable        = 14
)

// IsGRPC reports whether req is a gRPC call.
func IsGRPC(req *http.Request) bool {
	return req.ProtoMajor == 2 && strings.HasPrefix(req.Header.Get("Content-Type"), GRPCContentType)
}

// GRPCReply answers a gRPC call with a status and no message (a trailers-only response).
func GRPCReply(req *http.Request, code int, message string) *http.Response {
	resp := JSONResponse(req, http.StatusOK, nil)
	SetGRPCStatus(resp.Header, code, message)
	resp.Header.Del("Content-Length")
	// Known to be empty: with an unknown length (-1) httputil.ReverseProxy starts a flush timer that fires at
	// once and can send the headers before the handler ends, splitting the trailers-only answer into headers
	// and an empty end of stream ("server closed the stream without sending trailers").
	resp.ContentLength = 0
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/2.0", 2, 0
	return resp
}

// SetGRPCStatus writes a trailers-only gRPC status into h.
func SetGRPCStatus(h http.Header, code int, message string) {
	h.Set("Content-Type", GRPCContentType)
	h.Set(GRPCStatusHeader, strconv.Itoa(code))
	h.Set(GRPCMessageHeader, encodeGRPCMessage(message))
}

// encodeGRPCMessage percent-encodes as the gRPC spec asks for Grpc-Message.
func encodeGRPCMessage(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= ' ' && c <= '~' && c != '%' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// gRPC methods of the Cluster service.
const (
	methodMemberList    = "/etcdserverpb.Cluster/MemberList"
	methodMemberAdd     = "/etcdserverpb.Cluster/MemberAdd"
	methodMemberRemove  = "/etcdserverpb.Cluster/MemberRemove"
	methodMemberUpdate  = "/etcdserverpb.Cluster/MemberUpdate"
	methodMemberPromote = "/etcdserverpb.Cluster/MemberPromote"
	methodStatus        = "/etcdserverpb.Maintenance/Status"
	methodMoveLeader    = "/etcdserverpb.Maintenance/MoveLeader"
)

func isMemberChange(method string) bool {
	switch method {
	case methodMemberAdd, methodMemberRemove, methodMemberUpdate, methodMemberPromote:
		return true
	}
	return false
}

// grpcRequest is the Members rule's request side for gRPC.
func (m *Members) grpcRequest(req *http.Request) (*http.Response, error) {
	if isMemberChange(req.URL.Path) && !m.Forward {
		return GRPCReply(req, CodePermissionDenied, memberChangeRejected), nil
	}
	if req.URL.Path == methodMoveLeader && !m.Forward {
		// The only member a client sees is the proxy: a transfer to it can only fail ("bad leader transferee").
		return GRPCReply(req, CodePermissionDenied, moveLeaderRejected), nil
	}
	return nil, nil
}

// grpcResponse claims the unary answers of the Cluster service that carry members.
func (m *Members) grpcResponse(resp *http.Response) BodyFunc {
	if resp.Header.Get(GRPCStatusHeader) != "" { // trailers-only: an error, no message
		return nil
	}
	switch resp.Request.URL.Path {
	case methodStatus: // the answering member is us, and as the only member we lead
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.StatusResponse{}, func(r *pb.StatusResponse) {
				m.Self.stamp(r.Header)
				r.Leader = m.Self.ID
			})
		}
	case methodMemberList:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberListResponse{}, func(r *pb.MemberListResponse) {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
			})
		}
	case methodMemberAdd:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberAddResponse{}, func(r *pb.MemberAddResponse) {
				r.Members = []*pb.Member{m.Self.v3()}
				hideURLs(r.Member)
				m.Self.stamp(r.Header)
			})
		}
	case methodMemberRemove:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberRemoveResponse{}, func(r *pb.MemberRemoveResponse) {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
			})
		}
	case methodMemberUpdate:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberUpdateResponse{}, func(r *pb.MemberUpdateResponse) {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
			})
		}
	case methodMemberPromote:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberPromoteResponse{}, func(r *pb.MemberPromoteResponse) {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
			})
		}
	}
	return nil
}

func (s Self) v3() *pb.Member {
	return &pb.Member{ID: s.ID, Name: s.Name, ClientURLs: s.ClientURLs}
}

// stamp makes a response header name us as the member that answered.
func (s Self) stamp(h *pb.ResponseHeader) {
	if h != nil {
		h.MemberId = s.ID
	}
}

func hideURLs(m *pb.Member) {
	if m != nil {
		m.PeerURLs, m.ClientURLs = nil, nil
	}
}

// message is what the generated etcd (gogo) types implement.
type message interface {
	Marshal() ([]byte, error)
	Unmarshal([]byte) error
}

// rewriteGRPC decodes the one message of a unary gRPC body into msg, lets edit change it, and frames it again.
func rewriteGRPC[T message](body []byte, msg T, edit func(T)) ([]byte, error) {
	payload, err := unframe(body)
	if err != nil {
		return nil, err
	}
	if err := msg.Unmarshal(payload); err != nil {
		return nil, fmt.Errorf("decoding %T: %w", msg, err)
	}
	edit(msg)
	out, err := msg.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encoding %T: %w", msg, err)
	}
	framed := make([]byte, 5+len(out))
	binary.BigEndian.PutUint32(framed[1:5], uint32(len(out)))
	copy(framed[5:], out)
	return framed, nil
}

// unframe returns the single message of a gRPC body, uncompressed. A compressed one (flag 1) is taken to be gzip,
// the one compressor etcd's clients use; the message goes back uncompressed (flag 0), which is valid whatever
// grpc-encoding says.
func unframe(body []byte) ([]byte, error) {
	if len(body) < 5 {
		return nil, errors.New("gRPC body shorter than a frame header")
	}
	n := binary.BigEndian.Uint32(body[1:5])
	if uint64(len(body)-5) != uint64(n) {
		return nil, errors.New("gRPC body is not exactly one message")
	}
	switch body[0] {
	case 0:
		return body[5:], nil
	case 1:
		zr, err := gzip.NewReader(bytes.NewReader(body[5:]))
		if err != nil {
			return nil, fmt.Errorf("compressed gRPC message: %w", err)
		}
		msg, err := io.ReadAll(io.LimitReader(zr, maxMessage+1))
		if err == nil && len(msg) > maxMessage {
			err = errors.New("too large")
		}
		if err != nil {
			return nil, fmt.Errorf("compressed gRPC message: %w", err)
		}
		return msg, nil
	}
	return nil, fmt.Errorf("gRPC frame flag %d", body[0])
}

// maxMessage bounds a decompressed message (membership answers are a few KiB).
const maxMessage = 4 << 20

// GRPCStatus keeps upstream addresses out of gRPC status messages. The hops below put them there: a stock
// grpc-proxy's Unavailable reads "... dial tcp 10.0.0.1:2379: connect: connection refused", a failed name lookup
// or certificate check names hosts. A message about the transport below is replaced as a whole (see
// ScrubGRPCMessage); in any other, addresses become "<upstream>". Trailers-only headers are fixed at once,
// trailers when the stream ends; the messages of the stream pass untouched.
type GRPCStatus struct{ Passthrough }

// Name implements Rule.
func (*GRPCStatus) Name() string { return "grpc-status" }

// Response implements Rule.
func (*GRPCStatus) Response(resp *http.Response) (BodyFunc, error) {
	if resp.Request == nil || !IsGRPC(resp.Request) {
		return nil, nil
	}
	scrubGRPCMessage(resp.Header)
	resp.Body = &trailerScrubber{ReadCloser: resp.Body, resp: resp}
	return nil, nil
}

// trailerScrubber scrubs the trailers when the body ends, before the proxy copies them.
type trailerScrubber struct {
	io.ReadCloser
	resp *http.Response
}

func (t *trailerScrubber) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if err == io.EOF {
		scrubGRPCMessage(t.resp.Trailer)
	}
	return n, err
}

func (t *trailerScrubber) Close() error {
	err := t.ReadCloser.Close()
	scrubGRPCMessage(t.resp.Trailer)
	return err
}

// addressPattern matches what names a host: URLs, IPv4 and bracketed IPv6 addresses, host:port.
var addressPattern = regexp.MustCompile(`(?i)(?:[a-z][a-z0-9+.-]*://[^\s"',]+)|(?:\[[0-9a-f:.%]+\](?::\d+)?)|(?:\b[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:%[a-z0-9]+)?)|(?:\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b)|(?:\b[a-z0-9][a-z0-9.-]*:\d{1,5}\b)`)

// GRPCDetailsHeader carries the status as a protobuf, message included.
const GRPCDetailsHeader = "Grpc-Status-Details-Bin"

func scrubGRPCMessage(h http.Header) {
	v := h.Get(GRPCMessageHeader)
	if v == "" {
		return
	}
	msg, err := url.PathUnescape(v)
	if err != nil {
		msg = v
	}
	if clean := ScrubGRPCMessage(msg); clean != msg {
		h.Set(GRPCMessageHeader, encodeGRPCMessage(clean))
		h.Del(GRPCDetailsHeader) // it repeats the message
	}
}

// transportWords mark an error of the connections below the proxy: such a message names hosts in more ways than
// a pattern can catch (host names of failed lookups, certificate names), so none of it is kept.
var transportWords = regexp.MustCompile(`(?i)\b(lookup|dial|x509|tls|transport|certificate|connection error|connect)\b`)

// TransportFailure replaces a status message about the transport below the proxy.
const TransportFailure = "etcd-proxy-proxy: the connection to the upstream failed below the proxy"

// ScrubGRPCMessage returns a status message fit for a client: a transport error is replaced as a whole, and in
// any other message every address becomes "<upstream>".
func ScrubGRPCMessage(msg string) string {
	if transportWords.MatchString(msg) {
		return TransportFailure
	}
	return ScrubAddresses(msg)
}

// ScrubAddresses replaces every URL, IP address and host:port in s with "<upstream>".
func ScrubAddresses(s string) string { return addressPattern.ReplaceAllString(s, "<upstream>") }

var _ Rule = (*GRPCStatus)(nil)
