package rules

// The test bench of stream_test.go, for the external tests (snapshot_test.go, example_test.go).
type (
	TestCall     = testCall
	TestUpstream = testUpstream
)

var (
	NewCall    = newCall
	ServeChain = serveChain
)

func (c *testCall) Answers() []Message              { return c.answers() }
func (u *testUpstream) Handler(c *testCall) Handler { return u.handler(c) }
