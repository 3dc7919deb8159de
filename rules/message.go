package rules

import (
	"context"

	"google.golang.org/grpc/metadata"
)

// The message half of the chain: rules for gRPC calls (v3, and the JSON gateway, which the proxy serves through
// its own gRPC path). The proxy relays a call's messages as opaque bytes unless a rule claims the method's
// messages; only then are they decoded, one at a time, into etcd's own types — so streams stream, and a
// method nobody claims costs no decoding.

// Claim is what a rule sees of a call.
type Claim uint8

const (
	// ClaimNone: the rule does not see the call.
	ClaimNone Claim = iota
	// ClaimCall: the rule sees the call and its metadata; its messages pass as opaque values it must not
	// look into.
	ClaimCall
	// ClaimMessages: the rule sees the call's messages decoded into the Method's message types.
	ClaimMessages
)

// MessageRule acts on gRPC calls. The chain is a fold, as gRPC's stream interceptors are: the first rule's
// Serve gets the call and a next that runs the rest of the chain and, at its end, the upstream.
type MessageRule interface {
	// Name identifies the rule in errors, logs and metrics.
	Name() string
	// Claim says what the rule sees of the calls of m (m.Name for methods etcd does not serve, with both
	// streams set). It is asked once per method.
	Claim(m *Method) Claim
	// Serve runs the rule around one call. It may change s.Header() before calling next; read and change the
	// messages in both directions by handing next a Stream of its own that wraps s (RecvMsg: the client's
	// requests; SendMsg: the answers going to the client); answer the call itself, not calling next; or end
	// it with a status (status.Error from google.golang.org/grpc/status), which is what it returns. An error
	// that is not a status ends the call with Internal and a fixed message; the error goes to the log.
	Serve(s Stream, next Handler) error
}

// Handler runs the rest of the chain on a call.
type Handler func(s Stream) error

// Stream is one call as a message rule sees it.
type Stream interface {
	// Context is the call's: it ends when the client goes away or the call is ended.
	Context() context.Context
	// Method is what is known of the called method.
	Method() *Method
	// Header is the request metadata that goes up with the call; a rule may change it before calling next.
	Header() metadata.MD
	// RecvMsg returns the client's next request: a Message of the method's request type when the messages are
	// claimed, else an opaque value. io.EOF: the client has sent all.
	RecvMsg() (any, error)
	// SendMsg sends an answer to the client: a Message of the method's response type, or an opaque value
	// from below passed on.
	SendMsg(m any) error
}

// StreamFuncs is a Stream whose RecvMsg and SendMsg a rule replaces, each only if set: the usual way to look at
// or change messages on their way.
type StreamFuncs struct {
	Stream
	// Recv, if set, receives in place of Stream.RecvMsg (it may call it).
	Recv func() (any, error)
	// Send, if set, sends in place of Stream.SendMsg (it may call it).
	Send func(m any) error
}

// RecvMsg implements Stream.
func (s *StreamFuncs) RecvMsg() (any, error) {
	if s.Recv != nil {
		return s.Recv()
	}
	return s.Stream.RecvMsg()
}

// SendMsg implements Stream.
func (s *StreamFuncs) SendMsg(m any) error {
	if s.Send != nil {
		return s.Send(m)
	}
	return s.Stream.SendMsg(m)
}

var _ Stream = (*StreamFuncs)(nil)
