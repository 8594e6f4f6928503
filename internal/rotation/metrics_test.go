package rotation

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// gatherState collects StateCollector(st, run) into NAME,LABEL=VALUE,... keys.
func gatherState(t *testing.T, st *State, run RunReport) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(StateCollector(st, run)); err != nil {
		t.Fatal(err)
	}
	return gatherGauges(t, reg)
}

// gatherGauges gathers g into NAME,LABEL=VALUE,... keys and the gauges'
// values (0 for a metric of another type).
func gatherGauges(t *testing.T, g prometheus.Gatherer) map[string]float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			got[key] = m.GetGauge().GetValue()
		}
	}
	return got
}

func checkMetrics(t *testing.T, step string, got map[string]float64, want map[string]float64, absent ...string) {
	t.Helper()
	for key, w := range want {
		if g, ok := got[key]; !ok || g != w {
			t.Errorf("%s: %s = %v (present %v); want %v", step, key, g, ok, w)
		}
	}
	for _, key := range absent {
		if _, ok := got[key]; ok {
			t.Errorf("%s: %s present; want absent", step, key)
		}
	}
	if t.Failed() {
		t.Logf("%s: all metrics: %v", step, got)
	}
}

// TestStateMetricsFollowRuns runs a rotation that fails, then resumes and
// completes it, then runs once more when nothing is due, and checks after
// each what the metrics rotate leaves behind say: the state read back from
// the ConfigMap after the failure, the result's state otherwise.
func TestStateMetricsFollowRuns(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 5, configmaps: 2})
	c.plugins[0].setReady(false)
	cfg := c.config()
	cfg.MinAge = time.Hour
	r := c.runner(cfg)
	res, err := runOnce(t, r)
	var se *StageError
	if !errors.As(err, &se) || se.Stage != StagePreflight {
		t.Fatalf("run with a plugin not ready = %v, %v; want a preflight StageError", res, err)
	}
	end := time.Now()
	got := gatherState(t, c.state(), RunReport{Outcome: OutcomeOf(res, err), At: end, MinAge: cfg.MinAge})
	checkMetrics(t, "failed run", got, map[string]float64{
		"kms_plugin_rotation_run_outcome,outcome=failed":          1,
		"kms_plugin_rotation_run_outcome,outcome=completed":       0,
		"kms_plugin_rotation_run_outcome,outcome=lease_held":      0,
		"kms_plugin_rotation_run_timestamp_seconds":               float64(end.UnixNano()) / 1e9,
		"kms_plugin_rotation_min_age_seconds":                     3600,
		"kms_plugin_rotation_in_progress":                         1,
		"kms_plugin_rotation_stage,stage=preflight,status=failed": 1,
		"kms_plugin_rotation_started_timestamp_seconds":           float64(c.state().Rotation.StartedAt.UnixNano()) / 1e9,
	}, "kms_plugin_rotation_last_completed_timestamp_seconds", "kms_plugin_rotation_verify_timestamp_seconds")

	c.plugins[0].setReady(true)
	res, err = runOnce(t, r)
	if err != nil || res.Outcome != OutcomeCompleted {
		t.Fatalf("resumed run = %v, %v; want completed", res, err)
	}
	lc := res.State.LastCompleted
	got = gatherState(t, res.State, RunReport{Outcome: OutcomeOf(res, err), At: time.Now(), MinAge: cfg.MinAge})
	checkMetrics(t, "completed run", got, map[string]float64{
		"kms_plugin_rotation_run_outcome,outcome=completed":                    1,
		"kms_plugin_rotation_run_outcome,outcome=failed":                       0,
		"kms_plugin_rotation_in_progress":                                      0,
		"kms_plugin_rotation_stage,stage=done,status=completed":                1,
		"kms_plugin_rotation_last_completed_timestamp_seconds":                 float64(lc.FinishedAt.UnixNano()) / 1e9,
		"kms_plugin_rotation_objects,outcome=rewritten,resource=secrets":       5,
		"kms_plugin_rotation_objects,outcome=rewritten,resource=configmaps":    2,
		"kms_plugin_rotation_objects,outcome=failed,resource=secrets":          0,
		"kms_plugin_rotation_verify_objects,resource=secrets,state=current":    6, // and the canary
		"kms_plugin_rotation_verify_objects,resource=secrets,state=stale":      0,
		"kms_plugin_rotation_verify_objects,resource=configmaps,state=current": 2,
		"kms_plugin_rotation_verify_timestamp_seconds":                         float64(res.State.LastVerify.At.UnixNano()) / 1e9,
	}, "kms_plugin_rotation_stage,stage=preflight,status=failed")

	res, err = runOnce(t, r)
	if err != nil || res.Outcome != OutcomeNotDue {
		t.Fatalf("third run = %v, %v; want not due", res, err)
	}
	got = gatherState(t, res.State, RunReport{Outcome: OutcomeOf(res, err), At: time.Now(), MinAge: cfg.MinAge})
	checkMetrics(t, "run not due", got, map[string]float64{
		"kms_plugin_rotation_run_outcome,outcome=not_due":      1,
		"kms_plugin_rotation_run_outcome,outcome=completed":    0,
		"kms_plugin_rotation_last_completed_timestamp_seconds": float64(lc.FinishedAt.UnixNano()) / 1e9,
		"kms_plugin_rotation_in_progress":                      0,
	})
}

