package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Each connection through --tunnel-listen is a gRPC stream of its own: one whose reader stalls (the destination
// sends 16 MiB nobody reads) holds up only itself — another connection through the same agent still echoes, the
// stalled destination stays blocked (flow control reached it: far less than 16 MiB written), and once read it
// delivers every byte. After the proxy and the agent stop, not one goroutine is left. Not parallel: goleak sees
// the whole process.
func TestTunnelListenNoHeadOfLineBlocking(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	const bulk = 16 << 20
	dest, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		written  atomic.Int64 // by the bulk connection
		accepted atomic.Int64
		dwg      sync.WaitGroup
	)
	dwg.Go(func() {
		for {
			c, err := dest.Accept()
			if err != nil {
				return
			}
			first := accepted.Add(1) == 1
			dwg.Go(func() {
				defer c.Close()
				if !first { // echo
					_, _ = io.Copy(c, c)
					return
				}
				chunk := bytes.Repeat([]byte{'x'}, 32<<10)
				for n := 0; n < bulk; n += len(chunk) {
					if _, err := c.Write(chunk); err != nil {
						return
					}
					written.Add(int64(len(chunk)))
				}
			})
		}
	})
	defer func() { _ = dest.Close(); dwg.Wait() }()

	dir := t.TempDir()
	srvFiles, agentFiles, err := harness.NewTunnelPKI(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.New(proxy.Config{Upstreams: []string{"tunnel://a1/http://" + dest.Addr().String()},
		ListenClientURLs: []string{"http://127.0.0.1:0"},
		TunnelConfig: proxy.TunnelConfig{TunnelListen: "https://127.0.0.1:0",
			TunnelTLS: proxy.TLSInfo{CAFile: srvFiles.CAFile, CertFile: srvFiles.CertFile, KeyFile: srvFiles.KeyFile}}},
		proxy.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var logs harness.Buffer
	defer harness.RunAgent(t, agent.Config{Servers: []string{"https://" + srv.TunnelListenAddr()}, ID: "a1",
		Allow: []string{dest.Addr().String()}, CAFile: agentFiles.CAFile, CertFile: agentFiles.CertFile, KeyFile: agentFiles.KeyFile},
		&logs)()

	dial := func() net.Conn {
		t.Helper()
		for { // until the agent is connected
			c, err := srv.TunnelDial(ctx, dest.Addr().String())
			if err == nil {
				return c
			}
			if ctx.Err() != nil {
				t.Fatalf("dial through the agent: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	stalled := dial()
	defer stalled.Close()
	for written.Load() == 0 { // the bulk connection is the first the destination accepted
		if ctx.Err() != nil {
			t.Fatal("the destination wrote nothing")
		}
		time.Sleep(10 * time.Millisecond)
	}
	echo := dial()
	defer echo.Close()
	msg := []byte("ping through the tunnel")
	buf := make([]byte, len(msg))
	for i := range 20 {
		_ = echo.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := echo.Write(msg); err != nil {
			t.Fatalf("echo %d: write: %v", i, err)
		}
		if _, err := io.ReadFull(echo, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("echo %d beside a stalled connection: %q %v", i, buf, err)
		}
	}
	if n := written.Load(); n >= bulk {
		t.Errorf("the stalled destination wrote all %d bytes: nothing pushed back", n)
	} else {
		t.Logf("the stalled destination is held at %d KiB of %d", n>>10, bulk>>10)
	}
	_ = stalled.SetDeadline(time.Now().Add(20 * time.Second))
	n, err := io.Copy(io.Discard, stalled)
	if err != nil && !errors.Is(err, io.EOF) || n != bulk {
		t.Errorf("read %d bytes of the stalled connection (%v), want %d", n, err, bulk)
	}
}
