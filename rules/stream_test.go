package rules

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"testing"

	"google.golang.org/grpc/metadata"
)

// The message rules' test bench: a call as the proxy's gRPC core (proxy/grpccore.go) hands it to a chain, and an
// upstream that answers it. Messages cross both as the core's codec sends them: encoded on one side and decoded
// on the other, so unknown fields travel as they would (XXX_unrecognized), and a rule that claims only the call
// sees opaque values it cannot look into.

// testCall is one call from a client: the base Stream of a chain.
type testCall struct {
	t      testing.TB
	Ctx    context.Context
	method *Method
	md     metadata.MD
	// decode: the method's messages are decoded (a rule of the chain claims them).
	decode bool
	// reqs are the client's requests, sent in order, then io.EOF.
	reqs []Message
	// Sent are the answers the client got, encoded.
	Sent [][]byte
	// SendErr, if set, fails every SendMsg: the client has gone.
	SendErr error
	// SendHook, if set, is called before each answer with the number sent so far; an error fails SendMsg.
	SendHook func(n int) error
}

// opaque is a message relayed undecoded (the core's frame).
type opaque struct{ b []byte }

// newCall is a call of a method of etcd's table (or an unknown one, as the core makes it) with requests.
func newCall(t testing.TB, name string, reqs ...Message) *testCall {
	m := LookupMethod(name)
	if m == nil {
		m = &Method{Name: name, ClientStream: true, ServerStream: true}
	}
	return &testCall{t: t, Ctx: context.Background(), method: m, md: metadata.MD{}, reqs: reqs}
}

func (c *testCall) Context() context.Context { return c.Ctx }
func (c *testCall) Method() *Method          { return c.method }
func (c *testCall) Header() metadata.MD      { return c.md }

func (c *testCall) RecvMsg() (any, error) {
	if len(c.reqs) == 0 {
		return nil, io.EOF
	}
	m := c.reqs[0]
	c.reqs = c.reqs[1:]
	b := mustMarshal(c.t, m)
	if !c.decode || c.method.NewRequest == nil {
		return &opaque{b}, nil
	}
	r := c.method.NewRequest()
	if err := r.Unmarshal(b); err != nil {
		c.t.Fatalf("decoding a %T: %v", r, err)
	}
	return r, nil
}

func (c *testCall) SendMsg(m any) error {
	if c.SendErr != nil {
		return c.SendErr
	}
	if c.SendHook != nil {
		if err := c.SendHook(len(c.Sent)); err != nil {
			return err
		}
	}
	switch m := m.(type) {
	case *opaque:
		c.Sent = append(c.Sent, m.b)
	case Message:
		if c.decode && reflect.TypeOf(m) != reflect.TypeOf(c.method.NewResponse()) {
			return fmt.Errorf("a %T sent as an answer of %s", m, c.method.Name)
		}
		c.Sent = append(c.Sent, mustMarshal(c.t, m))
	default:
		return fmt.Errorf("cannot encode a %T", m)
	}
	return nil
}

// answers decodes what the client got as the method's responses.
func (c *testCall) answers() []Message {
	c.t.Helper()
	out := make([]Message, 0, len(c.Sent))
	for _, b := range c.Sent {
		r := c.method.NewResponse()
		if err := r.Unmarshal(b); err != nil {
			c.t.Fatalf("the client cannot decode an answer: %v", err)
		}
		out = append(out, r)
	}
	return out
}

// answer is the one answer of a unary call.
func (c *testCall) answer() Message {
	c.t.Helper()
	a := c.answers()
	if len(a) != 1 {
		c.t.Fatalf("the client got %d answers, want one", len(a))
	}
	return a[0]
}

func mustMarshal(t testing.TB, m Message) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatalf("encoding a %T: %v", m, err)
	}
	return b
}

// serveChain runs rule on the call as the core does: a rule that claims nothing is not in the chain, and the
// messages are decoded only when it claims them. next plays the rest of the chain and the upstream.
func serveChain(rule MessageRule, c *testCall, next Handler) error {
	claim := rule.Claim(c.method)
	c.decode = claim == ClaimMessages && c.method.NewRequest != nil
	if claim == ClaimNone {
		return next(c)
	}
	return rule.Serve(c, next)
}

// testUpstream answers a call with canned answers and then err (a status, or nil for OK).
type testUpstream struct {
	Answers []Message
	Err     error

	// What it saw.
	Called  bool
	MD      metadata.MD
	Got     []any // the requests it received
	Relayed int   // the answers handed on before one failed
	Failed  error // why handing on an answer failed
}

// handler is the upstream's end of c's chain.
func (u *testUpstream) handler(c *testCall) Handler {
	return func(s Stream) error {
		u.Called = true
		u.MD = s.Header().Copy()
		for {
			m, err := s.RecvMsg()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err // the client's side (or a rule on its way) ended the call
			}
			u.Got = append(u.Got, m)
			if !c.method.ClientStream {
				break
			}
		}
		for _, a := range u.Answers {
			b := mustMarshal(c.t, a)
			var m any = &opaque{b}
			if c.decode {
				r := c.method.NewResponse()
				if err := r.Unmarshal(b); err != nil {
					c.t.Fatalf("decoding a %T: %v", r, err)
				}
				m = r
			}
			if err := s.SendMsg(m); err != nil {
				// As the core: the upstream stream ends, the error goes up wrapped.
				u.Failed = err
				return fmt.Errorf("relaying an answer: %w", err)
			}
			u.Relayed++
		}
		return u.Err
	}
}

// serve runs rule on a call of method with reqs against an upstream that answers with answers and then err.
func serve(t testing.TB, rule MessageRule, method string, up *testUpstream, reqs ...Message) (*testCall, error) {
	c := newCall(t, method, reqs...)
	if up == nil {
		up = &testUpstream{}
	}
	return c, serveChain(rule, c, up.handler(c))
}
