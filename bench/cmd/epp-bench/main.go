// Command epp-bench runs the benchmark of issue 5: a 3-member etcd cluster, etcd's stock v2 proxy and
// grpc-proxy, one etcd-proxy-proxy and a chain of two, each a separate process on 127.0.0.1, measured in one
// run. See the README's "Benchmarks".
//
//	epp-bench [-smoke] [-etcd bin/etcd] [-proxy bin/etcd-proxy-proxy] [-out results/DIR]
//	epp-bench -profile FILE        CPU profile of the proxy-proxy under v2 GET at c=64
//	epp-bench proxy --cpuprofile FILE -- PROXY-FLAGS   (the profiling wrapper that -profile starts)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/bench"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/cli"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "proxy" {
		os.Exit(profiledProxy(os.Args[2:]))
	}
	os.Exit(run())
}

func run() int {
	var o bench.Options
	fs := flag.NewFlagSet("epp-bench", flag.ContinueOnError)
	fs.StringVar(&o.Bins.Etcd, "etcd", "bin/etcd", "the pinned etcd binary (members, --proxy=on, grpc-proxy)")
	fs.StringVar(&o.Bins.Proxy, "proxy", "bin/etcd-proxy-proxy", "the etcd-proxy-proxy binary")
	fs.BoolVar(&o.Smoke, "smoke", false, "a fraction of a second per row and 50 watchers: checks the tool, measures nothing")
	fs.IntVar(&o.Rounds, "rounds", 0, "segments per path and scenario, in rotating order (default 3, smoke 1)")
	fs.DurationVar(&o.Warmup, "warmup", 0, "warm-up per segment (default 500ms, smoke 100ms)")
	fs.DurationVar(&o.Duration, "duration", 0, "measurement per segment (default 2.5s, smoke 300ms)")
	fs.Int64Var(&o.MaxRequests, "max-requests", 0, "request bound per segment (default 2000000)")
	fs.IntVar(&o.Watchers, "watchers", 0, "v3 watch streams and v2 long polls to hold (default 10000, smoke 50; -1 none)")
	fs.StringVar(&o.Only, "only", "", `run only scenarios whose name contains this ("v2 GET c=64", "v3", "watchers")`)
	fs.StringVar(&o.OutDir, "out", "", "results directory (default results/<time>)")
	fs.StringVar(&o.Profile, "profile", "", "instead of the benchmark: write a CPU profile of the proxy-proxy under load (-profile-load) to this file")
	fs.DurationVar(&o.ProfileDuration, "profile-duration", 0, "load while profiling (default 15s)")
	fs.StringVar(&o.ProfileLoad, "profile-load", "v2", `the load profiled: "v2" (GET at c=64) or "v3" (linearizable Range at c=16)`)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if o.Profile != "" {
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintln(os.Stderr, "epp-bench:", err)
			return 1
		}
		o.Bins.Self = self
	}
	// Ctrl-C, SIGTERM or SIGHUP end the run; every process it started is killed on the way out.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	rep, err := bench.Run(ctx, o)
	if rep != nil {
		fmt.Println()
		rep.WriteTable(os.Stdout)
		fmt.Printf("\nresults: %s/bench.{txt,csv,json,png}\n", rep.OutDir)
	}
	switch {
	case errors.Is(err, bench.ErrInvalid):
		fmt.Fprintln(os.Stderr, "epp-bench:", err)
		return 1
	case err != nil:
		fmt.Fprintln(os.Stderr, "epp-bench:", err)
		return 1
	}
	return 0
}

// profiledProxy runs etcd-proxy-proxy's own main in this process with the CPU profiler on, and writes the
// profile when the proxy stops (SIGINT).
func profiledProxy(args []string) int {
	fs := flag.NewFlagSet("epp-bench proxy", flag.ContinueOnError)
	out := fs.String("cpuprofile", "", "write the CPU profile here")
	if err := fs.Parse(args); err != nil || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: epp-bench proxy --cpuprofile FILE -- ETCD-PROXY-PROXY-FLAGS")
		return 2
	}
	f, err := os.Create(*out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "epp-bench proxy:", err)
		return 1
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintln(os.Stderr, "epp-bench proxy:", err)
		return 1
	}
	t0 := time.Now()
	status := cli.Main(append([]string{"etcd-proxy-proxy"}, fs.Args()...), os.Stdout, os.Stderr)
	pprof.StopCPUProfile()
	fmt.Fprintf(os.Stderr, "epp-bench proxy: CPU profile of %s written to %s\n", time.Since(t0).Round(time.Millisecond), *out)
	return status
}
