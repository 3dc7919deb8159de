package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// errBodyTooLarge is returned when a claimed response body exceeds the bound.
var errBodyTooLarge = errors.New("upstream response too large to rewrite")

// ruleError is a rule's failure; its Rule names the rule, Err is for the log only.
type ruleError struct {
	Rule string
	Err  error
}

func (e *ruleError) Error() string { return "rule " + e.Rule + ": " + e.Err.Error() }
func (e *ruleError) Unwrap() error { return e.Err }

// chain runs rules in order on requests and in reverse order on responses.
type chain struct {
	rules   []rules.Rule
	maxBody int64
}

// request runs the request side of every rule. It returns the reply of the rule that answered, if one did, and
// how many rules saw the request (the response side runs for those).
func (c *chain) request(req *http.Request) (*http.Response, int, error) {
	for i, r := range c.rules {
		reply, err := r.Request(req)
		if err != nil {
			return nil, i, &ruleError{r.Name(), err}
		}
		if reply != nil {
			if reply.Request == nil {
				reply.Request = req
			}
			return reply, i, nil
		}
	}
	return nil, len(c.rules), nil
}

// response runs the response side of the first n rules, last to first. The body is read only when a rule
// claims it, and only up to maxBody.
func (c *chain) response(resp *http.Response, n int) error {
	var (
		body     []byte
		buffered bool
	)
	for i := n - 1; i >= 0; i-- {
		r := c.rules[i]
		fn, err := r.Response(resp)
		if err != nil {
			return &ruleError{r.Name(), err}
		}
		if fn == nil {
			continue
		}
		if !buffered {
			if body, err = c.readBody(resp); err != nil {
				return &ruleError{r.Name(), err}
			}
			buffered = true
		}
		if body, err = fn(body); err != nil {
			return &ruleError{r.Name(), err}
		}
	}
	if buffered {
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
	return nil
}

func (c *chain) readBody(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && ce != "identity" {
		return nil, fmt.Errorf("cannot rewrite a %s-encoded response", ce)
	}
	limit := c.maxBody
	if limit <= 0 {
		limit = DefaultMaxRuleBody
	}
	if resp.ContentLength > limit {
		return nil, errBodyTooLarge
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("reading the upstream response: %w", err)
	}
	if int64(len(body)) > limit {
		return nil, errBodyTooLarge
	}
	return body, nil
}
