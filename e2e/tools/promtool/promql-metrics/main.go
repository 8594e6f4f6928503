// Command promql-metrics lists the metric names that PromQL expressions
// select, using Prometheus's own parser (the one promtool and the Prometheus
// server use), so that a test can check every expression in the shipped
// alert rules and Grafana dashboard against the metrics the plugin exports.
//
// It reads a JSON array of expressions on standard input and writes a JSON
// array with one object per expression, in the same order:
//
//	{"expr": "...", "metrics": ["a", "b"], "error": ""}
//
// A selector without a literal metric name (for example {__name__=~"kms_.*"})
// is reported as an error: a test cannot check what it selects. Grafana
// template variables ($__rate_interval, $node, ...) must be substituted by
// the caller before the expression is parsed.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics"`
	Error   string   `json:"error,omitempty"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "promql-metrics:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	var exprs []string
	if err := json.NewDecoder(in).Decode(&exprs); err != nil {
		return fmt.Errorf("read a JSON array of expressions from stdin: %w", err)
	}
	results := make([]result, 0, len(exprs))
	for _, e := range exprs {
		results = append(results, names(e))
	}
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(results)
}

func names(expr string) result {
	r := result{Expr: expr, Metrics: []string{}}
	node, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	seen := map[string]bool{}
	var walkErr error
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		if name == "" {
			for _, m := range vs.LabelMatchers {
				if m.Name == model.MetricNameLabel && m.Type == labels.MatchEqual {
					name = m.Value
				}
			}
		}
		if name == "" {
			walkErr = fmt.Errorf("selector %s has no literal metric name", vs.String())
			return nil
		}
		seen[name] = true
		return nil
	})
	if walkErr != nil {
		r.Error = walkErr.Error()
	}
	for n := range seen {
		r.Metrics = append(r.Metrics, n)
	}
	sort.Strings(r.Metrics)
	return r
}