// TestStateMetricsStaleObjects: a verify that found objects under the old
// key is what the stale-objects alert reads.
func TestStateMetricsStaleObjects(t *testing.T) {
	st := &State{LastVerify: &Report{At: time.Unix(1700000000, 0), Resources: []ResourceReport{{
		Resource: "secrets", Total: 10, Stale: 3, Unencrypted: 1,
		ByKey: []KeyReport{{Kind: "kms/v2", KeyID: "new", Count: 6, Current: true}, {Kind: "kms/v2", KeyID: "old", Count: 3}},
	}}}}
	got := gatherState(t, st, RunReport{Outcome: RunFailed})
	checkMetrics(t, "stale", got, map[string]float64{
		"kms_plugin_rotation_verify_objects,resource=secrets,state=current":     6,
		"kms_plugin_rotation_verify_objects,resource=secrets,state=stale":       3,
		"kms_plugin_rotation_verify_objects,resource=secrets,state=unencrypted": 1,
		"kms_plugin_rotation_verify_timestamp_seconds":                          1700000000,
		"kms_plugin_rotation_in_progress":                                       0,
	}, "kms_plugin_rotation_run_timestamp_seconds")
}

func TestOutcomeOf(t *testing.T) {
	for _, tt := range []struct {
		res  *Result
		err  error
		want RunOutcome
	}{
		{&Result{Outcome: OutcomeCompleted}, nil, RunCompleted},
		{&Result{Outcome: OutcomeNotDue}, nil, RunNotDue},
		{&Result{Outcome: OutcomeDryRun}, nil, RunDryRun},
		{nil, &StageError{Stage: StageVerify, Err: errors.New("stale")}, RunFailed},
		{nil, &LeaseHeldError{Holder: "other"}, RunLeaseHeld},
		{nil, nil, RunFailed},
	} {
		if got := OutcomeOf(tt.res, tt.err); got != tt.want {
			t.Errorf("OutcomeOf(%v, %v) = %q; want %q", tt.res, tt.err, got, tt.want)
		}
	}
}

// TestWriteMetricsFile checks the file node_exporter reads: the text
// format, world-readable, replaced whole, no temporary file left; and a
// directory that does not exist is an error that creates nothing.
func TestWriteMetricsFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kms-plugin-rotate.prom")
	if err := os.WriteFile(path, []byte("kms_plugin_rotation_run_outcome{outcome=\"failed\"} 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	st := &State{LastCompleted: &Completed{FinishedAt: time.Unix(1700000000, 0)}}
	if err := WriteMetricsFile(path, st, RunReport{Outcome: RunNotDue, At: time.Unix(1700003600, 0), MinAge: 720 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"# TYPE kms_plugin_rotation_run_outcome gauge",
		`kms_plugin_rotation_run_outcome{outcome="not_due"} 1`,
		`kms_plugin_rotation_run_outcome{outcome="failed"} 0`,
		"kms_plugin_rotation_last_completed_timestamp_seconds 1.7e+09",
		"kms_plugin_rotation_run_timestamp_seconds 1.7000036e+09",
		"kms_plugin_rotation_min_age_seconds 2.592e+06",
		"kms_plugin_rotation_in_progress 0",
	} {
		if !strings.Contains(string(data), line+"\n") {
			t.Errorf("file lacks %q:\n%s", line, data)
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %v; want 0644 (node_exporter reads it)", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries; want only the metrics file", len(entries))
	}
	missing := filepath.Join(dir, "no-such-dir", "x.prom")
	if err := WriteMetricsFile(missing, nil, RunReport{Outcome: RunFailed}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("write into a missing directory = %v; want an error naming the path", err)
	}
	if _, err := os.Stat(filepath.Dir(missing)); !os.IsNotExist(err) {
		t.Fatalf("the missing directory was created: %v", err)
	}
}
