# snapmount: see README.md. `make demo` runs the main job on a local demo,
# `make test` runs every test (units and the end-to-end suite with real
# peers), `make bench` measures snapmount against nbdfuse and nbdkit.

GO       ?= go
BIN      := bin/snapmount
PKGS     := ./...
# The end-to-end suite mounts, starts daemons and copies images: give it
# room, but stay far below CI's limit.
TESTFLAGS ?= -race -count=1 -timeout 25m
FUZZTIME ?= 10s

.PHONY: all build test unit e2e demo bench fuzz lint deps clean

all: build

# Static (no cgo: nothing needs it): the binary runs on any distribution,
# and without the dynamic loader it starts sooner, which a background
# mount pays twice.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/snapmount

deps:
	@.ci/deps

# The README's test command.
test: deps lint
	$(GO) test $(TESTFLAGS) $(PKGS)

unit:
	$(GO) test $(TESTFLAGS) ./nbd/... ./cache/... ./fusefs/... ./cmd/...

e2e: deps
	$(GO) test $(TESTFLAGS) -v ./test/...

demo: deps build
	@bash test/demo.sh $(BIN)

bench: build
	@.ci/deps --bench
	$(GO) run ./test/bench $(BENCHFLAGS)

# A short run of every fuzz target.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet $(PKGS)

clean:
	rm -rf bin
