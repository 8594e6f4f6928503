package rotation

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// aescbcValue and plainValue are values as kube-apiserver stores them
// with the aescbc provider (key name key1) and unencrypted.
func aescbcValue() []byte { return []byte("k8s:enc:aescbc:v1:key1:\x8b\x01ciphertext") }
func plainValue() []byte  { return []byte("k8s\x00\n\x0fv1\x12\x06Secret") }

// storeAll overwrites every object's etcd value (but the canary's) with
// value().
func (c *cluster) storeAll(value func() []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.objects {
		parts := strings.SplitN(k, "/", 3)
		c.etcd.put(etcdKey(parts[0], parts[1], parts[2]), value())
	}
}

// kinds counts the etcd values of the objects by kind (kms/v2 values as
// "kms/v2:KEYIDHASH").
func (c *cluster) kinds() map[string]int {
	c.etcd.mu.Lock()
	defer c.etcd.mu.Unlock()
	out := map[string]int{}
	for k, v := range c.etcd.kv {
		if strings.Contains(k, CanaryName) {
			continue
		}
		e, _ := etcdscan.Classify(v)
		name := string(e.Kind)
		if e.Kind == etcdscan.KindKMSv2 {
			name += ":" + envelope.KeyIDHash(e.KeyID)
		}
		out[name]++
	}
	return out
}

// reencryptConfig is the cluster's Runner configuration without a key
// store: a re-encryption needs none.
func (c *cluster) reencryptConfig() Config {
	cfg := c.config()
	cfg.Provider = nil
	return cfg
}

func reencrypter(t *testing.T, cfg Config, opts ReencryptOptions) *Reencrypter {
	t.Helper()
	re, err := NewReencrypter(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	return re
}

func runReencrypt(t *testing.T, re *Reencrypter) (*Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return re.Run(ctx)
}

// TestReencryptTargets re-encrypts clusters whose objects are stored one
// way toward another and checks etcd afterwards: every object as the
// target wants, each written exactly once, the keys untouched, the state
// recorded, the Lease free.
func TestReencryptTargets(t *testing.T) {
	for _, tt := range []struct {
		name   string
		stored func() []byte // how the objects are stored before
		first  func() []byte // what the apiserver writes; nil: kms v2
		opts   ReencryptOptions
		// want is the etcd kinds afterwards; "kms" stands for kms/v2
		// under the plugins' key_id.
		want string
	}{
		{name: "aescbc to kms", stored: aescbcValue, opts: ReencryptOptions{Target: TargetKMS}, want: "kms"},
		{name: "plaintext to kms, default target", stored: plainValue, want: "kms"},
		{name: "kms to aescbc (uninstall to aescbc)", first: aescbcValue, opts: ReencryptOptions{Target: TargetOffKMS}, want: string(etcdscan.KindAESCBC)},
		{name: "kms to identity (uninstall)", first: plainValue, opts: ReencryptOptions{Target: TargetOffKMS}, want: string(etcdscan.KindUnencrypted)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 23, configmaps: 9})
			if tt.stored != nil {
				c.storeAll(tt.stored)
			}
			c.first = tt.first
			// One object already as the target wants: skipped, not written.
			keyID := c.storeKeyID()
			if tt.first == nil {
				c.etcd.put(etcdKey("secrets", "ns0", "s000"), storedValue(testProviderName, keyID))
			} else {
				c.etcd.put(etcdKey("secrets", "ns0", "s000"), tt.first())
			}
			_, _, versionBefore := c.versions()
			res, err := runReencrypt(t, reencrypter(t, c.reencryptConfig(), tt.opts))
			if err != nil {
				t.Fatal(err)
			}
			want := tt.want
			if want == "kms" {
				want = "kms/v2:" + envelope.KeyIDHash(keyID)
			}
			if got := c.kinds(); len(got) != 1 || got[want] != 32 {
				t.Errorf("etcd holds %v; want all 32 objects as %s", got, want)
			}
			if n := c.writes.Load(); n != 31 {
				t.Errorf("%d objects written; want 31 (one was already as wanted)", n)
			}
			if res.Outcome != OutcomeCompleted || !strings.Contains(res.Message, "re-encryption completed") || !strings.Contains(res.Message, "verify: 32 objects, 0 stale") {
				t.Errorf("result %+v", res)
			}
			if _, _, v := c.versions(); v != versionBefore {
				t.Errorf("the key store's current version moved from %s to %s: re-encryption must not touch keys", versionBefore, v)
			}
			st := c.state()
			rec := st.Reencryption
			if rec == nil || rec.Status != StatusCompleted || rec.Stage != StageDone || rec.Rewritten() != 31 || rec.Runs != 1 {
				t.Fatalf("state.reencryption %+v", rec)
			}
			if st.Rotation != nil || st.LastVerify != nil {
				t.Errorf("a re-encryption wrote rotate's records: rotation %+v, lastVerify %+v", st.Rotation, st.LastVerify)
			}
			if v := st.LastReencryptVerify; v == nil || v.Stale != 0 || v.Total != 32 || v.Off != (tt.opts.Target == TargetOffKMS) {
				t.Errorf("state.lastReencryptVerify %+v", v)
			}
			if h := c.leaseHolder(); h != "" {
				t.Errorf("Lease still held by %q", h)
			}
		})
	}
}

