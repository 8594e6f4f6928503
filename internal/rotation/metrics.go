package rotation

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// collector exports the rotation in progress at every scrape: its stage
// and the re-encryption counters per resource. Labels are bounded: stage,
// status, resource and outcome names only.
type collector struct {
	cur *atomic.Pointer[run]
}

var (
	stageDesc = prometheus.NewDesc("kms_plugin_rotation_stage",
		"1 for the rotation's current stage and status.", []string{"stage", "status"}, nil)
	objectsDesc = prometheus.NewDesc("kms_plugin_rotation_objects",
		"Objects of the current rotation's re-encryption by resource and outcome (listed, rewritten, current, deleted, conflicts_retried, failed).",
		[]string{"resource", "outcome"}, nil)
	estimateDesc = prometheus.NewDesc("kms_plugin_rotation_objects_estimate",
		"Objects of the resource as the apiserver announced when listing.", []string{"resource"}, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- stageDesc
	ch <- objectsDesc
	ch <- estimateDesc
}

// Collect shows the state as last saved, with the live counts of the
// resource being re-encrypted.
func (c collector) Collect(ch chan<- prometheus.Metric) {
	x := c.cur.Load()
	if x == nil {
		return
	}
	v := x.saved.Load()
	if v == nil {
		return
	}
	live := x.live.Load()
	ch <- prometheus.MustNewConstMetric(stageDesc, prometheus.GaugeValue, 1, string(v.stage), string(v.status))
	progress := make([]ResourceProgress, 0, len(v.progress))
	for _, p := range v.progress {
		if live != nil && live.base.Resource == p.Resource {
			p = live.snapshot()
		}
		progress = append(progress, p)
	}
	collectProgress(ch, progress)
}

// collectProgress exports the re-encryption counters of each resource.
func collectProgress(ch chan<- prometheus.Metric, progress []ResourceProgress) {
	for _, p := range progress {
		for outcome, n := range map[string]int64{
			"listed": p.Listed, "rewritten": p.Rewritten, "current": p.SkippedCurrent,
			"deleted": p.SkippedDeleted, "conflicts_retried": p.ConflictsRetried, "failed": p.Failed,
		} {
			ch <- prometheus.MustNewConstMetric(objectsDesc, prometheus.GaugeValue, float64(n), p.Resource, outcome)
		}
		ch <- prometheus.MustNewConstMetric(estimateDesc, prometheus.GaugeValue, float64(p.Estimate), p.Resource)
	}
}

// RunOutcome is how one run of rotate ended, as its metrics say.
type RunOutcome string

// Run outcomes: the values of kms_plugin_rotation_run_outcome's outcome
// label.
const (
	RunCompleted RunOutcome = "completed"
	RunNotDue    RunOutcome = "not_due"
	RunDryRun    RunOutcome = "dry_run"
	RunFailed    RunOutcome = "failed"
	RunLeaseHeld RunOutcome = "lease_held"
)

// RunOutcomes lists every RunOutcome.
func RunOutcomes() []RunOutcome {
	return []RunOutcome{RunCompleted, RunNotDue, RunDryRun, RunFailed, RunLeaseHeld}
}

// OutcomeOf classifies what Run returned.
func OutcomeOf(res *Result, err error) RunOutcome {
	var held *LeaseHeldError
	switch {
	case errors.As(err, &held):
		return RunLeaseHeld
	case err != nil || res == nil:
		return RunFailed
	case res.Outcome == OutcomeNotDue:
		return RunNotDue
	case res.Outcome == OutcomeDryRun:
		return RunDryRun
	default:
		return RunCompleted
	}
}

// RunReport is how a run ended, for StateCollector.
type RunReport struct {
	Outcome RunOutcome
	// At is when the run ended.
	At time.Time
	// MinAge is the run's minimum age between rotations (rotate
	// --min-age), so that an alert can tell an overdue rotation without
	// knowing the schedule.
	MinAge time.Duration
}

var (
	runOutcomeDesc = prometheus.NewDesc("kms_plugin_rotation_run_outcome",
		"1 for how the last run of rotate ended (completed, not_due, dry_run, failed, lease_held), 0 for the others.", []string{"outcome"}, nil)
	runTimeDesc = prometheus.NewDesc("kms_plugin_rotation_run_timestamp_seconds",
		"Unix time the last run of rotate ended.", nil, nil)
	minAgeDesc = prometheus.NewDesc("kms_plugin_rotation_min_age_seconds",
		"The last run's --min-age: no rotation starts sooner after the previous one.", nil, nil)
	lastCompletedDesc = prometheus.NewDesc("kms_plugin_rotation_last_completed_timestamp_seconds",
		"Unix time the last rotation completed (absent before the first).", nil, nil)
	inProgressDesc = prometheus.NewDesc("kms_plugin_rotation_in_progress",
		"1 while a rotation is started and not completed (the next run resumes it).", nil, nil)
	startedDesc = prometheus.NewDesc("kms_plugin_rotation_started_timestamp_seconds",
		"Unix time the rotation in progress, or the last one, started.", nil, nil)
	verifyObjectsDesc = prometheus.NewDesc("kms_plugin_rotation_verify_objects",
		"Objects the last verify counted in etcd by resource and state: current (under the new key_id), stale (under another key or provider) or unencrypted.",
		[]string{"resource", "state"}, nil)
	verifyTimeDesc = prometheus.NewDesc("kms_plugin_rotation_verify_timestamp_seconds",
		"Unix time of the last verify.", nil, nil)
)

// stateCollector exports a rotation State and how the run that left it
// ended.
type stateCollector struct {
	st  *State
	run RunReport
}

// StateCollector returns a collector of what st (the state as saved in the
// ConfigMap; nil when it could not be read) says and of how the run ended:
// the metrics rotate leaves behind for the alerts after it exits (rotate
// --metrics-textfile). Its labels are bounded like the live metrics':
// outcome, stage, status, resource and state names only.
func StateCollector(st *State, run RunReport) prometheus.Collector {
	return stateCollector{st: st, run: run}
}

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{runOutcomeDesc, runTimeDesc, minAgeDesc, lastCompletedDesc, inProgressDesc,
		startedDesc, stageDesc, objectsDesc, estimateDesc, verifyObjectsDesc, verifyTimeDesc} {
		ch <- d
	}
}

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	unix := func(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
	for _, o := range RunOutcomes() {
		gauge(runOutcomeDesc, boolValue(o == c.run.Outcome), string(o))
	}
	if !c.run.At.IsZero() {
		gauge(runTimeDesc, unix(c.run.At))
	}
	gauge(minAgeDesc, c.run.MinAge.Seconds())
	st := c.st
	if st == nil {
		return
	}
	if lc := st.LastCompleted; lc != nil && !lc.FinishedAt.IsZero() {
		gauge(lastCompletedDesc, unix(lc.FinishedAt))
	}
	gauge(inProgressDesc, boolValue(st.InProgress()))
	if rot := st.Rotation; rot != nil {
		if !rot.StartedAt.IsZero() {
			gauge(startedDesc, unix(rot.StartedAt))
		}
		gauge(stageDesc, 1, string(rot.Stage), string(rot.Status))
		collectProgress(ch, rot.Progress)
	}
	if v := st.LastVerify; v != nil {
		for _, r := range v.Resources {
			current := 0
			for _, k := range r.ByKey {
				if k.Current {
					current += k.Count
				}
			}
			gauge(verifyObjectsDesc, float64(current), r.Resource, "current")
			gauge(verifyObjectsDesc, float64(r.Stale), r.Resource, "stale")
			gauge(verifyObjectsDesc, float64(r.Unencrypted), r.Resource, "unencrypted")
		}
		if !v.At.IsZero() {
			gauge(verifyTimeDesc, unix(v.At))
		}
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// WriteMetricsFile writes the metrics of StateCollector(st, run) to path in
// the Prometheus text format, for node_exporter's textfile collector: to a
// temporary file in the same directory first, renamed over path, so that a
// scrape never reads half a file. The file holds no secret (stage names,
// counts, times), and is world-readable as node_exporter expects.
func WriteMetricsFile(path string, st *State, run RunReport) error {
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(StateCollector(st, run)); err != nil {
		return fmt.Errorf("rotation metrics: %w", err)
	}
	if err := prometheus.WriteToTextfile(path, reg); err != nil {
		return fmt.Errorf("write rotation metrics to %s: %w", path, err)
	}
	return nil
}
