package rules

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v2store"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// Encrypt's HTTP half: v2 keys. A write's value (form body or query) is encrypted with the node's path as
// associated data (an in-order create, POST, whose key the member names, is bound to the directory instead:
// crypt.EncryptInDir); the answers' node.value, nodes[] (to any depth) and prevNode.value are decrypted; a
// watch's events too, stream=true ones one event at a time as they come. prevValue is refused: it compares
// values, which the member holds as ciphertext.

// The texts of Encrypt's v2 answers.
const (
	msgEncPrevValue = "etcd-proxy-proxy: prevValue cannot be compared with an encrypted value"
	msgEncV2Body    = "etcd-proxy-proxy: the request's form under an encrypted prefix cannot be read"
	msgEncV2Applied = "etcd-proxy-proxy: the write was applied, but the value it answers with does not decrypt"
	msgEncInOrder   = "etcd-proxy-proxy: an in-order create in a directory that holds an encrypted prefix only in part cannot be encrypted"
)

// v2EncryptMaxBody bounds a v2 answer read whole to be decrypted (watch streams are read an event at a time).
const v2EncryptMaxBody = 64 << 20

const v2KeysPath = "/v2/keys"

// v2Key is the node path of a /v2/keys URL path, as etcd cleans it.
func v2Key(urlPath string) (string, bool) {
	rest, ok := strings.CutPrefix(urlPath, v2KeysPath)
	if !ok || rest != "" && rest[0] != '/' {
		return "", false
	}
	return path.Clean("/" + rest), true
}

// v2MayHold reports whether the answers about node key may carry encrypted values: the key is under a prefix,
// or a prefix is under the key (a directory listed or watched recursively).
func (e *Encrypt) v2MayHold(key string) bool {
	if e.under([]byte(key)) {
		return true
	}
	dir := strings.TrimSuffix(key, "/") + "/"
	for _, p := range e.current().prefixes {
		if strings.HasPrefix(p, dir) || strings.HasPrefix(dir, p) {
			return true
		}
	}
	return false
}

