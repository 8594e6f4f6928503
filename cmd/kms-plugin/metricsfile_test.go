//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestRotateMetricsTextfile runs rotate with --metrics-textfile through a
// failure, the resumed rotation, a run that finds the Lease held and a file
// that cannot be written, and reads what each run left in the file.
func TestRotateMetricsTextfile(t *testing.T) {
	e := newRotateEnv(t)
	file := filepath.Join(t.TempDir(), "kms-plugin-rotate.prom")
	run := func(pluginURL string, extra ...string) error {
		t.Helper()
		args := append([]string{"--local-keyset", e.keyset, "--plugin-endpoints", pluginURL, "--converge-wait", "10ms",
			"--poll-interval", "10ms", "--keep", "0", "--progress", "log", "--log-level", "error", "--min-age", "720h"}, extra...)
		var out, errOut bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return rotateMain(ctx, args, &out, &errOut, e.deps())
	}
	lines := func(step string, want ...string) string {
		t.Helper()
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		for _, w := range want {
			if !strings.Contains(string(data), "\n"+w+"\n") {
				t.Errorf("%s: the metrics file lacks %q:\n%s", step, w, data)
			}
		}
		return string(data)
	}

	// The plugin does not answer: preflight fails. The file says so, with
	// the state read back from the ConfigMap.
	gone := httptest.NewServer(nil)
	gone.Close()
	if err := run(gone.URL, "--metrics-textfile", file); err == nil || exitCode(err) != 1 {
		t.Fatalf("rotate with no plugin answering: %v; want a failure", err)
	}
	got := lines("failed run",
		`kms_plugin_rotation_run_outcome{outcome="failed"} 1`,
		`kms_plugin_rotation_run_outcome{outcome="completed"} 0`,
		`kms_plugin_rotation_in_progress 1`,
		`kms_plugin_rotation_stage{stage="preflight",status="failed"} 1`,
		`kms_plugin_rotation_min_age_seconds 2.592e+06`)
	if strings.Contains(got, "kms_plugin_rotation_last_completed_timestamp_seconds") {
		t.Errorf("failed first run: a last completed time:\n%s", got)
	}

	// The next run resumes and completes it.
	if err := run(e.plugin.URL, "--metrics-textfile", file); err != nil {
		t.Fatal(err)
	}
	got = lines("completed run",
		`kms_plugin_rotation_run_outcome{outcome="completed"} 1`,
		`kms_plugin_rotation_run_outcome{outcome="failed"} 0`,
		`kms_plugin_rotation_in_progress 0`,
		`kms_plugin_rotation_stage{stage="done",status="completed"} 1`)
	if !strings.Contains(got, "\nkms_plugin_rotation_last_completed_timestamp_seconds ") {
		t.Errorf("completed run: no last completed time:\n%s", got)
	}

	// Another run holds the Lease: exit 2, and the file still has the last
	// completed rotation.
	holder := "elsewhere/1/2"
	now := metav1.NewMicroTime(time.Now())
	secs := int32(60)
	if _, err := e.client.CoordinationV1().Leases("kube-system").Update(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "kms-plugin-rotation", Namespace: "kube-system"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
	}, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := run(e.plugin.URL, "--metrics-textfile", file); exitCode(err) != 2 {
		t.Fatalf("rotate with the Lease held: %v; want exit code 2", err)
	}
	got = lines("lease held", `kms_plugin_rotation_run_outcome{outcome="lease_held"} 1`, `kms_plugin_rotation_in_progress 0`)
	if !strings.Contains(got, "\nkms_plugin_rotation_last_completed_timestamp_seconds ") {
		t.Errorf("lease held: the last completed time is gone:\n%s", got)
	}

	// A run that fails before it reaches the cluster (no keyset) still
	// says it failed; it knows no state.
	var out, errOut bytes.Buffer
	err := rotateMain(context.Background(), []string{"--local-keyset", filepath.Join(t.TempDir(), "none.json"),
		"--plugin-endpoints", e.plugin.URL, "--metrics-textfile", file}, &out, &errOut, e.deps())
	if err == nil {
		t.Fatal("rotate without a keyset succeeded")
	}
	got = lines("failed before the cluster", `kms_plugin_rotation_run_outcome{outcome="failed"} 1`, `kms_plugin_rotation_min_age_seconds 0`)
	if strings.Contains(got, "kms_plugin_rotation_in_progress") {
		t.Errorf("failed before the cluster: state metrics without a state:\n%s", got)
	}

	// A file that cannot be written fails a run that otherwise succeeded:
	// the alerts would go on reading an old outcome.
	if err := e.client.CoordinationV1().Leases("kube-system").Delete(context.Background(), "kms-plugin-rotation", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "missing", "x.prom")
	err = run(e.plugin.URL, "--metrics-textfile", bad)
	if err == nil || !strings.Contains(err.Error(), "--metrics-textfile") || !strings.Contains(err.Error(), bad) {
		t.Fatalf("rotate with an unwritable metrics file: %v; want an error naming the flag and the path", err)
	}
}