// TestReencryptRefusals checks the runs that must change nothing: the
// Lease held by someone else (a rotation, another re-encryption), the
// plugins not ready or not on one key_id, bad options.
func TestReencryptRefusals(t *testing.T) {
	hold := func(c *cluster, holder string) {
		now, secs := metav1.NewMicroTime(time.Now()), int32(60)
		if _, err := c.client.CoordinationV1().Leases(DefaultNamespace).Create(context.Background(), &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: DefaultName, Namespace: DefaultNamespace},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
		}, metav1.CreateOptions{}); err != nil {
			c.t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		name  string
		setup func(c *cluster, cfg *Config, opts *ReencryptOptions)
		want  string // in the error
		check func(t *testing.T, err error)
	}{
		{
			name:  "Lease held by a rotation elsewhere",
			setup: func(c *cluster, cfg *Config, opts *ReencryptOptions) { hold(c, "cp-1/4026531836/77") },
			want:  "held by cp-1/4026531836/77",
			check: func(t *testing.T, err error) {
				if held := (*LeaseHeldError)(nil); !errors.As(err, &held) {
					t.Errorf("error %T, want *LeaseHeldError", err)
				}
			},
		},
		{
			name: "plugins on different key_ids",
			setup: func(c *cluster, cfg *Config, opts *ReencryptOptions) {
				c.addPlugin().pin(envelope.DeriveKeyID("local", "999"))
				cfg.PluginEndpoints = c.endpoints()
			},
			want: "the plugins are not on the same key_id, nothing was changed",
		},
		{
			name:  "a plugin not ready",
			setup: func(c *cluster, cfg *Config, opts *ReencryptOptions) { c.plugins[0].setReady(false) },
			want:  "not every plugin is ready, nothing was changed",
		},
		{
			name:  "no plugin to ask and no Node",
			setup: func(c *cluster, cfg *Config, opts *ReencryptOptions) { cfg.PluginEndpoints = nil },
			want:  "find the plugins",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 5, configmaps: 2})
			c.storeAll(aescbcValue)
			cfg, opts := c.reencryptConfig(), ReencryptOptions{}
			tt.setup(c, &cfg, &opts)
			before := c.kinds()
			_, err := runReencrypt(t, reencrypter(t, cfg, opts))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v; want one containing %q", err, tt.want)
			}
			if tt.check != nil {
				tt.check(t, err)
			}
			if n := c.writes.Load(); n != 0 {
				t.Errorf("%d objects written; want none", n)
			}
			if got := c.kinds(); !mapsEqual(got, before) {
				t.Errorf("etcd changed from %v to %v", before, got)
			}
			if st := c.state(); st.Reencryption != nil && st.Reencryption.Rewritten() != 0 {
				t.Errorf("state records rewrites: %+v", st.Reencryption)
			}
		})
	}

	c := newCluster(t, clusterOpts{})
	for _, tt := range []struct {
		opts ReencryptOptions
		want string
	}{
		{ReencryptOptions{Target: "sideways"}, `target "sideways"`},
		{ReencryptOptions{Target: TargetOffKMS, KeyID: "k"}, "a key_id applies to target kms only"},
	} {
		if _, err := NewReencrypter(c.reencryptConfig(), tt.opts); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("NewReencrypter(%+v) = %v; want an error containing %q", tt.opts, err, tt.want)
		}
	}
	cfg := c.reencryptConfig()
	cfg.Client = nil
	if _, err := NewReencrypter(cfg, ReencryptOptions{}); err == nil {
		t.Error("NewReencrypter without a client succeeded")
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestReencryptResume kills re-encryptions at chosen points (the test hook
// stops them as a crash would: state as last saved, Lease left held) and
// checks that the next run, from another process, resumes: the same
// re-encryption, each object written exactly once over both runs, and
// that a rotation cannot start meanwhile.
func TestReencryptResume(t *testing.T) {
	for _, tt := range []struct {
		name string
		cp   crashPoint
		// secondWrites is what the second run writes at most.
		secondWrites int64
	}{
		{name: "after 9 rewrites", cp: crashPoint{Stage: StageReencrypt, Objects: 9}, secondWrites: 31 - 9},
		{name: "after the reencrypt stage", cp: crashPoint{Stage: StageReencrypt}, secondWrites: 0},
		{name: "after verify", cp: crashPoint{Stage: StageVerify}, secondWrites: 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 20, configmaps: 11})
			c.storeAll(aescbcValue)
			crashed := 0
			cfg := c.reencryptConfig()
			cfg.Identity = "cp-0/1/100"
			cfg.Hooks = crashHooks(tt.cp, &crashed)
			if _, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{})); !errors.Is(err, ErrCrashed) || crashed != 1 {
				t.Fatalf("first run: %v (crashed %d times); want ErrCrashed once", err, crashed)
			}
			first := c.state().Reencryption
			if c.leaseHolder() != "cp-0/1/100" || first == nil {
				t.Fatalf("after the crash: Lease holder %q, state %+v", c.leaseHolder(), first)
			}
			written := c.writes.Load()

			// A rotation must not start while the dead run's Lease is fresh.
			rot := c.config()
			rot.Identity = "cp-0/1/101"
			if _, err := runOnce(t, c.runner(rot)); err == nil || !strings.Contains(err.Error(), "held by cp-0/1/100") {
				t.Fatalf("rotate during a crashed re-encryption: %v; want the Lease refused", err)
			}
			// Another process, which knows the holder is gone, resumes.
			cfg.Identity, cfg.Hooks = "cp-0/1/102", Hooks{}
			cfg.HolderGone = func(id string) bool { return id == "cp-0/1/100" }
			res, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{}))
			if err != nil {
				t.Fatal(err)
			}
			if got := c.kinds(); len(got) != 1 || got["kms/v2:"+envelope.KeyIDHash(c.storeKeyID())] != 31 {
				t.Errorf("etcd holds %v; want every object under the key", got)
			}
			if n := c.writes.Load(); n != 31 || n-written > tt.secondWrites {
				t.Errorf("%d objects written in all, %d by the second run; want 31, at most %d by the second", n, n-written, tt.secondWrites)
			}
			rec := c.state().Reencryption
			if rec.ID != first.ID || rec.Runs != 2 || rec.Status != StatusCompleted || rec.Holder != "cp-0/1/102" {
				t.Errorf("state.reencryption %+v; want %s resumed by the second run and completed", rec, first.ID)
			}
			if !strings.Contains(res.Message, "verify: 31 objects, 0 stale, 0 unencrypted") {
				t.Errorf("message %q", res.Message)
			}
		})
	}
}