// Request implements Rule: encrypts the value of a write under an encrypted prefix; refuses prevValue there.
func (e *Encrypt) Request(req *http.Request) (*http.Response, error) {
	if !e.on() {
		return nil, nil
	}
	key, ok := v2Key(req.URL.Path)
	if !ok {
		return nil, nil
	}
	var (
		inDir bool
		keys  *crypt.Keyring
	)
	switch req.Method {
	case http.MethodPut, http.MethodDelete:
		if keys = e.keysFor([]byte(key)); keys == nil {
			return nil, nil
		}
	case http.MethodPost: // a new key in the directory, named by the member
		dir := strings.TrimSuffix(key, "/") + "/"
		if !e.touches([]byte(dir), []byte(clientv3.GetPrefixRangeEnd(dir))) {
			return nil, nil
		}
		// The keyring of the directory's keys; a prefix inside the directory, which only some of the names the
		// member may pick have, takes the request as a whole.
		if keys = e.keysFor([]byte(dir)); keys == nil {
			keys = e.keysFor([]byte(dir + "0"))
		}
		if keys == nil {
			return Reply(req, http.StatusBadRequest, msgEncInOrder), nil
		}
		inDir = true
	default:
		return nil, nil
	}
	query := req.URL.Query()
	var form url.Values
	if req.Body != nil && req.Body != http.NoBody {
		if mt, _, _ := mime.ParseMediaType(req.Header.Get("Content-Type")); mt == "application/x-www-form-urlencoded" {
			b, err := io.ReadAll(req.Body)
			_ = req.Body.Close()
			if err != nil {
				return nil, err
			}
			if form, err = url.ParseQuery(string(b)); err != nil {
				return Reply(req, http.StatusBadRequest, msgEncV2Body), nil
			}
			req.Body = io.NopCloser(bytes.NewReader(b)) // put back as it was, until changed below
			req.ContentLength = int64(len(b))
		}
	}
	// prevValue works on ciphertext where the keyring is deterministic: encrypted as a write of it would be.
	if query.Has("prevValue") || form.Has("prevValue") {
		if inDir || !keys.Deterministic() {
			return Reply(req, http.StatusBadRequest, msgEncPrevValue), nil
		}
	}
	seal := func(vs url.Values) (bool, *http.Response) {
		changed := false
		if vs.Has("prevValue") {
			v, err := keys.Encrypt([]byte(key), []byte(vs.Get("prevValue")))
			if err != nil {
				e.log().Error("encryption failed", "key", key, "err", err)
				return false, Reply(req, http.StatusInternalServerError, msgEncFailed)
			}
			vs.Set("prevValue", string(v))
			changed = true
		}
		if !vs.Has("value") {
			return changed, nil
		}
		var (
			v   []byte
			err error
		)
		if inDir {
			v, err = keys.EncryptInDir([]byte(key), []byte(vs.Get("value")))
		} else {
			v, err = keys.Encrypt([]byte(key), []byte(vs.Get("value")))
		}
		if err != nil {
			e.log().Error("encryption failed", "key", key, "err", err)
			return false, Reply(req, http.StatusInternalServerError, msgEncFailed)
		}
		vs.Set("value", string(v))
		return true, nil
	}
	if changed, reply := seal(query); reply != nil {
		return reply, nil
	} else if changed {
		req.URL.RawQuery = query.Encode()
	}
	if changed, reply := seal(form); reply != nil {
		return reply, nil
	} else if changed {
		b := []byte(form.Encode())
		req.Body = io.NopCloser(bytes.NewReader(b))
		req.ContentLength = int64(len(b))
		req.Header.Set("Content-Length", strconv.Itoa(len(b)))
		if int64(len(b))+encryptRaftOverhead > e.maxRequestBytes() {
			return Reply(req, http.StatusRequestEntityTooLarge, msgEncTooLarge), nil
		}
	}
	return nil, nil
}

