package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

func runOnce(t *testing.T, r *Runner) (*Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return r.Run(ctx)
}

// checkRotated checks a completed rotation: one new version, every object
// under it, the old one retired (keep 0), the Lease free.
func checkRotated(t *testing.T, c *cluster, oldVersion string) {
	t.Helper()
	enabled, disabled, cur := c.versions()
	if cur == oldVersion {
		t.Fatalf("current version is still %s", oldVersion)
	}
	if !slices.Equal(enabled, []string{cur}) || !slices.Equal(disabled, []string{oldVersion}) {
		t.Errorf("versions: enabled %v, disabled %v; want only %s enabled and %s disabled", enabled, disabled, cur, oldVersion)
	}
	keyID := envelope.DeriveKeyID(local.Name, cur)
	if n := c.staleObjects(keyID); n != 0 {
		t.Errorf("%d objects in etcd are not under the new key_id", n)
	}
	st := c.state()
	if st.InProgress() || st.LastCompleted == nil {
		t.Fatalf("state: rotation %+v, last completed %+v; want a completed rotation", st.Rotation, st.LastCompleted)
	}
	if st.LastCompleted.NewKeyID != keyID || st.LastCompleted.OldVersion != oldVersion || !slices.Equal(st.LastCompleted.Retired, []string{oldVersion}) {
		t.Errorf("last completed = %+v", st.LastCompleted)
	}
	if st.LastVerify == nil || st.LastVerify.Stale != 0 || st.LastVerify.ExpectedKeyID != keyID {
		t.Errorf("last verify = %+v", st.LastVerify)
	}
	if h := c.leaseHolder(); h != "" {
		t.Errorf("Lease still held by %q after the run", h)
	}
}

func TestRotateEndToEnd(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 25, configmaps: 10, plugins: 1})
	_, _, old := c.versions()
	res, err := runOnce(t, c.runner(c.config()))
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeCompleted || !strings.Contains(res.Message, "rotation completed") {
		t.Fatalf("result = %+v", res)
	}
	checkRotated(t, c, old)
	st := c.state()
	for _, p := range st.Rotation.Progress {
		want := map[string]int64{"secrets": 25, "configmaps": 10}[p.Resource]
		if p.Listed != want || p.Rewritten != want || p.Failed != 0 || !p.Done {
			t.Errorf("progress %+v; want %d listed and rewritten", p, want)
		}
	}
	for _, s := range st.Rotation.Stages {
		if s.Status != StatusCompleted {
			t.Errorf("stage %s: %s", s.Stage, s.Status)
		}
	}
	// 25 secrets in pages of 7: 4 lists; 10 configmaps: 2 lists.
	if got := c.lists.Load(); got != 6 {
		t.Errorf("%d LIST calls; want 6 (pages of 7)", got)
	}
	if got := c.writes.Load(); got != 35 {
		t.Errorf("%d writes; want 35", got)
	}

	// A second run with min-age is not due.
	cfg := c.config()
	cfg.MinAge = 30 * 24 * time.Hour
	res, err = runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeNotDue || !strings.HasPrefix(res.Message, "not due: last rotation 0s ago, min-age 30d") {
		t.Fatalf("second run: %+v", res)
	}
}

func TestMinAge(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2})
	now := time.Date(2030, 1, 10, 0, 0, 0, 0, time.UTC)
	st := &State{SchemaVersion: SchemaVersion, LastCompleted: &Completed{FinishedAt: now.Add(-72 * time.Hour)}}
	store := &stateStore{client: c.client, namespace: DefaultNamespace, name: DefaultName}
	if err := store.save(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	cfg := c.config()
	cfg.MinAge = 720 * time.Hour
	cfg.Now = func() time.Time { return now }
	res, err := runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if want := "not due: last rotation 3d ago, min-age 30d"; res.Outcome != OutcomeNotDue || res.Message != want {
		t.Fatalf("result %q (%s); want %q", res.Message, res.Outcome, want)
	}
	if enabled, _, _ := c.versions(); len(enabled) != 1 {
		t.Fatalf("a not-due run changed the keyset: %v", enabled)
	}
	cfg.MinAge = 48 * time.Hour
	res, err = runOnce(t, c.runner(cfg))
	if err != nil || res.Outcome != OutcomeCompleted {
		t.Fatalf("due run: %+v, %v", res, err)
	}
}

