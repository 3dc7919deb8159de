package proxy

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc/peer"
)

// safeQueryParams are the query parameters whose values an access line shows: etcd's v2 flags and indexes.
// Every other value — ?value= and ?prevValue= carry data, anything unknown may carry a secret — is replaced by
// "REDACTED"; /v2/auth/* shows no query at all.
var safeQueryParams = map[string]bool{
	"wait": true, "waitIndex": true, "recursive": true, "sorted": true, "stream": true, "quorum": true,
	"dir": true, "prevExist": true, "prevIndex": true, "ttl": true, "refresh": true, "noValueOnSuccess": true,
}

// accessLogger writes one line per request. It never logs headers (Authorization, tokens), bodies (v2 auth
// passwords, v3 Authenticate) or query values that are not in safeQueryParams.
type accessLogger struct{ l *slog.Logger }

func (a *accessLogger) log(r *http.Request, status int, code, api string, d time.Duration, bytes int64) {
	attrs := []slog.Attr{
		slog.String("remote", r.RemoteAddr),
		slog.String("proto", r.Proto),
		slog.String("method", r.Method),
		slog.String("path", r.URL.Path),
	}
	if q := safeQuery(r.URL.Path, r.URL.RawQuery); q != "" {
		attrs = append(attrs, slog.String("query", q))
	}
	attrs = append(attrs, slog.Int("status", status))
	attrs = append(attrs, slog.Duration("duration", d), slog.Int64("bytes", bytes))
	a.l.LogAttrs(context.Background(), slog.LevelInfo, "access", attrs...)
}

// logCall writes the line of a gRPC call: no metadata (tokens) and no message (passwords, values).
func (a *accessLogger) logCall(c *serverCall, code string, d time.Duration) {
	remote := ""
	if p, ok := peer.FromContext(c.ss.Context()); ok && p.Addr != nil {
		remote = p.Addr.String()
	}
	a.l.LogAttrs(context.Background(), slog.LevelInfo, "access",
		slog.String("remote", remote),
		slog.String("proto", "HTTP/2.0"),
		slog.String("method", "POST"),
		slog.String("path", c.chain.m.Name),
		slog.Int("status", 200),
		slog.String("grpc_code", code),
		slog.Duration("duration", d))
}

// safeQuery is the query of path for the log: the parameters in their order, values kept only for
// safeQueryParams. Parameters are not decoded: a name that needs decoding is not one of etcd's.
func safeQuery(path, raw string) string {
	if raw == "" || strings.HasPrefix(path, "/v2/auth") {
		return ""
	}
	var b strings.Builder
	for part := range strings.SplitSeq(raw, "&") {
		if part == "" {
			continue
		}
		name, value, hasValue := strings.Cut(part, "=")
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(name)
		if !hasValue {
			continue
		}
		b.WriteByte('=')
		if safeQueryParams[name] {
			b.WriteString(value)
		} else {
			b.WriteString("REDACTED")
		}
	}
	return b.String()
}
