// Package rules holds the chain that etcd-proxy-proxy applies to what it forwards, and its built-in rules.
//
// A rule has up to two halves. The HTTP half (Rule) sees v2 and everything else that comes over HTTP: Request
// may change a request or answer it, Response may change a response's status and headers and claims its body
// only by returning a BodyFunc. The message half (MessageRule) sees gRPC calls, v3's, and the v3 JSON
// gateway's, which the proxy serves through its gRPC path: Claim says per method whether the rule sees the call
// and whether its messages are decoded into etcd's types (methods nobody claims pass as bytes), and Serve runs
// around the call as a gRPC stream interceptor does, with next running the rest of the chain and the upstream.
//
// Default is the chain, in order, with a reason beside each rule; a rule implements either half or both. The
// example rules in example_test.go show one of each: a response header, and ProtectPrefix, which refuses
// deletes under a prefix however they are wrapped.
package rules