func TestResumeAfterCrash(t *testing.T) {
	points := []crashPoint{
		{Stage: StagePreflight}, {Stage: StageRotate}, {Stage: StageConverge},
		{Stage: StageReencrypt, Objects: 5}, {Stage: StageReencrypt}, {Stage: StageVerify}, {Stage: StageRetire},
	}
	for _, cp := range points {
		name := string(cp.Stage)
		if cp.Objects > 0 {
			name += fmt.Sprintf(":%d", cp.Objects)
		}
		t.Run(name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 20, configmaps: 5})
			_, _, old := c.versions()
			cfg := c.config()
			crashed := 0
			cfg.Hooks = crashHooks(cp, &crashed)
			cfg.Identity = "host/ns/111"
			_, err := runOnce(t, c.runner(cfg))
			if !errors.Is(err, ErrCrashed) || crashed != 1 {
				t.Fatalf("first run: %v (crash hook called %d times); want a crash", err, crashed)
			}
			if h := c.leaseHolder(); h != "host/ns/111" {
				t.Fatalf("after the crash the Lease is held by %q; want the crashed run", h)
			}
			st := c.state()
			if !st.InProgress() {
				t.Fatalf("after the crash the state shows no rotation in progress: %+v", st.Rotation)
			}
			if cp.Objects == 0 && !st.Rotation.done(cp.Stage) {
				t.Fatalf("stage %s not recorded as completed before the crash", cp.Stage)
			}
			// Every stored object stays readable: only enabled versions are
			// in use.
			enabled, _, _ := c.versions()
			for _, kv := range c.etcd.kv {
				e, _ := classify(kv)
				if !slices.ContainsFunc(enabled, func(v string) bool { return envelope.DeriveKeyID(local.Name, v) == e }) {
					t.Fatalf("an object is under a key_id of no enabled version after the crash")
				}
			}

			// A second run by another process takes over and completes,
			// without a second rotation.
			cfg2 := c.config()
			cfg2.Identity = "host/ns/222"
			cfg2.HolderGone = func(id string) bool { return id == "host/ns/111" }
			res, err := runOnce(t, c.runner(cfg2))
			if err != nil {
				t.Fatalf("second run: %v", err)
			}
			if res.Outcome != OutcomeCompleted {
				t.Fatalf("second run: %+v", res)
			}
			checkRotated(t, c, old)
			if enabled, disabled, _ := c.versions(); len(enabled)+len(disabled) != 2 {
				t.Fatalf("keyset has %d versions; want 2 (one rotation)", len(enabled)+len(disabled))
			}
			if st := c.state(); st.Rotation.Runs != 2 {
				t.Errorf("rotation worked on by %d runs; want 2", st.Rotation.Runs)
			}
		})
	}
}

func classify(v []byte) (string, error) {
	e, err := etcdscan.Classify(v)
	return e.KeyID, err
}

// TestRotatedButNotRecorded: the key store rotated, then the run died
// before recording it: the next run adopts the version instead of rotating
// again.
func TestRotatedButNotRecorded(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3})
	_, _, old := c.versions()
	cfg := c.config()
	cfg.Provider = &failAfterRotate{Provider: c.provider}
	_, err := runOnce(t, c.runner(cfg))
	var se *StageError
	if !errors.As(err, &se) || se.Stage != StageRotate {
		t.Fatalf("first run: %v; want a failure at rotate", err)
	}
	res, err := runOnce(t, c.runner(c.config()))
	if err != nil {
		t.Fatal(err)
	}
	checkRotated(t, c, old)
	if enabled, disabled, _ := c.versions(); len(enabled)+len(disabled) != 2 {
		t.Fatalf("keyset has %d versions; want 2 (the rotation adopted)", len(enabled)+len(disabled))
	}
	if note := c.state().Rotation.stage(StageRotate).Note; !strings.Contains(note, "adopted") {
		t.Errorf("rotate note %q; want it to say the version was adopted (%s)", note, res.Message)
	}
}

