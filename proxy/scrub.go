package proxy

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// knownAddrs are what names an upstream: the hosts of the endpoints (flags and discovery) and the addresses
// their connections reached (what the names resolved to). A hop that is not etcd — a load balancer, a CONNECT
// proxy, a web server on a member's address — may put them in any header or error text; scrubUpstream takes
// them out.
type knownAddrs struct {
	endpoints *endpointSet

	mu      sync.Mutex
	remotes map[string]bool // remote host:port of upstream connections, at most maxDialled
	// cache is the needle list and what it was built from; rebuilt when the endpoints or remotes change.
	cache atomic.Pointer[needleCache]
	gen   atomic.Uint64 // bumped when remotes grows
}

type needleCache struct {
	list    *[]*endpoint
	gen     uint64
	needles []string
}

// maxDialled bounds the remembered remote addresses: discovery can bring new members, DNS new addresses.
const maxDialled = 1024

// dialled remembers where an upstream connection went.
func (k *knownAddrs) dialled(c net.Conn) {
	addr := c.RemoteAddr().String()
	k.mu.Lock()
	if !k.remotes[addr] && len(k.remotes) < maxDialled {
		if k.remotes == nil {
			k.remotes = map[string]bool{}
		}
		k.remotes[addr] = true
		k.gen.Add(1)
	}
	k.mu.Unlock()
}

// needles are the strings to look for: every host:port, every host name and IP address that is not loopback
// (naming a loopback address tells a client nothing about the cluster, and the proxy's own address is one).
func (k *knownAddrs) needles() []string {
	list, gen := k.endpoints.list.Load(), k.gen.Load()
	if c := k.cache.Load(); c != nil && c.list == list && c.gen == gen {
		return c.needles
	}
	seen := map[string]bool{}
	var out []string
	add := func(hostport string) {
		host, _, err := net.SplitHostPort(hostport)
		if err != nil {
			host, hostport = hostport, ""
		}
		for _, s := range []string{hostport, host} {
			if s != "" && !seen[s] && (s == hostport || !loopback(s)) {
				seen[s] = true
				out = append(out, s)
			}
		}
	}
	for _, e := range k.endpoints.current() {
		add(e.url.Host)
	}
	k.mu.Lock()
	for a := range k.remotes {
		add(a)
	}
	k.mu.Unlock()
	k.cache.Store(&needleCache{list: list, gen: gen, needles: out})
	return out
}

func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(strings.Trim(host, "[]"))
	return err == nil && ip.IsLoopback()
}

// names reports whether s names one of the needles: an occurrence not run together with more of the same kind
// of name (127.0.0.1:2379 is not named by 127.0.0.1:23790, nor etcd-1 by etcd-10, nor etcd by etcdserver), while
// an address glued to other characters (x10.9.9.9:2379y) still counts.
func names(s string, needles []string) bool {
	for _, n := range needles {
		if _, ok := findName(s, n, 0); ok {
			return true
		}
	}
	return false
}

func findName(s, n string, from int) (int, bool) {
	for i := from; i+len(n) <= len(s); {
		j := strings.Index(s[i:], n)
		if j < 0 {
			return 0, false
		}
		at, end := i+j, i+j+len(n)
		if (at == 0 || apart(s[at-1], n[0])) && (end == len(s) || apart(s[end], n[len(n)-1])) {
			return at, true
		}
		i = at + 1
	}
	return 0, false
}

// apart reports whether c, next to a needle's edge character, ends the name there: after a digit only a
// non-digit does, after a letter only what cannot continue a host name.
func apart(c, edge byte) bool {
	digit := func(b byte) bool { return b >= '0' && b <= '9' }
	letter := func(b byte) bool { return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' }
	switch {
	case digit(edge):
		return !digit(c)
	case letter(edge):
		return !digit(c) && !letter(c) && c != '-'
	}
	return true
}

// replaceNames replaces every occurrence of a needle in s with "<upstream>".
func replaceNames(s string, needles []string) string {
	for _, n := range needles {
		for at, ok := findName(s, n, 0); ok; at, ok = findName(s, n, at) {
			s = s[:at] + "<upstream>" + s[at+len(n):]
		}
	}
	return s
}

// protocolHeaders carry no address whatever the hop below: they are not searched.
var protocolHeaders = map[string]bool{
	"Content-Type": true, "Content-Length": true, "Date": true, "Location": true, // Location: fixLocation
	"Grpc-Status": true, "Grpc-Message": true, "Grpc-Status-Details-Bin": true, // the grpc-status rule's
	"Grpc-Encoding": true, "Grpc-Accept-Encoding": true, "Trailer": true,
}

// maxErrorBody bounds the error answers whose message is searched: etcd's are a line.
const maxErrorBody = 64 << 10

// scrubUpstream drops every response header whose value names a known upstream address and, in a small v2 JSON error
// (status 400 and above), replaces such a name in "message" — never in "cause", which is the client's own key.
func (f *Forwarder) scrubUpstream(resp *http.Response) {
	needles := f.known.needles()
	if len(needles) == 0 {
		return
	}
	for k, vs := range resp.Header {
		if protocolHeaders[k] {
			continue
		}
		for _, v := range vs {
			if names(v, needles) {
				delete(resp.Header, k)
				break
			}
		}
	}
	if resp.StatusCode < 400 || resp.ContentLength < 0 || resp.ContentLength > maxErrorBody ||
		!strings.HasPrefix(resp.Request.URL.Path, "/v2/") ||
		!strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") || resp.Header.Get("Content-Encoding") != "" {
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	_ = resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return // the client gets what came, and the copy fails as it would have
	}
	var e struct {
		ErrorCode *int    `json:"errorCode,omitempty"`
		Message   string  `json:"message"`
		Cause     *string `json:"cause,omitempty"`
		Index     *uint64 `json:"index,omitempty"`
	}
	if !names(string(body), needles) || json.Unmarshal(body, &e) != nil || !names(e.Message, needles) {
		return
	}
	e.Message = replaceNames(e.Message, needles)
	out, _ := json.Marshal(&e) // etcd's order of fields; anything else the hop added is dropped with the name
	out = append(out, '\n')
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.ContentLength = int64(len(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
}
