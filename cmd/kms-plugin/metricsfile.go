//go:build !serveonly

package main

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"

	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// metricsFileRun is what a run of rotate knows, as it goes, for the file
// of --metrics-textfile: the cluster client once built, the result once
// Run returned, the logger once configured.
type metricsFileRun struct {
	client kubernetes.Interface
	result *rotation.Result
	log    *zap.Logger
}

// write writes the metrics a run of rotate leaves behind once it exits:
// how it ended (runErr, m.result) and what the state ConfigMap says (last
// completed rotation, stage, progress, last verify). The state is the
// run's result, or read again from the cluster when the run failed. It
// returns runErr when the run failed (a failure to write the file is then
// only logged), else the write error: a file that is not updated would
// keep an old outcome on the alerts.
func (m *metricsFileRun) write(ctx context.Context, path, namespace, name string, minAge time.Duration, runErr error) error {
	log := m.log
	if log == nil {
		log = zap.NewNop()
	}
	report := rotation.RunReport{Outcome: rotation.OutcomeOf(m.result, runErr), At: time.Now(), MinAge: minAge}
	var st *rotation.State
	if m.result != nil {
		st = m.result.State
	}
	if st == nil && m.client != nil {
		// The run may have stopped because ctx ended (SIGTERM): still
		// read the state it saved.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		var err error
		st, err = rotation.LoadState(lctx, m.client, namespace, name)
		cancel()
		if err != nil {
			log.Warn("metrics file: could not read the rotation state; writing the run's outcome only", zap.Error(err))
		}
	}
	err := rotation.WriteMetricsFile(path, st, report)
	switch {
	case err != nil && runErr != nil:
		log.Error("could not write the metrics file", zap.String("path", path), zap.Error(err))
		return runErr
	case err != nil:
		return fmt.Errorf("--metrics-textfile: %w", err)
	default:
		return runErr
	}
}