type failAfterRotate struct{ *local.Provider }

func (f *failAfterRotate) Rotate(ctx context.Context) (string, error) {
	if _, err := f.Provider.Rotate(ctx); err != nil {
		return "", err
	}
	return "", errors.New("connection lost after the rotate call")
}

func TestLeaseHeld(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2})
	holder := "other-host/4026531836/42"
	now := metav1.NewMicroTime(time.Now())
	secs := int32(60)
	_, err := c.client.CoordinationV1().Leases(DefaultNamespace).Create(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: DefaultName, Namespace: DefaultNamespace},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, AcquireTime: &now, LeaseDurationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = runOnce(t, c.runner(c.config()))
	var held *LeaseHeldError
	if !errors.As(err, &held) || held.Holder != holder {
		t.Fatalf("run: %v; want a LeaseHeldError naming %s", err, holder)
	}
	if !strings.Contains(err.Error(), holder) || !strings.Contains(err.Error(), "--wait") {
		t.Errorf("message %q should name the holder and --wait", err)
	}
	if enabled, _, _ := c.versions(); len(enabled) != 1 {
		t.Fatalf("a run without the Lease changed the keyset")
	}
	if c.state().Rotation != nil {
		t.Fatalf("a run without the Lease wrote state")
	}

	// With --wait, the run proceeds once the holder lets go.
	cfg := c.config()
	cfg.Wait = true
	go func() {
		time.Sleep(100 * time.Millisecond)
		l, err := c.client.CoordinationV1().Leases(DefaultNamespace).Get(context.Background(), DefaultName, metav1.GetOptions{})
		if err != nil {
			t.Error(err)
			return
		}
		l.Spec.HolderIdentity = nil
		if _, err := c.client.CoordinationV1().Leases(DefaultNamespace).Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
			t.Error(err)
		}
	}()
	res, err := runOnce(t, c.runner(cfg))
	if err != nil || res.Outcome != OutcomeCompleted {
		t.Fatalf("run with --wait: %+v, %v", res, err)
	}
}

func TestExpiredLeaseTakenOver(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2})
	holder := "other-host/4026531836/42"
	past := metav1.NewMicroTime(time.Now().Add(-2 * time.Minute))
	secs := int32(60)
	_, err := c.client.CoordinationV1().Leases(DefaultNamespace).Create(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: DefaultName, Namespace: DefaultNamespace},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &past, LeaseDurationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := runOnce(t, c.runner(c.config())); err != nil || res.Outcome != OutcomeCompleted {
		t.Fatalf("run: %+v, %v", res, err)
	}
}