// Response implements Rule: decrypts the values of the answers about v2 keys that may hold encrypted ones. A
// watch stream is decrypted an event at a time as it comes; any other answer is read whole (one event) and,
// when a value in it does not decrypt, replaced with an error (prevNode is left out instead, and the watch
// stream ends with an error object).
func (e *Encrypt) Response(resp *http.Response) (BodyFunc, error) {
	if !e.on() || resp.Request == nil || resp.Request.Method == http.MethodHead ||
		resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		return nil, nil
	}
	key, ok := v2Key(resp.Request.URL.Path)
	if !ok || !e.v2MayHold(key) {
		return nil, nil
	}
	q := resp.Request.URL.Query()
	wait, _ := strconv.ParseBool(q.Get("wait"))
	if stream, _ := strconv.ParseBool(q.Get("stream")); wait && stream && resp.Request.Method == http.MethodGet {
		resp.Body = newV2EventStream(e, resp.Body)
		return nil, nil
	}
	defer resp.Body.Close()
	if resp.ContentLength > v2EncryptMaxBody {
		return nil, errBodyTooLargeToDecrypt
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, v2EncryptMaxBody+1))
	if err != nil {
		return nil, err
	}
	if len(b) > v2EncryptMaxBody {
		return nil, errBodyTooLargeToDecrypt
	}
	var ev v2store.Event
	if err := json.Unmarshal(b, &ev); err != nil || ev.Action == "" {
		return nil, errors.New("v2 answer that is not an event")
	}
	if err := e.v2Event(&ev); err != nil {
		var de errDecrypt
		errors.As(err, &de)
		msg := msgEncDecrypt
		switch {
		case resp.Request.Method != http.MethodGet && resp.Request.Method != http.MethodHead:
			msg = msgEncV2Applied
		case de.plaintext:
			msg = msgEncPlaintext
		}
		r := Reply(resp.Request, http.StatusInternalServerError, msg)
		resp.StatusCode, resp.Status, resp.Header, resp.Body, resp.ContentLength = r.StatusCode, r.Status, r.Header, r.Body, r.ContentLength
		return nil, nil
	}
	out, err := json.Marshal(&ev)
	if err != nil {
		return nil, err
	}
	out = append(out, '\n') // as etcd's encoder ends it
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.ContentLength = int64(len(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
	return nil, nil
}

var errBodyTooLargeToDecrypt = errors.New("v2 answer too large to decrypt")

// v2Event decrypts an event's node (and its nodes, to any depth), or fails; a prevNode that does not decrypt is
// left out.
func (e *Encrypt) v2Event(ev *v2store.Event) error {
	if err := e.v2Node(ev.Node); err != nil {
		return err
	}
	if ev.PrevNode != nil && e.v2Node(ev.PrevNode) != nil {
		ev.PrevNode = nil
		e.prevKVsDropped.Add(1)
	}
	return nil
}

func (e *Encrypt) v2Node(n *v2store.NodeExtern) error {
	if n == nil {
		return nil
	}
	if keys, raw := e.resourceFor([]byte(n.Key)); n.Value != nil && !n.Dir && keys != nil {
		plain, err := e.open(keys, raw, []byte(n.Key), []byte(*n.Value))
		if err != nil {
			return err
		}
		s := string(plain)
		n.Value = &s
	}
	for _, c := range n.Nodes {
		if err := e.v2Node(c); err != nil {
			return err
		}
	}
	return nil
}

// v2EventStream decrypts a stream=true watch, one event per Read: what it returns is one whole event, so that
// the proxy's copy flushes each as it comes. A JSON value that is not an event (etcd's error objects) passes as
// it is. An event that does not decrypt ends the stream after an error object in etcd's style. The decoder holds
// an event whole: one larger than max (v2EncryptMaxBody, as an answer read whole) ends the stream with
// errBodyTooLargeToDecrypt rather than be buffered without end.
type v2EventStream struct {
	e    *Encrypt
	body io.ReadCloser
	dec  *json.Decoder
	max  int64 // the most bytes the decoder may read past the end of the last value it decoded
	read int64 // the bytes the decoder has read from body
	buf  bytes.Buffer
	done bool
}

func newV2EventStream(e *Encrypt, body io.ReadCloser) *v2EventStream {
	s := &v2EventStream{e: e, body: body, max: v2EncryptMaxBody}
	s.dec = json.NewDecoder(v2EventInput{s})
	return s
}

// v2EventInput is what the decoder of a v2EventStream reads: its body, up to max bytes past the last value decoded.
type v2EventInput struct{ s *v2EventStream }

func (in v2EventInput) Read(p []byte) (int, error) {
	s := in.s
	left := s.dec.InputOffset() + s.max - s.read // InputOffset: where the value being decoded starts
	if left <= 0 {
		return 0, errBodyTooLargeToDecrypt
	}
	if int64(len(p)) > left {
		p = p[:left]
	}
	n, err := s.body.Read(p)
	s.read += int64(n)
	return n, err
}

func (s *v2EventStream) Read(p []byte) (int, error) {
	for s.buf.Len() == 0 {
		if s.done {
			return 0, io.EOF
		}
		var raw json.RawMessage
		if err := s.dec.Decode(&raw); err != nil {
			return 0, err // io.EOF at the end
		}
		var ev v2store.Event
		if err := json.Unmarshal(raw, &ev); err != nil || ev.Action == "" {
			s.buf.Write(raw)
			s.buf.WriteByte('\n')
			continue
		}
		if err := s.e.v2Event(&ev); err != nil {
			s.e.watchesCanceled.Add(1)
			b, _ := json.Marshal(&Error{Message: msgEncWatch})
			s.buf.Write(append(b, '\n'))
			s.done = true
			continue
		}
		_ = json.NewEncoder(&s.buf).Encode(&ev)
	}
	return s.buf.Read(p)
}

func (s *v2EventStream) Close() error { return s.body.Close() }