// TestReencryptStartsOver checks that a re-encryption in progress toward
// another target, or after the plugins moved to another key_id, is not
// resumed but started over.
func TestReencryptStartsOver(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 10})
	c.storeAll(aescbcValue)
	crashed := 0
	cfg := c.reencryptConfig()
	cfg.Resources = []string{"secrets"}
	cfg.Hooks = crashHooks(crashPoint{Stage: StageReencrypt, Objects: 3}, &crashed)
	if _, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{})); !errors.Is(err, ErrCrashed) {
		t.Fatal(err)
	}
	first := c.state().Reencryption
	// The key moves on; the plugins follow the keyset.
	if _, err := c.provider.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	cfg.Hooks = Hooks{}
	res, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	rec := c.state().Reencryption
	if rec.ID == first.ID || rec.NewKeyID != c.storeKeyID() || rec.Runs != 1 {
		t.Errorf("state.reencryption %+v; want a new one toward the new key_id", rec)
	}
	if got := c.kinds(); got["kms/v2:"+envelope.KeyIDHash(c.storeKeyID())] != 10 || len(got) != 1 {
		t.Errorf("etcd holds %v; %s", got, res.Message)
	}
}

// TestReencryptVerifyFails runs while the apiserver still writes with
// the old first provider (its EncryptionConfiguration not reloaded): its
// no-op updates change nothing, so verify must fail, say why, and leave the
// next run to re-encrypt again, which, once fixed, completes the same
// re-encryption.
func TestReencryptVerifyFails(t *testing.T) {
	for _, tt := range []struct {
		name   string
		target ReencryptTarget
		stored func() []byte // before, and what the apiserver still writes
		want   []string
	}{
		{name: "kms while aescbc is still first", target: TargetKMS, stored: aescbcValue,
			want: []string{"re-encryption stopped at stage verify", "6 objects are not under kms provider kms-plugin", "is the kms provider first"}},
		{name: "off-kms while kms is still first", target: TargetOffKMS,
			want: []string{"re-encryption stopped at stage verify", "6 objects are still stored by kms provider kms-plugin", "kms-plugin uninstall on every control-plane node"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 6})
			if tt.stored != nil {
				c.storeAll(tt.stored)
				c.first = tt.stored
			}
			cfg := c.reencryptConfig()
			cfg.Resources = []string{"secrets"}
			opts := ReencryptOptions{Target: tt.target}
			_, err := runReencrypt(t, reencrypter(t, cfg, opts))
			var se *StageError
			if !errors.As(err, &se) || se.Stage != StageVerify || se.Resume != StageReencrypt || se.Op != "re-encryption" {
				t.Fatalf("error %v; want a re-encryption StageError at verify, resuming at reencrypt", err)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			rec := c.state().Reencryption
			if rec.Status != StatusFailed || rec.done(StageReencrypt) || rec.Progress[0].Done {
				t.Errorf("state.reencryption %+v; want failed, reencrypt pending again", rec)
			}
			if c.leaseHolder() != "" {
				t.Error("Lease still held after a failure")
			}
			// Fixed: the next run resumes the same re-encryption and completes.
			c.mu.Lock()
			c.first = nil
			if tt.target == TargetOffKMS {
				c.first = plainValue
			}
			c.mu.Unlock()
			if _, err := runReencrypt(t, reencrypter(t, cfg, opts)); err != nil {
				t.Fatal(err)
			}
			if rec2 := c.state().Reencryption; rec2.ID != rec.ID || rec2.Status != StatusCompleted || rec2.Runs != 2 {
				t.Errorf("state.reencryption %+v after the fix", rec2)
			}
		})
	}
}