func TestPreflightFailures(t *testing.T) {
	for _, tt := range []struct {
		name  string
		setup func(c *cluster, cfg *Config)
		want  string
	}{
		{"plugin down", func(c *cluster, cfg *Config) { c.plugins[1].srv.Close() }, "is down"},
		{"plugin not ready", func(c *cluster, cfg *Config) { c.plugins[0].setReady(false) }, "is not ready"},
		{"key_id mismatch", func(c *cluster, cfg *Config) {
			c.plugins[1].pin(envelope.DeriveKeyID(local.Name, "12345"))
		}, "not on the same key_id"},
		{"other key store", func(c *cluster, cfg *Config) {
			for _, p := range c.plugins {
				p.pin(envelope.DeriveKeyID(local.Name, "12345"))
			}
		}, "but the key store configured here"},
		{"other provider", func(c *cluster, cfg *Config) { c.plugins[0].provName = "azurekeyvault" }, "uses provider azurekeyvault"},
		{"local on two nodes", func(c *cluster, cfg *Config) { cfg.LocalKeysetShared = false }, "refusing to rotate the local provider with 2 plugins"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 3, plugins: 2})
			cfg := c.config()
			cfg.LocalKeysetShared = true
			tt.setup(c, &cfg)
			_, err := runOnce(t, c.runner(cfg))
			var se *StageError
			if !errors.As(err, &se) || se.Stage != StagePreflight || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("run: %v; want a preflight failure mentioning %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), "all keys intact") {
				t.Errorf("message %q does not say the keys are intact", err)
			}
			if enabled, disabled, _ := c.versions(); len(enabled) != 1 || len(disabled) != 0 {
				t.Fatalf("preflight failure changed the keyset: %v %v", enabled, disabled)
			}
			if n := c.writes.Load(); n != 0 {
				t.Fatalf("%d objects rewritten after a preflight failure", n)
			}
			st := c.state()
			if st.Rotation == nil || st.Rotation.Status != StatusFailed || st.Rotation.Stage != StagePreflight || st.Rotation.LastError == "" {
				t.Fatalf("state after the failure: %+v", st.Rotation)
			}
			if h := c.leaseHolder(); h != "" {
				t.Errorf("Lease held by %q after a failed run", h)
			}
		})
	}
}

func TestLocalSharedKeysetTwoPlugins(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 5, plugins: 2})
	_, _, old := c.versions()
	cfg := c.config()
	cfg.LocalKeysetShared = true
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	checkRotated(t, c, old)
}

func TestConvergeTimeoutKeepsKeys(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3, plugins: 2})
	c.plugins[1].pin(c.storeKeyID()) // this plugin never sees the new version
	cfg := c.config()
	cfg.LocalKeysetShared = true
	cfg.ConvergeTimeout = 100 * time.Millisecond
	_, err := runOnce(t, c.runner(cfg))
	var se *StageError
	if !errors.As(err, &se) || se.Stage != StageConverge || !strings.Contains(err.Error(), c.plugins[1].srv.URL) {
		t.Fatalf("run: %v; want a converge failure naming the lagging plugin", err)
	}
	if enabled, _, _ := c.versions(); len(enabled) != 2 {
		t.Fatalf("enabled versions %v; want both old and new", enabled)
	}
	if n := c.writes.Load(); n != 0 {
		t.Fatalf("%d objects rewritten before converge", n)
	}
	// Once the plugin catches up, the next run resumes at converge.
	c.plugins[1].pin("")
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	if st := c.state(); st.LastCompleted == nil || st.Rotation.Runs != 2 {
		t.Fatalf("state: %+v", st.Rotation)
	}
}

func TestConvergeAsksPluginsToRefresh(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3, plugins: 2})
	for _, p := range c.plugins {
		p.mu.Lock()
		p.polling = true
		p.mu.Unlock()
	}
	cfg := c.config()
	cfg.LocalKeysetShared = true
	// Without POST /refresh these plugins never report the new version.
	cfg.ConvergeTimeout = 2 * time.Second
	_, _, old := c.versions()
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	checkRotated(t, c, old)
	for i, p := range c.plugins {
		p.mu.Lock()
		n := p.refreshes
		p.mu.Unlock()
		// One at the first /status, at least one on request.
		if n < 2 {
			t.Errorf("plugin %d refreshed %d times; want the first poll and at least one requested refresh", i, n)
		}
	}
}

