package e2e

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// TestLinearizable records a history of puts and gets made by concurrent clientv3 clients through a chain of two
// proxy-proxies while followers stop and start again, and checks with porcupine that the history is
// linearizable: the chain neither replays a write nor answers a read from the past.
func TestLinearizable(t *testing.T) {
	const (
		clients  = 6
		minRun   = 4 * time.Second
		minOps   = 200
		opTime   = 2 * time.Second
		checkFor = 10 * time.Second
	)
	keys := []string{"lin/a", "lin/b", "lin/c"}
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	// TLS on every hop: the inner proxy's failover then runs over HTTP/2 with TLS, whose transport closes a
	// request's body when a dial fails.
	r, err := e.Start(ctx, harness.Topology{Name: "linearizable", Members: 3, TLS: true, Hops: []harness.Hop{pp(true), pp(true)}})
	if err != nil {
		t.Fatal(err)
	}
	c := r.Cluster
	// The leader is Members[2]: the followers that stop include Members[0], the first upstream of the inner
	// proxy, so that a stop hits the path of the requests whichever way the proxy spreads them.
	if err := c.MoveLeader(ctx, 2); err != nil {
		t.Fatal(err)
	}
	clis := make([]*clientv3.Client, clients)
	for i := range clis {
		top := r.Top()
		tc, err := top.TLS.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		cli, err := clientv3.New(clientv3.Config{Endpoints: top.URLs, TLS: tc, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cli.Close() })
		clis[i] = cli
	}

	start := time.Now()
	since := func() int64 { return time.Since(start).Nanoseconds() }
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()

	// The faults: one follower at a time, in turn, stops for a moment and comes back, so that a quorum always
	// remains.
	type window struct{ from, to int64 }
	var (
		cycles     []string // "member-1: stopped +1.2s, back +1.9s"
		down       []window // from the stop to the member serving again
		firstCycle = make(chan struct{})
		faultsDone = make(chan struct{})
	)
	go func() {
		defer close(faultsDone)
		for next := 0; loadCtx.Err() == nil; next++ {
			pause(loadCtx, 500*time.Millisecond)
			lead := c.Leader()
			if loadCtx.Err() != nil {
				return
			}
			if lead == nil {
				continue
			}
			m := c.Members[next%len(c.Members)]
			if m == lead {
				next++
				m = c.Members[next%len(c.Members)]
			}
			stopped := time.Since(start)
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := m.Stop(sctx); err != nil {
				t.Logf("%s still closing: %v", m.Name, err)
			}
			cancel()
			pause(ctx, 500*time.Millisecond) // the load runs on two members
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := m.Restart(rctx)
			cancel()
			if err != nil {
				t.Errorf("restart %s: %v", m.Name, err)
				return
			}
			back := time.Since(start)
			cycles = append(cycles, fmt.Sprintf("%s: stopped +%v, back +%v", m.Name,
				stopped.Round(time.Millisecond), back.Round(time.Millisecond)))
			down = append(down, window{stopped.Nanoseconds(), back.Nanoseconds()})
			if len(cycles) == 1 {
				close(firstCycle)
			}
		}
	}()

	// The clients. A put that failed may or may not have been applied: it stays open until after the end of
	// the history (Return is set below), and its client continues as a new one, as Jepsen's processes do.
	var (
		mu      sync.Mutex
		history []porcupine.Operation
		failed  = map[string]int{}
		wg      sync.WaitGroup
	)
	for w, cli := range clis {
		wg.Go(func() {
			id := w
			for seq := 0; loadCtx.Err() == nil; seq++ {
				in := kvInput{Key: keys[rand.IntN(len(keys))]}
				if rand.IntN(2) == 0 {
					in.Put, in.Value = true, fmt.Sprintf("c%d-%d", w, seq)
				}
				opCtx, cancel := context.WithTimeout(ctx, opTime)
				call := since()
				var out kvOutput
				var err error
				if in.Put {
					_, err = cli.Put(opCtx, in.Key, in.Value)
				} else {
					var resp *clientv3.GetResponse
					if resp, err = cli.Get(opCtx, in.Key); err == nil && len(resp.Kvs) > 0 {
						out.Value = string(resp.Kvs[0].Value)
					}
				}
				ret := since()
				cancel()
				op := porcupine.Operation{ClientId: id, Input: in, Call: call, Output: out, Return: ret}
				mu.Lock()
				switch {
				case err == nil:
					history = append(history, op)
				case in.Put:
					failed[fmt.Sprintf("put: %s", status.Code(err))]++
					op.Output = kvOutput{Unknown: true}
					history = append(history, op)
					id += clients
				default:
					failed[fmt.Sprintf("get: %s", status.Code(err))]++
				}
				mu.Unlock()
			}
		})
	}

	pause(ctx, minRun)
	select {
	case <-firstCycle:
	case <-faultsDone:
	case <-ctx.Done():
	}
	stopLoad()
	wg.Wait()
	end := since()
	<-faultsDone

	ok, unknown, duringFault := 0, 0, 0
	for i := range history {
		op := &history[i]
		if op.Output.(kvOutput).Unknown {
			op.Return = end + time.Second.Nanoseconds()
			unknown++
			continue
		}
		ok++
		for _, w := range down {
			if op.Call >= w.from && op.Return <= w.to {
				duringFault++
				break
			}
		}
	}
	t.Logf("history of %v: %d operations succeeded (%d of them while a member was down), %d puts with unknown outcome; failures %v",
		time.Duration(end).Round(time.Millisecond), ok, duringFault, unknown, failed)
	t.Logf("faults: %s", strings.Join(cycles, "; "))
	if ok < minOps {
		t.Errorf("%d operations succeeded, want at least %d", ok, minOps)
	}
	if len(cycles) == 0 {
		t.Error("no follower was stopped and restarted during the history")
	} else if duringFault == 0 {
		t.Error("no operation succeeded while a member was down")
	}

	checkStart := time.Now()
	res, info := porcupine.CheckOperationsVerbose(kvModel, history, checkFor)
	t.Logf("porcupine: %s in %v", res, time.Since(checkStart).Round(time.Millisecond))
	if res != porcupine.Ok {
		t.Errorf("history is not linearizable: porcupine says %s (%s within %v)", res, map[porcupine.CheckResult]string{
			porcupine.Illegal: "a violation", porcupine.Unknown: "no answer",
		}[res], checkFor)
		dir := t.ArtifactDir()
		if f := flag.Lookup("test.artifacts"); f == nil || f.Value.String() != "true" {
			// Without -artifacts the artifact directory goes with the test: keep the file somewhere that stays.
			if dir, err = os.MkdirTemp("", "TestLinearizable-"); err != nil {
				t.Fatal(err)
			}
		}
		path := filepath.Join(dir, "history.html")
		if err := porcupine.VisualizePath(kvModel, info, path); err != nil {
			t.Errorf("visualisation: %v", err)
		} else {
			t.Logf("visualisation: %s", path)
		}
	}
}

// kvInput is a put of Value to Key, or a get of Key.
type kvInput struct {
	Put        bool
	Key, Value string
}

// kvOutput is what a get returned ("" for no key); Unknown marks a put whose outcome the client did not learn.
type kvOutput struct {
	Value   string
	Unknown bool
}

// kvModel is a register per key: the state is the key's value, "" before the first put.
var kvModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(kvInput).Key
			by[k] = append(by[k], op)
		}
		keys := make([]string, 0, len(by))
		for k := range by {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			parts = append(parts, by[k])
		}
		return parts
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		in := input.(kvInput)
		if in.Put {
			return true, in.Value // applied or not, a put's answer says nothing more
		}
		return output.(kvOutput).Value == state.(string), state
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(kvInput), output.(kvOutput)
		switch {
		case in.Put && out.Unknown:
			return fmt.Sprintf("put(%s, %q) → ?", in.Key, in.Value)
		case in.Put:
			return fmt.Sprintf("put(%s, %q)", in.Key, in.Value)
		}
		return fmt.Sprintf("get(%s) → %q", in.Key, out.Value)
	},
	DescribeState: func(state any) string { return fmt.Sprintf("%q", state) },
}