// TestReencryptWithoutEtcdAndDryRun: without etcd every object is
// rewritten and nothing verified; a dry run writes nothing at all.
func TestReencryptWithoutEtcdAndDryRun(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 8, configmaps: 3})
	c.storeAll(aescbcValue)
	c.etcd.put(etcdKey("secrets", "ns0", "s000"), storedValue(testProviderName, c.storeKeyID()))

	cfg := c.reencryptConfig()
	cfg.DryRun = true
	res, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	plan := strings.Join(res.Plan, "\n")
	for _, want := range []string{"would start a re-encryption", "target: every object under kms provider kms-plugin", "secrets: 7 of 8 objects; configmaps: 3 of 3 objects"} {
		if !strings.Contains(plan, want) {
			t.Errorf("dry-run plan lacks %q:\n%s", want, plan)
		}
	}
	if c.writes.Load() != 0 || c.leaseHolder() != "" || c.state().Reencryption != nil {
		t.Fatal("the dry run changed something")
	}
	if _, err := c.client.CoordinationV1().Leases(DefaultNamespace).Get(context.Background(), DefaultName, metav1.GetOptions{}); err == nil {
		t.Error("the dry run created the Lease")
	}

	cfg = c.reencryptConfig()
	cfg.Etcd = nil
	res, err = runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Message, "not verified (no etcd configured)") || c.writes.Load() != 10 {
		t.Errorf("without etcd: %q, %d written; want 10 written (all but the one current: the apiserver skips it), not verified", res.Message, c.writes.Load())
	}
	if v := c.state().Reencryption.stage(StageVerify); v.Status != StatusSkipped {
		t.Errorf("verify %+v; want skipped", v)
	}
}