func TestCanaryWaitsForEveryAPIServer(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3})
	old := c.storeKeyID()
	// A second apiserver that picks up the new key_id only after a few
	// canary writes.
	lagging := k8sfakeClient(c)
	writes := 0
	c.addCanaryReactor(lagging, func() string {
		writes++
		if writes < 4 {
			return old
		}
		return c.storeKeyID()
	})
	cfg := c.config()
	cfg.APIServers = []APIServer{{Name: "api-0", Client: c.client}, {Name: "api-1", Client: lagging}}
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	if writes < 4 {
		t.Fatalf("canary written %d times through the lagging apiserver; want at least 4", writes)
	}
	if note := c.state().Rotation.stage(StageConverge).Note; !strings.Contains(note, "2 apiservers") {
		t.Errorf("converge note %q", note)
	}

	// An apiserver that never converges stops the run at converge.
	c2 := newCluster(t, clusterOpts{secrets: 3})
	stuck := k8sfakeClient(c2)
	stuckKey := c2.storeKeyID()
	c2.addCanaryReactor(stuck, func() string { return stuckKey })
	cfg2 := c2.config()
	cfg2.ConvergeTimeout = 100 * time.Millisecond
	cfg2.APIServers = []APIServer{{Name: "https://api-stuck:6443", Client: stuck}}
	_, err := runOnce(t, c2.runner(cfg2))
	if err == nil || !strings.Contains(err.Error(), "apiserver https://api-stuck:6443 did not pick up the new key_id") {
		t.Fatalf("run: %v; want a converge failure naming the apiserver", err)
	}
	if n := c2.writes.Load(); n != 0 {
		t.Fatalf("%d objects rewritten before every apiserver converged", n)
	}
}

func TestConflictRetriedAndDeletedSkipped(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 12})
	c.beforeUpdate = func(key string, attempt int) error {
		switch {
		case key == "secrets/ns0/s003" && attempt == 1:
			c.touch(key) // another writer got there first
			return apierrors.NewConflict(schema.GroupResource{Resource: "secrets"}, "s003", errors.New("modified"))
		case key == "secrets/ns1/s004" && attempt <= 2:
			c.mu.Lock()
			c.objects[key].SetResourceVersion("999999")
			c.mu.Unlock()
			return apierrors.NewConflict(schema.GroupResource{Resource: "secrets"}, "s004", errors.New("modified"))
		case key == "secrets/ns2/s005":
			c.mu.Lock()
			c.deleteObject("secrets", "ns2", "s005")
			c.mu.Unlock()
			return apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, "s005")
		}
		return nil
	}
	cfg := c.config()
	cfg.Resources = []string{"secrets"}
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	p := c.state().Rotation.Progress[0]
	if p.ConflictsRetried != 3 || p.SkippedDeleted != 1 || p.Failed != 0 || p.Listed != 12 {
		t.Fatalf("progress %+v; want 3 conflicts retried, 1 deleted, none failed", p)
	}
	if n := c.staleObjects(c.storeKeyID()); n != 0 {
		t.Fatalf("%d stale objects", n)
	}
}

func TestSkipsObjectsAlreadyCurrent(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 10})
	// Half the objects are written under the new key before re-encryption
	// (the rotation crashed after rewriting them, say).
	cfg := c.config()
	cfg.Resources = []string{"secrets"}
	cfg.Hooks = crashHooks(crashPoint{Stage: StageConverge}, new(int))
	cfg.Identity = "a/b/1"
	if _, err := runOnce(t, c.runner(cfg)); !errors.Is(err, ErrCrashed) {
		t.Fatal(err)
	}
	for i := range 5 {
		c.touch(fmt.Sprintf("secrets/ns%d/s%03d", i%3, i))
	}
	cfg2 := c.config()
	cfg2.Resources = []string{"secrets"}
	cfg2.HolderGone = func(string) bool { return true }
	if _, err := runOnce(t, c.runner(cfg2)); err != nil {
		t.Fatal(err)
	}
	p := c.state().Rotation.Progress[0]
	if p.SkippedCurrent != 5 || p.Rewritten != 5 {
		t.Fatalf("progress %+v; want 5 skipped as current (read from etcd), 5 rewritten", p)
	}
}

