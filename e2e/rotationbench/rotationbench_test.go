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

	if len(r.Rotates) != 1 {
		t.Fatalf("%d rotate runs, want 1", len(r.Rotates))
	}
	rot := r.Rotates[0]
	// Both paths moved to a key_id of their own.
	if r.KubectlID == r.OldKeyID || rot.KeyID == r.KubectlID || rot.KeyID == "" {
		t.Errorf("key_ids: before %q, after kubectl %q, after rotate %q; want three different", r.OldKeyID, r.KubectlID, rot.KeyID)
	}
	// kubectl replaced every Secret (the test's and the canary).
	if r.Kubectl.Replaced < cfg.Secrets {
		t.Errorf("kubectl replaced %d Secrets, want at least %d", r.Kubectl.Replaced, cfg.Secrets)
	}
	// rotate rewrote every Secret: all were under the kubectl path's key.
	if rot.Rewritten < int64(cfg.Secrets) {
		t.Errorf("rotate rewrote %d objects, want at least %d", rot.Rewritten, cfg.Secrets)
	}
	for _, x := range []struct {
		path   string
		keyID  string
		report cluster.VerifyReport
	}{{"kubectl", r.KubectlID, r.Kubectl.Verify}, {"rotate", rot.KeyID, rot.Verify}} {
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

	t.Logf("N=%d: kubectl pipe %v (%.0f obj/s; get %.0f MiB, replace %.0f MiB peak RSS; key switch before it %v); vault calls %v",
		cfg.Secrets, r.Kubectl.Pipe, r.KubectlRate(), mib(r.Kubectl.Get.MaxRSS), mib(r.Kubectl.Replace.MaxRSS), r.Kubectl.KeySwitch, r.Kubectl.Calls)
	t.Logf("N=%d: rotate total %v, re-encrypt %v (%.0f obj/s), %d rewritten, peak RSS %.0f MiB; stages %v; vault calls %v",
		cfg.Secrets, rot.Total, rot.Stages["reencrypt"], rot.ReencryptRate(), rot.Rewritten, mib(rot.Process.MaxRSS), rot.Stages, rot.Calls)
}