// TestReencryptThenRotate: a rotation after a re-encryption runs as ever
// and keeps the re-encryption's record.
func TestReencryptThenRotate(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 5})
	c.storeAll(aescbcValue)
	cfg := c.reencryptConfig()
	cfg.Resources = []string{"secrets"}
	if _, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{})); err != nil {
		t.Fatal(err)
	}
	_, _, old := c.versions()
	rot := c.config()
	rot.Resources = []string{"secrets"}
	if _, err := runOnce(t, c.runner(rot)); err != nil {
		t.Fatal(err)
	}
	checkRotated(t, c, old)
	if st := c.state(); st.Reencryption == nil || st.Reencryption.Status != StatusCompleted || st.LastCompleted == nil {
		t.Errorf("state after both: reencryption %+v, lastCompleted %+v", st.Reencryption, st.LastCompleted)
	}
}

// TestReencryptPermissionsAreWhatRunsUse checks ReencryptPermissions both
// ways against what re-encryptions make, as TestPermissionsAreWhatRunsUse
// does for rotations, and that it is fewer than a rotation's.
func TestReencryptPermissionsAreWhatRunsUse(t *testing.T) {
	for _, tt := range []struct {
		name  string
		opts  PermissionOptions
		nodes bool
		ro    ReencryptOptions
		setup func(t *testing.T, c *cluster, cfg *Config)
	}{
		{
			name: "kms, plugin endpoints",
			opts: PermissionOptions{Resources: []string{"secrets", "configmaps"}, Migration: MigrationUpdate},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				c.storeAll(aescbcValue)
				c.beforeUpdate = conflictOnce(c, "secrets/ns0/s000")
			},
		},
		{
			name: "kms, plugins from the Nodes", nodes: true,
			opts: PermissionOptions{Resources: []string{"secrets"}, Migration: MigrationUpdate},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				c.storeAll(aescbcValue)
				cfg.Resources = []string{"secrets"}
				u := strings.TrimPrefix(c.plugins[0].srv.URL, "http://")
				host, port, _ := strings.Cut(u, ":")
				cfg.PluginEndpoints, cfg.PluginPort = nil, atoi(t, port)
				node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp-0", Labels: map[string]string{ControlPlaneLabel: ""}},
					Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: host}}}}
				if _, err := c.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
				c.beforeUpdate = conflictOnce(c, "secrets/ns0/s003")
			},
		},
		{
			name: "off-kms, configmaps", ro: ReencryptOptions{Target: TargetOffKMS},
			opts: PermissionOptions{Resources: []string{"configmaps"}, Migration: MigrationUpdate},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				c.first = plainValue
				cfg.Resources = []string{"configmaps"}
				c.beforeUpdate = conflictOnce(c, "configmaps/ns0/c000")
			},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 4, configmaps: 2})
			cfg := c.reencryptConfig()
			tt.setup(t, c, &cfg)
			used := requestsOfRuns(t, c, cfg, func(cfg Config) (*Result, error) { return runReencrypt(t, reencrypter(t, cfg, tt.ro)) })
			allowed := grants(ReencryptPermissions(tt.opts, tt.nodes))
			for _, g := range used {
				if !allows(allowed, g) {
					t.Errorf("request %s is not granted by ReencryptPermissions(%+v, %v)", g, tt.opts, tt.nodes)
				}
			}
			for _, g := range allowed {
				if !slices.ContainsFunc(used, func(u grant) bool { return allows([]grant{g}, u) }) {
					t.Errorf("ReencryptPermissions grants %s, which no run used", g)
				}
			}
			rotation := tt.opts
			rotation.Etcd = true
			if len(allowed) >= len(grants(Permissions(rotation))) {
				t.Errorf("a re-encryption needs %d grants, a rotation %d: want fewer", len(allowed), len(grants(Permissions(rotation))))
			}
		})
	}
}