func TestRetireOnlyAfterVerify(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 5})
	_, _, old := c.versions()
	// An object etcd holds under the old key that the API does not list.
	hidden := "/registry/secrets/zz/hidden"
	c.etcd.put(hidden, storedValue(testProviderName, c.storeKeyID()))
	_, err := runOnce(t, c.runner(c.config()))
	var se *StageError
	if !errors.As(err, &se) || se.Stage != StageVerify || se.Resume != StageReencrypt || !strings.Contains(err.Error(), hidden) {
		t.Fatalf("run: %v; want a verify failure naming %s, resuming at reencrypt", err, hidden)
	}
	enabled, disabled, _ := c.versions()
	if len(enabled) != 2 || len(disabled) != 0 {
		t.Fatalf("versions after a failed verify: enabled %v, disabled %v; want both enabled", enabled, disabled)
	}
	st := c.state()
	if st.LastVerify == nil || st.LastVerify.Stale != 1 || st.Rotation.done(StageReencrypt) {
		t.Fatalf("state after the failed verify: verify %+v, stages %+v", st.LastVerify, st.Rotation.Stages)
	}
	// Once it is gone, the next run re-encrypts (nothing left to rewrite),
	// verifies and retires.
	c.etcd.del(hidden)
	writes := c.writes.Load()
	if _, err := runOnce(t, c.runner(c.config())); err != nil {
		t.Fatal(err)
	}
	checkRotated(t, c, old)
	if c.writes.Load() != writes {
		t.Errorf("objects already under the new key were rewritten again")
	}
}

func TestKeepVersions(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2})
	cfg := c.config()
	cfg.Keep = 1
	var history []string
	_, _, v0 := c.versions()
	history = append(history, v0)
	for range 3 {
		if _, err := runOnce(t, c.runner(cfg)); err != nil {
			t.Fatal(err)
		}
		_, _, cur := c.versions()
		history = append(history, cur)
	}
	enabled, disabled, cur := c.versions()
	slices.Sort(enabled)
	want := []string{history[2], history[3]}
	slices.Sort(want)
	if cur != history[3] || !slices.Equal(enabled, want) || len(disabled) != 2 {
		t.Fatalf("after 3 rotations with keep 1: enabled %v, disabled %v; want %v enabled", enabled, disabled, want)
	}
}

func TestDryRunChangesNothing(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 4, configmaps: 2})
	cfg := c.config()
	cfg.DryRun = true
	res, err := runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeDryRun || len(res.Plan) < 5 {
		t.Fatalf("dry run: %+v", res)
	}
	plan := strings.Join(res.Plan, "\n")
	for _, want := range []string{"would create a new version", "secrets: 4 of 4 objects", "configmaps: 2 of 2", "would disable"} {
		if !strings.Contains(plan, want) {
			t.Errorf("plan does not say %q:\n%s", want, plan)
		}
	}
	if enabled, _, _ := c.versions(); len(enabled) != 1 {
		t.Fatal("dry run rotated")
	}
	if c.writes.Load() != 0 {
		t.Fatal("dry run rewrote objects")
	}
	if _, err := c.client.CoordinationV1().Leases(DefaultNamespace).Get(context.Background(), DefaultName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("dry run created the Lease: %v", err)
	}
	if _, err := c.client.CoreV1().ConfigMaps(DefaultNamespace).Get(context.Background(), StateConfigMapName(DefaultName), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("dry run wrote state: %v", err)
	}
}

func TestWithoutEtcd(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 4})
	cfg := c.config()
	cfg.Etcd = nil
	res, err := runOnce(t, c.runner(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Message, "not verified") {
		t.Errorf("message %q", res.Message)
	}
	st := c.state()
	for _, s := range []Stage{StageVerify, StageRetire} {
		if got := st.Rotation.stage(s).Status; got != StatusSkipped {
			t.Errorf("stage %s: %s; want skipped", s, got)
		}
	}
	if enabled, _, _ := c.versions(); len(enabled) != 2 {
		t.Fatalf("without verify, a version was retired: enabled %v", enabled)
	}
	if !strings.Contains(st.Rotation.stage(StageConverge).Note, "waited") {
		t.Errorf("converge note %q", st.Rotation.stage(StageConverge).Note)
	}
	if c.writes.Load() != 4 {
		t.Errorf("%d writes; want all 4 rewritten", c.writes.Load())
	}
}

