//go:build tools

// Package tools records the promtool command as a dependency of this module so
// that go.mod and go.sum pin it; build.sh builds it with
// `go build github.com/prometheus/prometheus/cmd/promtool`.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
