# syntax=docker/dockerfile:1
# Build: docker build -t kms-plugin:dev --build-arg VERSION=dev .
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY internal ./internal
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/kms-plugin ./cmd/kms-plugin && \
    CGO_ENABLED=0 go build -trimpath -tags serveonly -ldflags "-s -w -X main.version=${VERSION}" -o /out/kms-plugin-serve ./cmd/kms-plugin

# Static binary on distroless: no shell, no package manager, non-root by
# default. The static pod overrides the user to root only where the host's
# socket and keyset directories require it.
FROM gcr.io/distroless/static-debian12:nonroot
# kms-plugin-serve (the serve-only build, ~15 MiB idle) is the entrypoint the
# static pod runs; kms-plugin (every command) is what the rotation CronJob
# runs, by its command.
COPY --from=build /out/kms-plugin /out/kms-plugin-serve /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/kms-plugin-serve"]
CMD ["serve", "--config", "/etc/kubernetes/kms-plugin/config.yaml"]
