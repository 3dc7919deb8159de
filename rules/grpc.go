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
			return rewriteGRPC(body, &pb.StatusResponse{}, func(r *pb.StatusResponse) []byte {
				m.Self.stamp(r.Header)
				r.Leader = m.Self.ID
				m.Self.checkStatus(r)
				return statusNewerFields(r.XXX_unrecognized)
			})
		}
	case methodMemberList:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberListResponse{}, func(r *pb.MemberListResponse) []byte {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
				return nil
			})
		}
	case methodMemberAdd:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberAddResponse{}, func(r *pb.MemberAddResponse) []byte {
				r.Members = []*pb.Member{m.Self.v3()}
				hideURLs(r.Member)
				m.Self.stamp(r.Header)
				return nil
			})
		}
	case methodMemberRemove:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberRemoveResponse{}, func(r *pb.MemberRemoveResponse) []byte {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
				return nil
			})
		}
	case methodMemberUpdate:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberUpdateResponse{}, func(r *pb.MemberUpdateResponse) []byte {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
				return nil
			})
		}
	case methodMemberPromote:
		return func(body []byte) ([]byte, error) {
			return rewriteGRPC(body, &pb.MemberPromoteResponse{}, func(r *pb.MemberPromoteResponse) []byte {
				r.Members = []*pb.Member{m.Self.v3()}
				m.Self.stamp(r.Header)
				return nil
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

// hideURLs keeps the ID and learner flag of the member a change answered with. Its name goes too: etcd answers
// an add with the name empty (the member has not started), and anything else there comes from below.
func hideURLs(m *pb.Member) {
	if m != nil {
		m.Name, m.PeerURLs, m.ClientURLs = "", nil, nil
	}
}

// message is what the generated etcd (gogo) types implement.
type message interface {
	Marshal() ([]byte, error)
	Unmarshal([]byte) error
	// XXX_DiscardUnknown drops the fields the pinned schema does not know (gogo's XXX_unrecognized), in the
	// message and in every message it holds.
	XXX_DiscardUnknown()
}

// rewriteGRPC decodes the one message of a unary gRPC body into msg, lets edit change it, and frames it again.
// Every field the pinned schema does not know is dropped, in msg and in all it holds: an upstream of a newer
// schema (or one that is not etcd) may put anything there, addresses included, and the edit cannot see it. What
// edit returns is appended to the message: fields of a newer schema that the rule decoded, checked and encoded
// again (protobuf merges appended fields).
func rewriteGRPC[T message](body []byte, msg T, edit func(T) []byte) ([]byte, error) {
	payload, err := unframe(body)
	if err != nil {
		return nil, err
	}
	if err := msg.Unmarshal(payload); err != nil {
		return nil, fmt.Errorf("decoding %T: %w", msg, err)
	}
	extra := edit(msg)
	msg.XXX_DiscardUnknown()
	out, err := msg.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encoding %T: %w", msg, err)
	}
	framed := make([]byte, 5, 5+len(out)+len(extra))
	framed = append(append(framed, out...), extra...)
	binary.BigEndian.PutUint32(framed[1:5], uint32(len(out)+len(extra)))
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

// GRPCStatus keeps upstream addresses out of gRPC statuses. The hops below put them there: a stock grpc-proxy's
// Unavailable reads "... dial tcp 10.0.0.1:2379: connect: connection refused", a failed name lookup or
// certificate check names hosts, and an upstream of another kind may say anything. Free text cannot be scrubbed
// completely, so a status message passes only when it is known (KnownGRPCMessage: etcd's, grpc-go's and our own
// fixed texts); any other is replaced as a whole, by TransportFailure when it is about the connections below and
// by WithheldMessage of its code otherwise. grpc-status-details-bin is always dropped: etcd and grpc-go send none
// with these errors, and what it may hold (a copy of the message, any protobuf) cannot be checked. A grpc-status
// that is not a number becomes Unknown (a client would quote it in its error). Trailers-only headers are fixed at
// once, trailers when the stream ends; the messages of the stream pass untouched.
type GRPCStatus struct{ Passthrough }

// Name implements Rule.
func (*GRPCStatus) Name() string { return "grpc-status" }

// Response implements Rule.
func (*GRPCStatus) Response(resp *http.Response) (BodyFunc, error) {
	if resp.Request == nil || !IsGRPC(resp.Request) {
		return nil, nil
	}
	scrubGRPCStatus(resp.Header)
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
		scrubGRPCStatus(t.resp.Trailer)
	}
	return n, err
}

func (t *trailerScrubber) Close() error {
	err := t.ReadCloser.Close()
	scrubGRPCStatus(t.resp.Trailer)
	return err
}

// GRPCDetailsHeader carries the status as a protobuf (google.rpc.Status), message included.
const GRPCDetailsHeader = "Grpc-Status-Details-Bin"

// CodeUnknown is the code of a status whose grpc-status is not a number.
const CodeUnknown = 2

// scrubGRPCStatus makes the status in h (headers of a trailers-only answer, or trailers) fit for a client.
func scrubGRPCStatus(h http.Header) {
	if h == nil {
		return
	}
	h.Del(GRPCDetailsHeader)
	code := CodeUnknown
	if vs := h.Values(GRPCStatusHeader); len(vs) > 0 {
		if n, err := strconv.ParseUint(vs[0], 10, 32); err == nil {
			code = int(n)
		}
		h.Set(GRPCStatusHeader, strconv.Itoa(code))
	}
	vs := h.Values(GRPCMessageHeader)
	if len(vs) == 0 {
		return
	}
	msg, err := url.PathUnescape(vs[0])
	if err != nil {
		msg = vs[0]
	}
	if clean := ScrubGRPCMessage(code, msg); clean != "" {
		h.Set(GRPCMessageHeader, encodeGRPCMessage(clean))
	} else {
		h.Del(GRPCMessageHeader)
	}
}

// transportWords mark an error of the connections below the proxy.
var transportWords = regexp.MustCompile(`(?i)\b(lookup|dial|x509|tls|transport|certificate|connection error|connect)\b`)

// TransportFailure replaces a status message about the transport below the proxy.
const TransportFailure = "etcd-proxy-proxy: the connection to the upstream failed below the proxy"

// ScrubGRPCMessage returns the status message a client gets for a status of code with msg from below: msg itself
// when it is known (KnownGRPCMessage), else TransportFailure for an error of the connections below, else
// WithheldMessage(code), or nothing for OK.
func ScrubGRPCMessage(code int, msg string) string {
	switch {
	case KnownGRPCMessage(msg):
		return msg
	case transportWords.MatchString(msg):
		return TransportFailure
	}
	if code == 0 {
		return "" // a client ignores the message of OK
	}
	return WithheldMessage(code)
}

var _ Rule = (*GRPCStatus)(nil)
