# kms-plugin. `make run` starts the plugin on the local keyset; `make test`
# runs every test, building the e2e binaries (etcd, kube-apiserver) from the
# Go module proxy into .cache/bin on first use.

SHELL      := /bin/bash
GO         ?= go
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS    := -s -w -X main.version=$(VERSION)
BIN        := $(CURDIR)/bin/kms-plugin
SERVE_BIN  := $(CURDIR)/bin/kms-plugin-serve
CACHE      ?= $(CURDIR)/.cache/bin
FUZZTIME   ?= 30s
E2E_FLAGS  ?= -count=1 -timeout 40m

export KMS_E2E_CACHE := $(CACHE)

.PHONY: all build run test unit e2e e2e-tools bench fuzz lint image clean

all: build

# Two static binaries of the same code: kms-plugin (every command) and
# kms-plugin-serve (-tags serveonly: serve, keyset, doctor and version,
# without client-go, so the plugin idles at about 15 MiB instead of 40 MiB).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/kms-plugin
	CGO_ENABLED=0 $(GO) build -trimpath -tags serveonly -ldflags '$(LDFLAGS)' -o $(SERVE_BIN) ./cmd/kms-plugin

# Runs the plugin with no flags: local keyset and socket under
# ~/.local/state/kms-plugin (or $$KMS_PLUGIN_STATE_DIR), HTTP on 127.0.0.1:8787.
run: build
	$(SERVE_BIN) serve --log-format console

# Everything CI runs: formatting, vet, the import direction check
# (hack/importcheck/allow.txt), unit tests with -race (fuzz seed
# corpora included), then the integration and e2e tests on real etcd and
# real kube-apiserver.
test: lint unit e2e

unit:
	$(GO) test -race -count=1 ./...

e2e-tools:
	bash e2e/tools/build.sh

e2e: build e2e-tools
	cd e2e && KMS_PLUGIN_BIN=$(BIN) KMS_PLUGIN_SERVE_BIN=$(SERVE_BIN) \
		KUBE_APISERVER_BIN=$(CACHE)/kube-apiserver-v1.37.2 \
		ETCD_BIN=$(CACHE)/etcd-v3.6.16 \
		KUBECTL_BIN=$(CACHE)/kubectl-v1.37.2 \
		KUBE_CONTROLLER_MANAGER_BIN=$(CACHE)/kube-controller-manager-v1.37.2 \
		$(GO) test $(E2E_FLAGS) ./...

bench: build
	$(GO) run ./bench -out bench/results/latest.md
	$(GO) run ./bench/azure -out bench/results/azure.md
	bash e2e/tools/build.sh
	cd e2e && KMS_PLUGIN_BIN=$(BIN) KUBE_APISERVER_BIN=$(CACHE)/kube-apiserver-v1.37.2 \
		ETCD_BIN=$(CACHE)/etcd-v3.6.16 KUBECTL_BIN=$(CACHE)/kubectl-v1.37.2 \
		$(GO) run ./cmd/rotationbench -sizes 1000,10000 -out ../bench/results/rotation.md
	$(GO) test -run '^$$' -bench . -benchtime 2s ./bench/ ./internal/envelope/

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecrypt$$' -fuzztime $(FUZZTIME) ./internal/envelope
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeLocalKEK$$' -fuzztime $(FUZZTIME) ./internal/envelope
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/config
	$(GO) test -run '^$$' -fuzz '^FuzzSocketPath$$' -fuzztime $(FUZZTIME) ./internal/config
	$(GO) test -run '^$$' -fuzz '^FuzzParseVersion$$' -fuzztime $(FUZZTIME) ./internal/provider/azurekv
	$(GO) test -run '^$$' -fuzz '^FuzzUnpad$$' -fuzztime $(FUZZTIME) ./internal/provider/azurekv
	$(GO) test -run '^$$' -fuzz '^FuzzParseAPIServer$$' -fuzztime $(FUZZTIME) ./internal/install
	$(GO) test -run '^$$' -fuzz '^FuzzParseEncryptionConfig$$' -fuzztime $(FUZZTIME) ./internal/install

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags serveonly ./cmd/...
	$(GO) run ./hack/importcheck -go $(GO)
	cd e2e && $(GO) vet ./...

image:
	docker build -t kms-plugin:$(VERSION) --build-arg VERSION=$(VERSION) .

clean:
	rm -rf bin