func TestStorageVersionMigration(t *testing.T) {
	for _, tt := range []struct {
		name       string
		controller bool
		migration  Migration
		wantMethod string
		wantErr    string
		kcm        bool
	}{
		{"served and running", true, MigrationAuto, "storageversionmigration", "", true},
		{"served, controller silent: fall back", false, MigrationAuto, "update", "", true},
		{"served, no controller manager", true, MigrationAuto, "update", "", false},
		{"forced, no controller", false, MigrationSVM, "", "no controller picked up", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 6})
			serveSVM(c)
			if tt.kcm {
				holder := "kcm-0"
				now := metav1.NewMicroTime(time.Now())
				secs := int32(15)
				if _, err := c.client.CoordinationV1().Leases("kube-system").Create(context.Background(), &coordinationv1.Lease{
					ObjectMeta: metav1.ObjectMeta{Name: "kube-controller-manager", Namespace: "kube-system"},
					Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
				}, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			c.svm = tt.controller
			cfg := c.config()
			cfg.Resources = []string{"secrets"}
			cfg.Migration = tt.migration
			_, err := runOnce(t, c.runner(cfg))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("run: %v; want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			st := c.state()
			if st.Rotation.Migration != tt.wantMethod {
				t.Errorf("migration %q; want %q", st.Rotation.Migration, tt.wantMethod)
			}
			if n := c.staleObjects(c.storeKeyID()); n != 0 {
				t.Errorf("%d stale objects", n)
			}
		})
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	for _, tt := range []struct {
		name string
		mod  func(*Config)
	}{
		{"no client", func(cfg *Config) { cfg.Client = nil }},
		{"no provider", func(cfg *Config) { cfg.Provider = nil }},
		{"wildcard", func(cfg *Config) { cfg.Resources = []string{"*.*"} }},
		{"migration", func(cfg *Config) { cfg.Migration = "magic" }},
		{"keep", func(cfg *Config) { cfg.Keep = -1 }},
	} {
		cfg := c.config()
		tt.mod(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New succeeded", tt.name)
		}
	}
}

func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		30 * time.Second:    "30s",
		90 * time.Second:    "90s",
		5 * time.Minute:     "5m",
		3 * time.Hour:       "3h",
		72 * time.Hour:      "3d",
		720 * time.Hour:     "30d",
		60 * time.Hour:      "2.5d",
		-1 * time.Second:    "0s",
		47 * time.Hour:      "47h",
		119 * time.Minute:   "119m",
		2 * 24 * time.Hour:  "2d",
		36500 * time.Minute: "25.3d",
	} {
		if got := HumanDuration(d); got != want {
			t.Errorf("HumanDuration(%s) = %q; want %q", d, got, want)
		}
	}
}

