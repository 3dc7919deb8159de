package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-multierror"
)

// Env owns a directory, the PKI and every part started through it. Close tears the parts down in reverse start
// order. An Env is safe for concurrent use by parallel subtests.
type Env struct {
	// Dir holds every file the parts write: PKI, member data, logs. It is not removed by Close.
	Dir string
	// PKI is the certificate authorities of this environment, created by NewEnv.
	PKI *PKI
	// Logf receives progress messages (what started where). Nil means silent.
	Logf func(format string, args ...any)

	mu       sync.Mutex
	closers  []closer
	closed   bool
	repl     []replacement
	replacer *strings.Replacer // rebuilt lazily from repl; nil after a Register
	counts   map[string]int    // per kind of part, how many were started (for unique names)
}

type closer struct {
	name string
	fn   func() error
}

type replacement struct {
	value, placeholder string
	word               bool // replace only whole-word occurrences
}

// NewEnv creates an environment rooted at dir (created if missing) with a fresh PKI under dir/pki. The caller
// calls Close.
func NewEnv(dir string) (*Env, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("harness: env dir %q: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("harness: create env dir: %w", err)
	}
	e := &Env{Dir: abs, counts: map[string]int{}}
	pki, err := NewPKI(filepath.Join(abs, "pki"))
	if err != nil {
		return nil, err
	}
	e.PKI = pki
	e.Register(abs, "$DIR")
	if real, err := filepath.EvalSymlinks(abs); err == nil && real != abs {
		e.Register(real, "$DIR")
	}
	return e, nil
}

// NewTestEnv creates an environment in t.TempDir() that logs to t.Logf and is closed by t.Cleanup, failing the
// test if any part fails to stop.
func NewTestEnv(t testing.TB) *Env {
	t.Helper()
	e, err := NewEnv(t.TempDir())
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	var mu sync.Mutex
	done := false
	// t.Logf panics once the test has finished; parts may still log from their own goroutines while stopping.
	e.Logf = func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Logf(format, args...)
		}
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("harness: teardown: %v", err)
		}
		mu.Lock()
		done = true
		mu.Unlock()
	})
	return e
}

// Defer registers fn to run at Close, before everything registered earlier. name says what fn stops, for errors.
// If the Env is already closed, fn runs at once.
func (e *Env) Defer(name string, fn func() error) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		if err := fn(); err != nil {
			e.logf("harness: stop %s after close: %v", name, err)
		}
		return
	}
	e.closers = append(e.closers, closer{name: name, fn: fn})
	e.mu.Unlock()
}

// Close stops every part in reverse start order and returns all the errors, each prefixed with the part's name.
// Calling Close again is a no-op.
func (e *Env) Close() error {
	e.mu.Lock()
	cs := e.closers
	e.closers = nil
	e.closed = true
	e.mu.Unlock()
	var errs *multierror.Error
	for i := len(cs) - 1; i >= 0; i-- {
		if err := cs[i].fn(); err != nil {
			errs = multierror.Append(errs, fmt.Errorf("stop %s: %w", cs[i].name, err))
		}
	}
	return errs.ErrorOrNil()
}

func (e *Env) logf(format string, args ...any) {
	if e.Logf != nil {
		e.Logf(format, args...)
	}
}

// nextName returns kind for the first part of that kind and kind-N (N from 2) for later ones, so that
// placeholders stay unique and the first of each kind keeps the short name.
func (e *Env) nextName(kind string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.counts[kind]++
	if n := e.counts[kind]; n > 1 {
		return fmt.Sprintf("%s-%d", kind, n)
	}
	return kind
}

// Register records a string that varies between runs (a host:port, an ID) and the stable placeholder Normalize
// puts in its place. Registering the same value again replaces its placeholder. Empty values are ignored.
func (e *Env) Register(value, placeholder string) { e.register(value, placeholder, false) }

// RegisterWord is Register for a value that is replaced only where it stands as a whole word (a short host
// name such as "vm" would otherwise be replaced inside other words).
func (e *Env) RegisterWord(value, placeholder string) { e.register(value, placeholder, true) }

