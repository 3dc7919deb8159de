# Every tool the targets use is pinned in go.mod (tool directives) and built from the module cache.
GO        ?= go
BIN       := $(CURDIR)/bin
PKGS      := ./...
# Tests find the pinned etcd and etcdctl here instead of building them once per test package.
export EPP_TOOLS_DIR := $(BIN)

.PHONY: all build tools test test-e2e fuzz bench bench-smoke conformance conformance-smoke robustness lint demo clean

all: lint test

build:
	$(GO) build -o $(BIN)/etcd-proxy-proxy ./cmd/etcd-proxy-proxy

# The real etcd (members, stock v2 proxy, grpc-proxy) and etcdctl from the pinned v3.5.35 modules; etcd-3.6
# and etcd-3.7 (members of the newer lines, run as processes) from their own modules under tools/; the stock
# konnectivity server and agent (tunnel interop tests) from tools/konnectivity.
tools:
	$(GO) build -o $(BIN)/etcd go.etcd.io/etcd/server/v3
	$(GO) build -o $(BIN)/etcdctl go.etcd.io/etcd/etcdctl/v3
	cd tools/etcd36 && $(GO) build -o $(BIN)/etcd-3.6 go.etcd.io/etcd/server/v3
	cd tools/etcd37 && $(GO) build -o $(BIN)/etcd-3.7 go.etcd.io/etcd/server/v3
	cd tools/konnectivity && $(GO) build -o $(BIN)/konnectivity-server sigs.k8s.io/apiserver-network-proxy/cmd/server
	cd tools/konnectivity && $(GO) build -o $(BIN)/konnectivity-agent sigs.k8s.io/apiserver-network-proxy/cmd/agent

# The README's test command: unit, harness and golden end-to-end tests against real etcd. The end-to-end
# tests run without -race: their embedded members race inside etcd itself (v2store stats JSON against atomic
# counters, seen under /v2/stats/store); the proxy's own code is race-tested by the unit tests.
test: tools
	$(GO) test -race -timeout 20m -count=1 $$($(GO) list ./... | grep -v /e2e)
	$(GO) test -timeout 20m -count=1 ./e2e/...

test-e2e: tools
	$(GO) test -timeout 20m -count=1 ./e2e/...

# Go's native fuzzing of every Fuzz target in FUZZ_PKGS, FUZZTIME each (go test takes one target per run). Their
# seeds also run in test; an input that fails is written to the package's testdata/fuzz and stays a test case.
FUZZ_PKGS ?= ./rules ./crypt
FUZZTIME  ?= 30s
fuzz:
	@set -e; for pkg in $(FUZZ_PKGS); do \
		for target in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "$$pkg $$target"; \
			$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

demo:
	$(GO) run ./cmd/demo

# The benchmark of issue 5: members, stock proxies and proxy-proxies as separate processes, measured in one run;
# table, CSV, JSON and PNG under results/. bench-smoke runs every row for a moment (CI runs it as bench's test).
bench: tools build
	$(GO) run ./bench/cmd/epp-bench -etcd $(BIN)/etcd -proxy $(BIN)/etcd-proxy-proxy

bench-smoke: tools build
	$(GO) run ./bench/cmd/epp-bench -smoke -etcd $(BIN)/etcd -proxy $(BIN)/etcd-proxy-proxy

# etcd's own e2e suite and integration client packages (go.etcd.io/etcd/tests/v3 at the pinned version, -tags
# cluster_proxy) through an etcd-proxy-proxy per member, and through etcd's own grpc-proxy as the anchor, in one
# run; the table goes to results/conformance.md (README "Conformance"). Not part of test: 45 minutes on 2 cores.
CONFORMANCE_FLAGS ?=
conformance: tools build
	$(GO) run ./conformance -tools $(BIN) -proxy $(BIN)/etcd-proxy-proxy -out results/conformance $(CONFORMANCE_FLAGS)

# The subset CI runs after test: 84 named e2e tests through etcd-proxy-proxy only (3.5 minutes on 2 cores; about 5
# with an empty build cache).
CONFORMANCE_SMOKE ?= ^(TestCtlV3(Put|Get|Del|Txn|Watch|Elect|Lock|Snapshot|Endpoint)[A-Za-z]*|TestCtlV3LeaseKeepAlive[A-Za-z]*|TestCtlV2(Set|Get|Ls|Watch)[A-Za-z]*|TestV3Curl(PutGet|Watch|Txn|Auth|Campaign)[A-Za-z]*)$$
conformance-smoke: tools build
	$(GO) run ./conformance -tools $(BIN) -proxy $(BIN)/etcd-proxy-proxy -variants ours -packages e2e -run '$(CONFORMANCE_SMOKE)' \
		-work build/conformance-smoke $(CONFORMANCE_FLAGS)

# etcd v3.7.3's robustness scenarios that need no failpoint-instrumented etcd (a member killed, a member's peer
# traffic blackholed) with their clients through an etcd-proxy-proxy per member, against bin/etcd-3.7; the
# table goes to results/robustness.md (README "Conformance", Robustness). Not part of test or CI: 45 s on 2
# cores (ROBUSTNESS_FLAGS="-variants ours,direct" adds the same scenarios without a proxy: 80 s).
ROBUSTNESS_FLAGS ?=
robustness: tools build
	$(GO) run ./conformance -suite robustness -tools $(BIN) -proxy $(BIN)/etcd-proxy-proxy -out results/robustness $(ROBUSTNESS_FLAGS)

clean:
	rm -rf $(BIN)
