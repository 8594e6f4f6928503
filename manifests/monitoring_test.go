package manifests

import (
	"encoding/json"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The monitoring files (manifests/monitoring): the rules as a plain
// Prometheus rules file and as a PrometheusRule, and promtool's unit tests.
const (
	rulesFile          = "monitoring/kms-plugin.rules.yaml"
	prometheusRuleFile = "monitoring/prometheusrule.yaml"
	ruleTestsGlob      = "monitoring/tests/*.yaml"
	runbookURLPrefix   = "https://github.com/kms-plugin/kms-plugin#"
)

// promtool returns the promtool binary named by PROMTOOL_BIN. Without it the
// test fails under CI=true (make lint and make unit build it and set it) and
// is skipped otherwise.
func promtool(t *testing.T) string {
	t.Helper()
	p := os.Getenv("PROMTOOL_BIN")
	why := "PROMTOOL_BIN is not set"
	if p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		why = "PROMTOOL_BIN=" + p + " does not exist"
	}
	msg := why + ": build it with `bash e2e/tools/build.sh promtool` (make lint does)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// ruleGroups is a rules file's content (and a PrometheusRule's spec).
type ruleGroups struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []rule `json:"rules"`
	} `json:"groups"`
}

type rule struct {
	Alert       string            `json:"alert"`
	Record      string            `json:"record"`
	Expr        string            `json:"expr"`
	For         string            `json:"for"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func readRules(t *testing.T) ruleGroups {
	t.Helper()
	var rg ruleGroups
	readYAML(t, rulesFile, &rg)
	if len(rg.Groups) == 0 {
		t.Fatalf("%s: no groups", rulesFile)
	}
	return rg
}

func alerts(rg ruleGroups) []rule {
	var out []rule
	for _, g := range rg.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				out = append(out, r)
			}
		}
	}
	return out
}

// TestPrometheusRuleMatchesRulesFile: the PrometheusRule carries exactly
// the rules file's groups. With UPDATE_PROMETHEUSRULE=1 it first rewrites
// the PrometheusRule's spec from the rules file (its header kept).
func TestPrometheusRuleMatchesRulesFile(t *testing.T) {
	if os.Getenv("UPDATE_PROMETHEUSRULE") == "1" {
		regeneratePrometheusRule(t)
	}
	var plain, cr map[string]any
	for name, into := range map[string]*map[string]any{rulesFile: &plain, prometheusRuleFile: &cr} {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, into); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if cr["apiVersion"] != "monitoring.coreos.com/v1" || cr["kind"] != "PrometheusRule" {
		t.Fatalf("%s is %v %v; want monitoring.coreos.com/v1 PrometheusRule", prometheusRuleFile, cr["apiVersion"], cr["kind"])
	}
	spec, _ := cr["spec"].(map[string]any)
	if len(plain) != 1 || plain["groups"] == nil {
		t.Fatalf("%s: want only groups at the top, got %v", rulesFile, slices.Sorted(maps.Keys(plain)))
	}
	if !reflect.DeepEqual(spec, plain) {
		t.Fatalf("%s's spec differs from %s: regenerate it with UPDATE_PROMETHEUSRULE=1 go test ./manifests -run TestPrometheusRuleMatchesRulesFile", prometheusRuleFile, rulesFile)
	}
}

// regeneratePrometheusRule writes the PrometheusRule as its header (up to
// "spec:") followed by the rules file's groups, indented under spec.
func regeneratePrometheusRule(t *testing.T) {
	t.Helper()
	cr, err := os.ReadFile(prometheusRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	header, _, ok := strings.Cut(string(cr), "\nspec:\n")
	_, groups, ok2 := strings.Cut(string(plain), "\ngroups:\n")
	if !ok || !ok2 {
		t.Fatalf("want a line \"spec:\" in %s and \"groups:\" in %s", prometheusRuleFile, rulesFile)
	}
	var b strings.Builder
	b.WriteString(header + "\nspec:\n  groups:\n")
	for _, line := range strings.SplitAfter(groups, "\n") {
		if strings.TrimSpace(line) != "" {
			b.WriteString("  ")
		}
		b.WriteString(line)
	}
	if err := os.WriteFile(prometheusRuleFile, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRulesAreComplete: every alert has a severity, a summary, a
// description and a runbook_url pointing at its own section of README.md,
// whose section says what to run first.
func TestRulesAreComplete(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	rg := readRules(t)
	as := alerts(rg)
	if len(as) < 13 {
		t.Fatalf("%d alerts; want at least the 13 of the issue", len(as))
	}
	for _, a := range as {
		if s := a.Labels["severity"]; s != "warning" && s != "critical" {
			t.Errorf("%s: severity %q; want warning or critical", a.Alert, s)
		}
		for _, k := range []string{"summary", "description", "runbook_url"} {
			if a.Annotations[k] == "" {
				t.Errorf("%s: no %s annotation", a.Alert, k)
			}
		}
		if want := runbookURLPrefix + strings.ToLower(a.Alert); a.Annotations["runbook_url"] != want {
			t.Errorf("%s: runbook_url %q; want %q", a.Alert, a.Annotations["runbook_url"], want)
		}
		section := readmeSection(string(readme), a.Alert)
		if section == "" {
			t.Errorf("README.md has no heading \"#### %s\" (the alert's runbook)", a.Alert)
			continue
		}
		if !strings.Contains(strings.Join(strings.Fields(section), " "), "First command") || !strings.Contains(section, "```") {
			t.Errorf("README.md section %s: want what it means and a \"First command\" code block", a.Alert)
		}
	}
}

