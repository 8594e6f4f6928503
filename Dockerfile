# syntax=docker/dockerfile:1
# The kms-plugin image for builders with a registry at hand:
#   docker build -t kms-plugin:dev --build-arg VERSION=dev --build-arg REVISION=$(git rev-parse HEAD) .
# Without a registry, `make image` builds the same layout with podman from
# hack/image/Containerfile (FROM scratch, the binaries of `make build`).
# manifests/image_layout_test.go checks that both describe the same files,
# user, labels and entrypoint.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY internal ./internal
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/kms-plugin ./cmd/kms-plugin && \
    CGO_ENABLED=0 go build -trimpath -tags serveonly -ldflags "-s -w -X main.version=${VERSION}" -o /out/kms-plugin-serve ./cmd/kms-plugin

# The CA bundle of Debian's ca-certificates, made as make image makes it.
FROM debian:bookworm-slim AS certs
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY hack/image/ca-bundle.sh /ca-bundle.sh
RUN bash /ca-bundle.sh > /ca-certificates.crt && chmod 0644 /ca-certificates.crt

# Static binaries on nothing: no shell, no package manager, non-root by
# default.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/kms-plugin/kms-plugin
LABEL org.opencontainers.image.title="kms-plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
COPY hack/image/passwd hack/image/group /etc/
COPY --from=certs /ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# kms-plugin-serve (the serve-only build, ~16 MiB idle) is the entrypoint the
# static pod runs; kms-plugin (every command) is what the rotation CronJobs
# run, by their command.
COPY --from=build /out/kms-plugin /out/kms-plugin-serve /usr/local/bin/
# nonroot (hack/image/passwd). The static pod overrides it with
# runAsUser: 0 where the host's socket directory and root-only keyset
# require it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kms-plugin-serve"]
CMD ["serve", "--config", "/etc/kubernetes/kms-plugin/config.yaml"]
