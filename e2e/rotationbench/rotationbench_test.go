package rotationbench

import (
	"context"
	"testing"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestRotationBenchSmall runs the rotation benchmark at the CI size (1,000
// Secrets) and checks what must hold whatever the machine's speed: both
// paths rewrite every Secret and end with verify showing none stale or in
// clear, each under the key_id it moved to. It asserts no timing; the
// figures are logged.
func TestRotationBenchSmall(t *testing.T) {
	ctx := context.Background()
	plugin, cleanup, err := cluster.PluginBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	cfg := Config{PluginBinary: plugin, Secrets: 1000, Logf: t.Logf}
	if cfg.KubeAPIServerBinary, err = cluster.KubeAPIServerBinary(); err != nil {
		t.Fatal(err)
	}
	if cfg.EtcdBinary, err = cluster.EtcdBinary(); err != nil {
		t.Fatal(err)
	}
	if cfg.KubectlBinary, err = cluster.KubectlBinary(); err != nil {
		t.Fatal(err)
	}
	r, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}

	if len(r.Rotates) != 1 || len(r.Kubectls) != 1 {
		t.Fatalf("%d rotate and %d kubectl runs, want 1 each", len(r.Rotates), len(r.Kubectls))
	}
	rot, k := r.Rotates[0], r.Kubectls[0]
	// Both paths moved to a key_id of their own.
	if k.KeyID == r.OldKeyID || rot.KeyID == k.KeyID || rot.KeyID == "" {
		t.Errorf("key_ids: before %q, after kubectl %q, after rotate %q; want three different", r.OldKeyID, k.KeyID, rot.KeyID)
	}
	// The switch watcher saw the plugin move before kube-apiserver did.
	for _, sw := range []Switch{k.Switch, rot.Switch} {
		if sw.Plugin <= 0 || sw.APIServer < sw.Plugin {
			t.Errorf("switch %+v: want the plugin first, then kube-apiserver", sw)
		}
	}
	// kubectl replaced every Secret (the test's and the canary).
	if k.Replaced < cfg.Secrets {
		t.Errorf("kubectl replaced %d Secrets, want at least %d", k.Replaced, cfg.Secrets)
	}
	// rotate rewrote every Secret: all were under the kubectl path's key.
	if rot.Rewritten < int64(cfg.Secrets) {
		t.Errorf("rotate rewrote %d objects, want at least %d", rot.Rewritten, cfg.Secrets)
	}
	for _, x := range []struct {
		path   string
		keyID  string
		report cluster.VerifyReport
	}{{"kubectl", k.KeyID, k.Verify}, {"rotate", rot.KeyID, rot.Verify}} {
		secrets, ok := x.report.Resource("secrets")
		switch {
		case !ok:
			t.Errorf("%s path: verify reports no secrets: %+v", x.path, x.report)
		case x.report.Stale != 0 || secrets.Unencrypted != 0:
			t.Errorf("%s path: verify shows %d stale and %d unencrypted; want none", x.path, x.report.Stale, secrets.Unencrypted)
		case secrets.Total < cfg.Secrets:
			t.Errorf("%s path: verify counts %d Secrets, want at least %d", x.path, secrets.Total, cfg.Secrets)
		case len(secrets.ByKey) != 1 || secrets.ByKey[0].KeyID != x.keyID:
			t.Errorf("%s path: verify by key %+v, want all under %s", x.path, secrets.ByKey, x.keyID)
		}
	}
	for _, st := range []string{"preflight", "rotate", "converge", "reencrypt", "verify", "retire"} {
		if _, ok := rot.Stages[st]; !ok {
			t.Errorf("rotate's state has no %s stage: %v", st, rot.Stages)
		}
	}

	t.Logf("N=%d: kubectl pipe %v (%.0f obj/s; get %.0f MiB, replace %.0f MiB peak RSS; switch before it %+v); vault calls %v",
		cfg.Secrets, k.Pipe, k.Rate(), mib(k.Get.MaxRSS), mib(k.Replace.MaxRSS), k.Switch, k.Calls)
	t.Logf("N=%d: rotate total %v, re-encrypt %v (%.0f obj/s), %d rewritten, peak RSS %.0f MiB; stages %v; vault calls %v",
		cfg.Secrets, rot.Total, rot.Stages["reencrypt"], rot.ReencryptRate(), rot.Rewritten, mib(rot.Process.MaxRSS), rot.Stages, rot.Calls)
}
