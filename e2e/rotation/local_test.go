package rotation

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestRotateLocalKeyset rotates a single node's local keyset twice: once
// with the keyset named by flags and the default --keep 1 (the previous
// version stays enabled), once through a plugin config file (then the
// oldest version is disabled). After each, verify shows every Secret under
// the new key_id and `kms-plugin keyset list` the expected states. The
// plugin polls its keyset only once an hour: rotate converges because it
// asks the plugin to refresh (POST /refresh), within --converge-timeout.
func TestRotateLocalKeyset(t *testing.T) {
	e := startEnv(t, envConfig{nodes: 1, resources: []string{"secrets"}, pluginPoll: time.Hour})
	t.Cleanup(e.h.ProbeReadyz(3 * time.Second))
	e.populate(t, []string{"local-0", "local-1"}, 150, 0)
	minTotal := map[string]int{"secrets": 300}
	plugin := e.h.Nodes[0].Plugin
	v1 := e.keyID(t)
	e.checkStored(t, v1.KeyID)

	// --migration auto: the cluster serves storagemigration.k8s.io but
	// runs no controller for it (no kube-controller-manager Lease), so
	// rotate rewrites with updates at once.
	res := e.runRotate(t, 0, nil, "--provider", "local", "--local-keyset", plugin.Keyset, "--migration", "auto", "--svm-start-timeout", "10s", "--converge-timeout", "90s")
	t.Logf("first rotate: exit 0 in %v: %s", res.Duration.Round(time.Millisecond), lastLine(string(res.Stderr)))
	st := e.state(t)
	if st == nil || st.Doc.Rotation == nil || st.Doc.Rotation.Migration != "update" {
		t.Fatalf("after --migration auto without a migration controller: state %+v, want migration update", st)
	}
	// The state records when each stage started and finished: converge
	// waited for the apiserver (seconds), so its start precedes its finish.
	for _, s := range st.Doc.Rotation.Stages {
		if s.Stage == "converge" && (s.StartedAt == nil || s.FinishedAt == nil || !s.StartedAt.Before(*s.FinishedAt)) {
			t.Errorf("state: converge started at %v and finished at %v; want a start before the finish (took %v by the stage boundaries)", s.StartedAt, s.FinishedAt, st.StageDurations()["converge"])
		}
	}
	v2 := e.keyID(t)
	if v2.KeyID == v1.KeyID {
		t.Fatalf("key_id %s unchanged by rotate", v1.KeyID)
	}
	e.checkVerifyClean(t, e.verify(t, v2.KeyID, 0, "--fail-on-stale"), v2.KeyID, minTotal)
	e.checkStored(t, v2.KeyID)
	e.checkAPIEverywhere(t)
	checkKeyset(t, plugin.Keyset, map[string]string{v1.RemoteVersion: "enabled", v2.RemoteVersion: "enabled *"})

	config := filepath.Join(e.dir, "plugin-config.yaml")
	if err := os.WriteFile(config, fmt.Appendf(nil, "provider: local\nlocal:\n  keysetPath: %s\n", plugin.Keyset), 0o600); err != nil {
		t.Fatal(err)
	}
	res = e.runRotate(t, 0, nil, "--config", config, "--converge-timeout", "90s")
	t.Logf("second rotate: exit 0 in %v: %s", res.Duration.Round(time.Millisecond), lastLine(string(res.Stderr)))
	v3 := e.keyID(t)
	if v3.KeyID == v2.KeyID || v3.KeyID == v1.KeyID {
		t.Fatalf("key_id %s after the second rotate, want a new one", v3.KeyID)
	}
	e.checkVerifyClean(t, e.verify(t, v3.KeyID, 0, "--fail-on-stale"), v3.KeyID, minTotal)
	e.checkStored(t, v3.KeyID)
	checkKeyset(t, plugin.Keyset, map[string]string{v1.RemoteVersion: "disabled", v2.RemoteVersion: "enabled", v3.RemoteVersion: "enabled *"})

	// A restarted plugin and apiserver read everything without the
	// disabled version.
	n := e.h.Nodes[0]
	ctx := context.Background()
	if err := n.APIServer.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := n.Plugin.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.APIServer.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e.checkAPIEverywhere(t)
}

// checkKeyset runs `kms-plugin keyset list` and compares each version's
// "STATE[ *]" (the star marks the current one) with want.
func checkKeyset(t *testing.T, keyset string, want map[string]string) {
	t.Helper()
	out, err := cluster.RunPlugin(context.Background(), bins.plugin, "keyset", "list", "--local-keyset", keyset)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 2 {
			t.Fatalf("keyset list: line %q", line)
		}
		got[f[0]] = strings.Join(f[1:], " ")
	}
	if len(got) != len(want) {
		t.Errorf("keyset list shows %d versions, want %d:\n%s", len(got), len(want), out)
	}
	for v, state := range want {
		if got[v] != state {
			t.Errorf("keyset list: version %s is %q, want %q:\n%s", v, got[v], state, out)
		}
	}
}