// readmeSection returns the text under "#### NAME" up to the next heading.
func readmeSection(readme, name string) string {
	_, after, ok := strings.Cut(readme, "\n#### "+name+"\n")
	if !ok {
		return ""
	}
	if i := regexp.MustCompile(`\n#{1,4} `).FindStringIndex(after); i != nil {
		after = after[:i[0]]
	}
	return after
}

// ruleTests is the part of a promtool test file this test reads.
type ruleTests struct {
	RuleFiles []string `json:"rule_files"`
	Tests     []struct {
		Name          string `json:"name"`
		AlertRuleTest []struct {
			Alertname string           `json:"alertname"`
			ExpAlerts []map[string]any `json:"exp_alerts"`
		} `json:"alert_rule_test"`
	} `json:"tests"`
}

// TestEveryAlertIsUnitTested: the promtool tests cover every alert both
// firing and not firing, and load the rules file.
func TestEveryAlertIsUnitTested(t *testing.T) {
	files, err := filepath.Glob(ruleTestsGlob)
	if err != nil || len(files) == 0 {
		t.Fatalf("no promtool tests in %s (%v)", ruleTestsGlob, err)
	}
	firing, quiet := map[string]bool{}, map[string]bool{}
	for _, f := range files {
		var rt ruleTests
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, &rt); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if !slices.Equal(rt.RuleFiles, []string{"../kms-plugin.rules.yaml"}) {
			t.Errorf("%s: rule_files %v; want the shipped rules file", f, rt.RuleFiles)
		}
		for _, tc := range rt.Tests {
			for _, art := range tc.AlertRuleTest {
				if len(art.ExpAlerts) > 0 {
					firing[art.Alertname] = true
				} else {
					quiet[art.Alertname] = true
				}
			}
		}
	}
	for _, a := range alerts(readRules(t)) {
		if !firing[a.Alert] {
			t.Errorf("%s: no promtool test where it fires", a.Alert)
		}
		if !quiet[a.Alert] {
			t.Errorf("%s: no promtool test where it does not fire", a.Alert)
		}
	}
}

// TestPromtoolCheckRules runs `promtool check rules` with its linter on the
// rules file.
func TestPromtoolCheckRules(t *testing.T) {
	bin := promtool(t)
	out, err := exec.Command(bin, "check", "rules", "--lint=all", "--lint-fatal", rulesFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "SUCCESS") {
		t.Fatalf("promtool check rules said no SUCCESS:\n%s", out)
	}
}

// TestPromtoolTestRules runs the promtool unit tests of every alert.
func TestPromtoolTestRules(t *testing.T) {
	bin := promtool(t)
	files, err := filepath.Glob(ruleTestsGlob)
	if err != nil || len(files) == 0 {
		t.Fatalf("no promtool tests in %s (%v)", ruleTestsGlob, err)
	}
	out, err := exec.Command(bin, append([]string{"test", "rules"}, files...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
	if n := strings.Count(string(out), "SUCCESS"); n != len(files) {
		t.Fatalf("promtool test rules: %d SUCCESS for %d files:\n%s", n, len(files), out)
	}
}

// TestDashboardShape: the Grafana dashboard parses, every panel queries
// Prometheus through the dashboard's data source variable, and it shows
// what an operator needs (each topic by the metric it rests on). That
// every metric it names exists is e2e/rotation's
// TestMonitoringNamesOnlyExportedMetrics.
func TestDashboardShape(t *testing.T) {
	data, err := os.ReadFile("monitoring/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource map[string]any `json:"datasource"`
	}
	var dash struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			Type    string   `json:"type"`
			Title   string   `json:"title"`
			Targets []target `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatal(err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Fatalf("dashboard uid %q, title %q; want both", dash.UID, dash.Title)
	}
	var all strings.Builder
	titles := map[string]bool{}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if titles[p.Title] {
			t.Errorf("two panels titled %q", p.Title)
		}
		titles[p.Title] = true
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if tg.Expr == "" || tg.RefID == "" || refs[tg.RefID] {
				t.Errorf("panel %q: target %+v: want an expression and a refId of its own", p.Title, tg)
			}
			refs[tg.RefID] = true
			if tg.Datasource["uid"] != "${datasource}" {
				t.Errorf("panel %q: data source %v; want the ${datasource} variable", p.Title, tg.Datasource)
			}
			all.WriteString(tg.Expr + "\n")
		}
	}
	for topic, metric := range map[string]string{
		"latency":             "kms_plugin_grpc_request_duration_seconds_bucket",
		"outcomes":            "kms_plugin_grpc_requests_total",
		"cache hit rate":      `kms_plugin_kek_cache_lookups_total{job=~"$job", instance=~"$instance", result="hit"}`,
		"remote calls":        "kms_plugin_provider_calls_total",
		"key_id per node":     "kms_plugin_key_id_info",
		"rotation progress":   "kms_plugin_rotation_objects",
		"rotation stage":      "kms_plugin_rotation_stage",
		"last rotation":       "kms_plugin_rotation_last_completed_timestamp_seconds",
		"circuit breaker":     "kms_plugin_provider_circuit_breaker_state",
		"key store freshness": "kms_plugin_provider_last_success_timestamp_seconds",
	} {
		if !strings.Contains(all.String(), metric) {
			t.Errorf("no panel shows %s (%s)", topic, metric)
		}
	}
}
