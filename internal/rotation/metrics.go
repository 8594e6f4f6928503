package rotation

import (
	"sync/atomic"

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
	for _, p := range v.progress {
		if live != nil && live.base.Resource == p.Resource {
			p = live.snapshot()
		}
		for outcome, n := range map[string]int64{
			"listed": p.Listed, "rewritten": p.Rewritten, "current": p.SkippedCurrent,
			"deleted": p.SkippedDeleted, "conflicts_retried": p.ConflictsRetried, "failed": p.Failed,
		} {
			ch <- prometheus.MustNewConstMetric(objectsDesc, prometheus.GaugeValue, float64(n), p.Resource, outcome)
		}
		ch <- prometheus.MustNewConstMetric(estimateDesc, prometheus.GaugeValue, float64(p.Estimate), p.Resource)
	}
}
