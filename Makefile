# Every tool the targets use is pinned in go.mod (tool directives) and built from the module cache.
GO        ?= go
BIN       := $(CURDIR)/bin
PKGS      := ./...
# Tests find the pinned etcd and etcdctl here instead of building them once per test package.
export EPP_TOOLS_DIR := $(BIN)

.PHONY: all build tools test test-e2e bench bench-smoke lint demo clean

all: lint test

build:
	$(GO) build -o $(BIN)/etcd-proxy-proxy ./cmd/etcd-proxy-proxy

# The real etcd (members, stock v2 proxy, grpc-proxy) and etcdctl from the pinned v3.5.35 modules.
tools:
	$(GO) build -o $(BIN)/etcd go.etcd.io/etcd/server/v3
	$(GO) build -o $(BIN)/etcdctl go.etcd.io/etcd/etcdctl/v3

# The README's test command: unit, harness and golden end-to-end tests against real etcd.
test: tools
	$(GO) test -race -timeout 25m -count=1 $(PKGS)

test-e2e: tools
	$(GO) test -race -timeout 25m -count=1 ./e2e/...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

demo:
	$(GO) run ./cmd/etcd-proxy-proxy demo

bench:
	@echo "make bench: not built yet (issue 5)"; exit 1

clean:
	rm -rf $(BIN)
