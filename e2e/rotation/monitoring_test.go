package rotation

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// promqlMetricsVersion is the tools module's Prometheus version
// (e2e/tools/build.sh PROMETHEUS_VERSION).
const promqlMetricsVersion = "v0.316.0"

// externalMetrics are the metrics the shipped expressions may name that
// neither the plugin nor rotate exports: Prometheus's own per-target up.
var externalMetrics = []string{"up"}

// TestMonitoringNamesOnlyExportedMetrics checks the shipped alert rules and
// Grafana dashboard against what runs: every metric any of their PromQL
// expressions names must be one that a running plugin (on the Key Vault
// test server, so that its circuit breaker is exported too) serves on
// /metrics, or that rotate writes with --metrics-textfile, or one the rules
// record themselves. Prometheus's own parser (promql-metrics, built by
// e2e/tools/build.sh promtool) reads the expressions. On the way it checks
// the metrics file two rotate runs leave: a completed rotation, then a run
// not due that keeps the last completion's time.
func TestMonitoringNamesOnlyExportedMetrics(t *testing.T) {
	parser := promqlMetricsBinary(t)
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	exprs, recorded := shippedExpressions(t, filepath.Join(root, "manifests", "monitoring"))
	names := parseMetricNames(t, parser, exprs)

	e := startEnv(t, envConfig{nodes: 1, azure: true, resources: []string{"secrets"}})
	t.Cleanup(e.h.ProbeReadyz(3 * time.Second))
	e.populate(t, []string{"monitoring-0"}, 20, 0)
	ctx := context.Background()

	textfile := filepath.Join(e.dir, "kms-plugin-rotate.prom")
	before := time.Now()
	e.runRotate(t, 0, nil, "--metrics-textfile", textfile)
	first := readExposition(t, textfile)
	for series, want := range map[string]float64{
		`kms_plugin_rotation_run_outcome{outcome="completed"}`:                 1,
		`kms_plugin_rotation_run_outcome{outcome="failed"}`:                    0,
		`kms_plugin_rotation_in_progress`:                                      0,
		`kms_plugin_rotation_stage{stage="done",status="completed"}`:           1,
		`kms_plugin_rotation_verify_objects{resource="secrets",state="stale"}`: 0,
		`kms_plugin_rotation_min_age_seconds`:                                  0,
	} {
		if got, ok := first.values[series]; !ok || got != want {
			t.Errorf("after a completed rotation: %s = %v (present %v); want %v", series, got, ok, want)
		}
	}
	if n := first.values[`kms_plugin_rotation_verify_objects{resource="secrets",state="current"}`]; n < 20 {
		t.Errorf("verify counted %v current Secrets; want at least the 20 created", n)
	}
	completed, ok := first.values["kms_plugin_rotation_last_completed_timestamp_seconds"]
	if !ok || completed < float64(before.Unix()) || completed > float64(time.Now().Unix()+1) {
		t.Errorf("last completed at %v (present %v); want within this test's run, after %d", completed, ok, before.Unix())
	}

	// Not due: the file now says so, and still when the last one completed.
	e.runRotate(t, 0, nil, "--metrics-textfile", textfile, "--min-age", "1h")
	second := readExposition(t, textfile)
	for series, want := range map[string]float64{
		`kms_plugin_rotation_run_outcome{outcome="not_due"}`:   1,
		`kms_plugin_rotation_run_outcome{outcome="completed"}`: 0,
		`kms_plugin_rotation_min_age_seconds`:                  3600,
		`kms_plugin_rotation_last_completed_timestamp_seconds`: completed,
	} {
		if got, ok := second.values[series]; !ok || got != want {
			t.Errorf("after a run not due: %s = %v (present %v); want %v", series, got, ok, want)
		}
	}
	if second.values["kms_plugin_rotation_run_timestamp_seconds"] <= first.values["kms_plugin_rotation_run_timestamp_seconds"] {
		t.Errorf("the second run's file keeps the first run's time")
	}

	code, body, err := e.h.Nodes[0].Plugin.Get(ctx, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	plugin := parseExposition(t, "plugin /metrics", body)
	if _, ok := plugin.values[`kms_plugin_provider_circuit_breaker_state{provider="azurekeyvault",state="closed"}`]; !ok {
		t.Errorf("the plugin on the Key Vault test server exports no closed circuit breaker:\n%s", body)
	}

	exported := map[string]string{}
	for _, n := range externalMetrics {
		exported[n] = "Prometheus"
	}
	for n := range plugin.names {
		exported[n] = "plugin"
	}
	for n := range first.names {
		exported[n] = "rotate --metrics-textfile"
	}
	for n := range recorded {
		exported[n] = "a recording rule"
	}
	checked := 0
	for _, r := range names {
		for _, m := range r.Metrics {
			checked++
			if _, ok := exported[m]; !ok {
				t.Errorf("%s: %q names %s, which neither the plugin, rotate nor a recording rule exports", r.source, r.Expr, m)
			}
		}
	}
	t.Logf("%d expressions, %d metric references checked against %d exported names", len(names), checked, len(exported))
}

// promqlMetricsBinary returns $PROMQL_METRICS_BIN or the one
// e2e/tools/build.sh caches. Without it the test fails under CI=true and is
// skipped otherwise.
func promqlMetricsBinary(t *testing.T) string {
	t.Helper()
	path := os.Getenv("PROMQL_METRICS_BIN")
	if path == "" {
		dir := os.Getenv(cluster.EnvCache)
		if dir == "" {
			root, err := cluster.RepoRoot()
			if err != nil {
				t.Fatal(err)
			}
			dir = filepath.Join(root, ".cache", "bin")
		}
		path = filepath.Join(dir, "promql-metrics-"+promqlMetricsVersion)
	}
	if _, err := os.Stat(path); err != nil {
		msg := fmt.Sprintf("promql-metrics is not built (%v): run `bash e2e/tools/build.sh promtool`", err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}

// expr is one PromQL expression and where it comes from.
type expr struct{ source, text string }

// shippedExpressions returns every PromQL expression of the rules file and
// the dashboard, and the names the rules record.
func shippedExpressions(t *testing.T, dir string) ([]expr, map[string]bool) {
	t.Helper()
	var out []expr
	recorded := map[string]bool{}
	data, err := os.ReadFile(filepath.Join(dir, "kms-plugin.rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.ToJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct{ Alert, Record, Expr string } `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(js, &rules); err != nil {
		t.Fatal(err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			out = append(out, expr{"rule " + r.Alert + r.Record, r.Expr})
			if r.Record != "" {
				recorded[r.Record] = true
			}
		}
	}
	nRules := len(out)

	data, err = os.ReadFile(filepath.Join(dir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			if tg.Expr != "" {
				out = append(out, expr{"dashboard panel " + strconv.Quote(p.Title), grafanaToPromQL(tg.Expr)})
			}
		}
	}
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*[a-zA-Z_][a-zA-Z0-9_]*\)$`)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			var s string
			if err := json.Unmarshal(v.Query, &s); err != nil {
				t.Fatalf("dashboard variable %s: query %s", v.Name, v.Query)
			}
			q.Query = s
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil {
			t.Fatalf("dashboard variable %s: query %q is not label_values(SELECTOR, LABEL)", v.Name, q.Query)
		}
		out = append(out, expr{"dashboard variable " + v.Name, grafanaToPromQL(m[1])})
	}
	if nRules < 14 || len(out)-nRules < 20 {
		t.Fatalf("found %d rule and %d dashboard expressions; want every rule and panel", nRules, len(out)-nRules)
	}
	return out, recorded
}

var (
	grafanaIntervals = regexp.MustCompile(`\$__(rate_interval|interval|range)\b`)
	grafanaVariables = regexp.MustCompile(`\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?`)
)

// grafanaToPromQL substitutes Grafana's interval variables with 5m and the
// dashboard's own variables (used inside label matchers) with .*.
func grafanaToPromQL(s string) string {
	s = grafanaIntervals.ReplaceAllString(s, "5m")
	return grafanaVariables.ReplaceAllString(s, ".*")
}

// parsed is what promql-metrics said of one expression.
type parsed struct {
	source  string
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics"`
	Error   string   `json:"error"`
}

// parseMetricNames runs promql-metrics on every expression; a parse error
// fails the test.
func parseMetricNames(t *testing.T, bin string, exprs []expr) []parsed {
	t.Helper()
	texts := make([]string, len(exprs))
	for i, e := range exprs {
		texts[i] = e.text
	}
	in, err := json.Marshal(texts)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("promql-metrics: %v\n%s", err, stderr.Bytes())
	}
	var res []parsed
	if err := json.Unmarshal(out, &res); err != nil || len(res) != len(exprs) {
		t.Fatalf("promql-metrics: %d results for %d expressions (%v)", len(res), len(exprs), err)
	}
	for i := range res {
		res[i].source = exprs[i].source
		if res[i].Error != "" {
			t.Errorf("%s: %q: %s", res[i].source, res[i].Expr, res[i].Error)
		}
		if len(res[i].Metrics) == 0 && res[i].Error == "" {
			t.Errorf("%s: %q names no metric", res[i].source, res[i].Expr)
		}
	}
	return res
}

// exposition is a Prometheus text exposition: the sample values by series
// as written (NAME{LABELS}) and the metric names of its samples.
type exposition struct {
	values map[string]float64
	names  map[string]bool
}

func readExposition(t *testing.T, path string) exposition {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return parseExposition(t, path, data)
}

// parseExposition reads the text format: "# HELP", "# TYPE" and sample
// lines "SERIES VALUE". A histogram's samples carry their own names
// (NAME_bucket, NAME_sum, NAME_count), which are what PromQL selects.
func parseExposition(t *testing.T, what string, data []byte) exposition {
	t.Helper()
	x := exposition{values: map[string]float64{}, names: map[string]bool{}}
	s := bufio.NewScanner(bytes.NewReader(data))
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		line := s.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("%s: bad line %q", what, line)
		}
		series := line[:i]
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("%s: line %q: %v", what, line, err)
		}
		x.values[series] = v
		name, _, _ := strings.Cut(series, "{")
		x.names[name] = true
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	if len(x.names) == 0 {
		t.Fatalf("%s: no samples", what)
	}
	t.Logf("%s: %d metric names: %s", what, len(x.names), strings.Join(slices.Sorted(maps.Keys(x.names)), " "))
	return x
}
