package rotation

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// TestKeyStoreRotatedByItself: after a completed rotation, the key store
// makes a new version current on its own (Vault's auto_rotate_period). The
// next run, though min-age says no rotation is due, adopts that version:
// it creates none, re-encrypts the objects still under the old key_id,
// verifies and retires. A run after that is not due again.
func TestKeyStoreRotatedByItself(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 5, configmaps: 2})
	cfg := c.config()
	cfg.MinAge = 30 * 24 * time.Hour
	cfg.Keep = 1
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatalf("first run: %v", err)
	}
	first := c.state().LastCompleted
	if first == nil {
		t.Fatal("first run completed no rotation")
	}
	// Objects the apiserver wrote under the first rotation's key_id, then
	// the store's own rotation.
	c.addObject("secrets", "ns0", "written-before", first.NewKeyID)
	auto, err := c.provider.Rotate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	enabledBefore, disabledBefore, _ := c.versions()

	res, err := runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatalf("run after the store's rotation: %v", err)
	}
	if res.Outcome == OutcomeNotDue {
		t.Fatalf("outcome %v (%s); want the store's own rotation adopted", res.Outcome, res.Message)
	}
	enabled, disabled, cur := c.versions()
	if cur != auto {
		t.Fatalf("current version %s; want %s, the store's own (no version created by rotate)", cur, auto)
	}
	if n, want := len(enabled)+len(disabled), len(enabledBefore)+len(disabledBefore); n != want {
		t.Errorf("keyset has %d versions after the run, %d before; want no new version", n, want)
	}
	keyID := envelope.DeriveKeyID(local.Name, auto)
	if n := c.staleObjects(keyID); n != 0 {
		t.Errorf("%d objects in etcd are not under the store's new key_id", n)
	}
	st := c.state()
	if st.LastCompleted == nil || st.LastCompleted.OldVersion != first.NewVersion || st.LastCompleted.NewVersion != auto {
		t.Fatalf("last completed %+v; want %s -> %s", st.LastCompleted, first.NewVersion, auto)
	}
	if note := st.Rotation.stage(StageRotate).Note; !strings.Contains(note, "adopted") {
		t.Errorf("rotate note %q; want it to say the version was adopted", note)
	}

	res, err = runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeNotDue {
		t.Errorf("third run: outcome %v (%s); want not due", res.Outcome, res.Message)
	}
}

// TestKeyStoreRotatedByItselfDryRun: the dry run says it would adopt the
// store's own version, not that nothing is due.
func TestKeyStoreRotatedByItselfDryRun(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2})
	cfg := c.config()
	cfg.MinAge = 30 * 24 * time.Hour
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.provider.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	cfg.DryRun = true
	res, err := c.runner(cfg).Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	plan := strings.Join(res.Plan, "\n")
	if res.Outcome != OutcomeDryRun || !strings.Contains(plan, "moved from version") || !strings.Contains(plan, "rotate: would adopt") {
		t.Errorf("dry run: outcome %v, plan:\n%s\nwant it to adopt the store's version", res.Outcome, plan)
	}
}