func (e *Env) register(value, placeholder string, word bool) {
	if value == "" {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, r := range e.repl {
		if r.value == value {
			e.repl[i] = replacement{value, placeholder, word}
			e.replacer = nil
			return
		}
	}
	e.repl = append(e.repl, replacement{value, placeholder, word})
	e.replacer = nil
}

var (
	reLoopbackPort = regexp.MustCompile(`(127\.0\.0\.1|localhost|\[::1\]):\d{1,5}\b`)
	reTempPath     = regexp.MustCompile(regexp.QuoteMeta(os.TempDir()) + `/[A-Za-z0-9._\-/]+`)
	reHexID        = regexp.MustCompile(`\b[0-9a-f]{13,16}\b`)
	reRFC3339      = regexp.MustCompile(`\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?`)
	reHTTPDate     = regexp.MustCompile(`\b(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT`)
	reDuration     = regexp.MustCompile(`\b\d+(\.\d+)?(ns|µs|us|ms|s|m|h)\b`)
	// Raft and store positions: v2 JSON and headers, v3 JSON and `-w fields`, v2 `get -o extended`.
	reIndexJSON   = regexp.MustCompile(`"(modifiedIndex|createdIndex|index|raftIndex|raftTerm|etcdIndex|revision|raft_term|raft_index|raft_applied_index|mod_revision|create_revision|version|Revision|RaftTerm|RaftIndex|RaftAppliedIndex|ModRevision|CreateRevision|Version)"(\s*:\s*)\d+`)
	reIndexHeader = regexp.MustCompile(`(?i)\b(X-Etcd-Index|X-Raft-Index|X-Raft-Term|Modified-Index|Created-Index|Index)(:\s*)\d+`)
	// A list of member placeholders, in whatever order a client shuffled it.
	// The match includes the character after the list (if any) so that "member-0-peer" is not read as "member-0".
	rePlaceholderList = regexp.MustCompile(`((?:[a-z]+://)?(?:c\d+-)?member-\d+(?:, ?(?:[a-z]+://)?(?:c\d+-)?member-\d+)+)(?:[^\w-]|$)`)
	reListSep         = regexp.MustCompile(`, ?`)
)

// Normalize makes s stable across runs: registered values first (longest first), then the generic rules:
// loopback host:port → host:PORT, other temp-dir paths → $TMP/…, 13–16 hex digit IDs → <ID>, raft indexes,
// terms and revisions → <N>, timestamps → <TIME>, durations → <DUR>, and comma-separated lists of member
// placeholders (which clients shuffle) sorted.
func (e *Env) Normalize(s string) string {
	s = e.replaceRegistered(s)
	s = reLoopbackPort.ReplaceAllString(s, "${1}:PORT")
	s = reTempPath.ReplaceAllStringFunc(s, func(string) string { return "$TMP" })
	s = reHexID.ReplaceAllStringFunc(s, func(m string) string {
		if strings.Trim(m, "0123456789") == "" { // all digits: a number, not an ID
			return m
		}
		return "<ID>"
	})
	s = reRFC3339.ReplaceAllString(s, "<TIME>")
	s = reHTTPDate.ReplaceAllString(s, "<TIME>")
	s = reIndexJSON.ReplaceAllString(s, `"$1"$2<N>`)
	s = reIndexHeader.ReplaceAllString(s, `$1$2<N>`)
	s = reDuration.ReplaceAllString(s, "<DUR>")
	s = sortPlaceholderLists(s)
	return s
}

func (e *Env) replaceRegistered(s string) string {
	e.mu.Lock()
	r := e.replacer
	var words []replacement
	if r == nil {
		repl := append([]replacement(nil), e.repl...)
		sort.SliceStable(repl, func(i, j int) bool { return len(repl[i].value) > len(repl[j].value) })
		var pairs []string
		for _, x := range repl {
			if !x.word {
				pairs = append(pairs, x.value, x.placeholder)
			}
		}
		r = strings.NewReplacer(pairs...)
		e.replacer = r
	}
	for _, x := range e.repl {
		if x.word {
			words = append(words, x)
		}
	}
	e.mu.Unlock()
	s = r.Replace(s)
	for _, w := range words {
		re := regexp.MustCompile(`\b` + regexp.QuoteMeta(w.value) + `\b`)
		s = re.ReplaceAllLiteralString(s, w.placeholder)
	}
	return s
}

// sortPlaceholderLists sorts every comma-separated list of member placeholders in s.
func sortPlaceholderLists(s string) string {
	var b strings.Builder
	last := 0
	for _, m := range rePlaceholderList.FindAllStringSubmatchIndex(s, -1) {
		list := s[m[2]:m[3]]
		sep := reListSep.FindString(list)
		parts := reListSep.Split(list, -1)
		sort.Strings(parts)
		b.WriteString(s[last:m[2]])
		b.WriteString(strings.Join(parts, sep))
		last = m[3]
	}
	b.WriteString(s[last:])
	return b.String()
}
