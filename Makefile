# kms-plugin. `make run` starts the plugin on the local keyset; `make test`
# runs every test, building the e2e binaries (etcd, kube-apiserver) from the
# Go module proxy into .cache/bin on first use.

SHELL      := /bin/bash
GO         ?= go
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS    := -s -w -X main.version=$(VERSION)
BIN        := $(CURDIR)/bin/kms-plugin
SERVE_BIN  := $(CURDIR)/bin/kms-plugin-serve
PKCS11_BIN := $(CURDIR)/bin/kms-plugin-pkcs11
CACHE      ?= $(CURDIR)/.cache/bin
FUZZTIME   ?= 30s
IMAGE      ?= kms-plugin
REVISION   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
E2E_FLAGS  ?= -count=1 -timeout 40m

export KMS_E2E_CACHE := $(CACHE)
# promtool and promql-metrics (bash e2e/tools/build.sh promtool): lint checks
# the alert rules with promtool; the tests of manifests/monitoring run both.
PROMETHEUS_VERSION := v0.316.0
export PROMTOOL_BIN := $(CACHE)/promtool-$(PROMETHEUS_VERSION)
export PROMQL_METRICS_BIN := $(CACHE)/promql-metrics-$(PROMETHEUS_VERSION)
# The real Vault core (v1.21.4, e2e/tools/vault-server) the vault provider's
# tests, e2e and benchmark run; build.sh keeps this symlink on the newest build.
export KMS_VAULT_SERVER_BIN := $(CACHE)/vault-server

.PHONY: build-pkcs11 unit-pkcs11 softhsm
.PHONY: vault-server
.PHONY: all build run test unit e2e e2e-tools bench fuzz lint image clean promtool
.PHONY: image-pkcs11

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
test: lint unit unit-pkcs11 e2e

unit: promtool vault-server
	$(GO) test -race -count=1 ./...

# The PKCS#11 build (cgo, -tags pkcs11): every command, with the pkcs11
# provider compiled in. The default binaries above stay static.
build-pkcs11:
	CGO_ENABLED=1 $(GO) build -trimpath -tags pkcs11 -ldflags '$(LDFLAGS)' -o $(PKCS11_BIN) ./cmd/kms-plugin

# SoftHSM2 and pkcs11-tool for the PKCS#11 tests (apt-get as root on CI).
softhsm:
	bash hack/apt-install.sh softhsm2 opensc

# The PKCS#11 provider on temporary SoftHSM tokens: unit, conformance,
# attacks, doctor, the registry's view of it, and its benchmark's checks.
unit-pkcs11: softhsm
	CGO_ENABLED=1 $(GO) test -race -count=1 -tags pkcs11 ./internal/provider/pkcs11/... ./bench/pkcs11/...

e2e-tools:
	bash e2e/tools/build.sh

promtool:
	bash e2e/tools/build.sh promtool

vault-server:
	bash e2e/tools/build.sh vault-server

# The image tests (e2e/image_test.go) run the images make image and make
# image-pkcs11 build: make e2e builds them when podman can be had, as root
# (the targets install it) or when podman is installed. Otherwise the tests
# skip, or fail with CI=true.
E2E_IMAGE := $(shell [ "$$(id -u)" = 0 ] || command -v podman >/dev/null 2>&1 && echo image image-pkcs11)

e2e: build build-pkcs11 softhsm e2e-tools $(E2E_IMAGE)
	cd e2e && KMS_PLUGIN_BIN=$(BIN) KMS_PLUGIN_SERVE_BIN=$(SERVE_BIN) \
		KMS_PLUGIN_IMAGE=$(IMAGE):$(VERSION) KMS_PLUGIN_PKCS11_IMAGE=$(IMAGE)-pkcs11:$(VERSION) \
		CONTAINERS_CONF=$(CURDIR)/hack/image/containers.conf \
		KMS_PLUGIN_PKCS11_BIN=$(PKCS11_BIN) \
		KUBE_APISERVER_BIN=$(CACHE)/kube-apiserver-v1.37.2 \
		ETCD_BIN=$(CACHE)/etcd-v3.6.16 \
		KUBECTL_BIN=$(CACHE)/kubectl-v1.37.2 \
		KUBE_CONTROLLER_MANAGER_BIN=$(CACHE)/kube-controller-manager-v1.37.2 \
		$(GO) test $(E2E_FLAGS) ./...

bench: build vault-server
	$(GO) run ./bench -out bench/results/latest.md
	$(GO) run ./bench/azure -out bench/results/azure.md
	bash hack/apt-install.sh softhsm2 opensc
	CGO_ENABLED=1 $(GO) run -tags pkcs11 ./bench/pkcs11 -out bench/results/pkcs11.md
	$(GO) run ./bench/vault -out bench/results/vault.md
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
	$(GO) test -run '^$$' -fuzz '^FuzzParseVersion$$' -fuzztime $(FUZZTIME) ./internal/provider/pkcs11
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeWrapped$$' -fuzztime $(FUZZTIME) ./internal/provider/pkcs11
	$(GO) test -run '^$$' -fuzz '^FuzzUnpad$$' -fuzztime $(FUZZTIME) ./internal/provider/azurekv
	$(GO) test -run '^$$' -fuzz '^FuzzParseAPIServer$$' -fuzztime $(FUZZTIME) ./internal/install
	$(GO) test -run '^$$' -fuzz '^FuzzParseEncryptionConfig$$' -fuzztime $(FUZZTIME) ./internal/install

lint: promtool
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags serveonly ./cmd/...
	CGO_ENABLED=1 $(GO) vet -tags pkcs11 ./internal/provider/pkcs11/... ./bench/pkcs11/...
	$(GO) run ./hack/importcheck -go $(GO)
	GOFLAGS=-tags=pkcs11 CGO_ENABLED=1 $(GO) run ./hack/importcheck -go $(GO)
	cd e2e && $(GO) vet ./...
	$(PROMTOOL_BIN) check rules --lint=all --lint-fatal manifests/monitoring/kms-plugin.rules.yaml

# The image, FROM scratch, built with podman from `make build`'s binaries
# without a registry (hack/image/build.sh; installs podman, buildah, runc
# when missing). Tags $(IMAGE):$(VERSION) and $(IMAGE):dev. The Dockerfile
# builds the same layout where a registry is at hand.
image: build
	VERSION=$(VERSION) REVISION=$(REVISION) bash hack/image/build.sh $(BIN) $(SERVE_BIN) \
		$(IMAGE):$(VERSION) $(IMAGE):dev

# The PKCS#11 build (cgo, glibc) on a rootfs of Debian packages unpacked
# with dpkg-deb (hack/image/pkcs11-packages); the vendor module is mounted
# at run time. Tags $(IMAGE)-pkcs11:$(VERSION) and $(IMAGE)-pkcs11:dev.
image-pkcs11: build-pkcs11
	VERSION=$(VERSION) REVISION=$(REVISION) bash hack/image/build-pkcs11.sh $(PKCS11_BIN) \
		$(IMAGE)-pkcs11:$(VERSION) $(IMAGE)-pkcs11:dev

clean:
	rm -rf bin