func TestHolderGone(t *testing.T) {
	host, _ := os.Hostname()
	ns := pidNamespace()
	if ns == "unknown" {
		t.Skip("no /proc/self/ns/pid")
	}
	cmd := exec.Command("sleep", "0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	time.Sleep(50 * time.Millisecond) // exited, not yet reaped: a zombie
	if !holderGone(fmt.Sprintf("%s/%s/%d", host, ns, pid)) {
		t.Error("an exited, unreaped process is not seen as gone")
	}
	_ = cmd.Wait()
	if !holderGone(fmt.Sprintf("%s/%s/%d", host, ns, pid)) {
		t.Error("a reaped process is not seen as gone")
	}
	for _, alive := range []string{
		fmt.Sprintf("%s/%s/%d", host, ns, os.Getppid()),
		fmt.Sprintf("%s/%s/%d", "other-host", ns, pid),
		fmt.Sprintf("%s/%s/%d", host, "1", pid),
		"garbage",
	} {
		if holderGone(alive) {
			t.Errorf("holderGone(%q) = true", alive)
		}
	}
	if id := DefaultIdentity(); !strings.HasPrefix(id, host+"/"+ns+"/") {
		t.Errorf("DefaultIdentity() = %q", id)
	}
}

func TestMetrics(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 9})
	reg := prometheus.NewRegistry()
	cfg := c.config()
	cfg.Resources = []string{"secrets"}
	r := c.runner(cfg)
	if err := r.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	// Scrape while the rotation runs, for the race detector.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
				_, _ = reg.Gather()
			}
		}
	}()
	_, err := runOnce(t, r)
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	got := gatherGauges(t, reg)
	for key, want := range map[string]float64{
		"kms_plugin_rotation_stage,stage=done,status=completed":          1,
		"kms_plugin_rotation_objects,outcome=rewritten,resource=secrets": 9,
		"kms_plugin_rotation_objects,outcome=listed,resource=secrets":    9,
		"kms_plugin_rotation_objects,outcome=failed,resource=secrets":    0,
		"kms_plugin_rotation_objects_estimate,resource=secrets":          9,
	} {
		if got[key] != want {
			t.Errorf("%s = %v; want %v (all: %v)", key, got[key], want, got)
		}
	}
}

// TestConcurrentRuns: two runs at once; the Lease lets exactly one rotate.
func TestConcurrentRuns(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 30})
	// Optimistic concurrency on Leases, as kube-apiserver does it.
	c.client.PrependReactor("update", "leases", func(action k8stesting.Action) (bool, runtime.Object, error) {
		in := action.(k8stesting.UpdateAction).GetObject().(*coordinationv1.Lease)
		cur, err := c.client.Tracker().Get(action.GetResource(), in.Namespace, in.Name)
		if err != nil {
			return true, nil, err
		}
		if rv := cur.(*coordinationv1.Lease).ResourceVersion; in.ResourceVersion != rv {
			return true, nil, apierrors.NewConflict(action.GetResource().GroupResource(), in.Name, fmt.Errorf("resourceVersion %s, now %s", in.ResourceVersion, rv))
		}
		return false, nil, nil
	})
	errs := make(chan error, 2)
	for i := range 2 {
		cfg := c.config()
		cfg.Identity = fmt.Sprintf("host/ns/%d", i)
		r := c.runner(cfg)
		go func() {
			_, err := runOnce(t, r)
			errs <- err
		}()
	}
	var held, ok int
	for range 2 {
		err := <-errs
		var lh *LeaseHeldError
		switch {
		case err == nil:
			ok++
		case errors.As(err, &lh):
			held++
		default:
			t.Errorf("run: %v", err)
		}
	}
	if ok != 1 || held != 1 {
		t.Fatalf("%d runs completed, %d found the Lease held; want 1 and 1", ok, held)
	}
	if enabled, disabled, _ := c.versions(); len(enabled)+len(disabled) != 2 {
		t.Fatalf("%d key versions; want 2 (one rotation)", len(enabled)+len(disabled))
	}
}

func TestProgressBar(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 15})
	cfg := c.config()
	cfg.Resources = []string{"secrets"}
	var buf bytes.Buffer
	cfg.Progress = &buf // written by the reporter only, read after Run
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if !strings.Contains(out, "\rsecrets      [==============================] 15/15  rewritten 15") {
		t.Fatalf("progress bar output %q", out)
	}
}

// TestStageTimes: each stage records its own start and finish.
func TestStageTimes(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3})
	cfg := c.config()
	var mu sync.Mutex
	tick := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cfg.Now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		tick = tick.Add(time.Second)
		return tick
	}
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	for _, s := range c.state().Rotation.Stages {
		if s.StartedAt == nil || s.FinishedAt == nil || !s.FinishedAt.After(*s.StartedAt) {
			t.Errorf("stage %s: started %v, finished %v; want a start before the finish", s.Stage, s.StartedAt, s.FinishedAt)
		}
	}
}