// TestReencryptPermissionsWithinRotations: whatever a re-encryption may
// ask is granted to a rotation with the same options, so rotate's CronJob
// service account can run reencrypt too.
func TestReencryptPermissionsWithinRotations(t *testing.T) {
	for _, m := range []Migration{MigrationUpdate, MigrationSVM, MigrationAuto} {
		for _, res := range [][]string{{"secrets"}, {"configmaps", "widgets.example.com"}} {
			for _, nodes := range []bool{false, true} {
				o := PermissionOptions{Resources: res, Migration: m, Etcd: true}
				rot := grants(Permissions(o))
				for _, g := range grants(ReencryptPermissions(o, nodes)) {
					if !allows(rot, g) {
						t.Errorf("%+v, nodes %v: a re-encryption may %s, a rotation may not", o, nodes, g)
					}
				}
			}
		}
	}
}

// TestReencryptStateThatLies: a state ConfigMap claiming the rewrite done
// (hand-edited, or restored from an old backup) while etcd says otherwise
// cannot make a re-encryption complete: verify catches it, and the next
// run rewrites.
func TestReencryptStateThatLies(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 7})
	c.storeAll(aescbcValue)
	cfg := c.reencryptConfig()
	cfg.Resources = []string{"secrets"}
	st := c.state()
	rec := (&Reencrypter{r: &Runner{cfg: Config{ProviderName: testProviderName, Now: time.Now}}, opts: ReencryptOptions{Target: TargetKMS}}).newRecord(c.storeKeyID())
	rec.stage(StageReencrypt).Status = StatusCompleted
	rec.Progress = []ResourceProgress{{Resource: "secrets", Listed: 7, Rewritten: 7, Done: true}}
	st.Reencryption = rec
	if err := (&stateStore{client: c.client, namespace: DefaultNamespace, name: DefaultName}).save(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if _, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{})); err == nil || !strings.Contains(err.Error(), "7 objects are not under kms provider") {
		t.Fatalf("error %v; want verify to catch the 7 aescbc objects", err)
	}
	if n := c.writes.Load(); n != 0 {
		t.Fatalf("the first run wrote %d objects; want none (the state says the rewrite is done: only verify runs)", n)
	}
	if _, err := runReencrypt(t, reencrypter(t, cfg, ReencryptOptions{})); err != nil {
		t.Fatal(err)
	}
	if got := c.kinds(); len(got) != 1 || got["kms/v2:"+envelope.KeyIDHash(c.storeKeyID())] != 7 || c.writes.Load() != 7 {
		t.Fatalf("etcd holds %v after %d writes", got, c.writes.Load())
	}
}
