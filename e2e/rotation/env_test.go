package rotation

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// envConfig says what control plane a test runs on.
type envConfig struct {
	nodes     int
	azure     bool     // plugins on the Key Vault test server; else the local keyset
	resources []string // encrypted and rotated resources
	// pluginPoll is the plugins' --provider-poll-interval; zero means 1s.
	pluginPoll time.Duration
	// adminTLS: the plugins' admin ports serve HTTPS and admit only a
	// client certificate or token (cluster.HAConfig.AdminTLS).
	adminTLS bool
	// keysetCopies: with the local keyset, every node starts with a copy
	// of one keyset file (cluster.HAConfig.LocalKeyset), as a multi-node
	// control plane with the local provider must.
	keysetCopies bool
}

// env is one control plane under test and what the checks know about it.
type env struct {
	h     *cluster.HA
	vault *cluster.Vault // nil with the local keyset
	dir   string
	// providerArgs and providerEnv select the plugins' key store for
	// rotate (Azure); empty for the local keyset (the test names the file).
	providerArgs, providerEnv []string
	rotateLog                 string

	mu         sync.Mutex
	namespaces []string
	want       map[objKey]string // the "value" every test object holds
}

// objKey names one namespaced object.
type objKey struct{ resource, namespace, name string }

func (k objKey) String() string { return k.resource + "/" + k.namespace + "/" + k.name }

// startEnv starts a control plane for t and stops it (and removes its
// directory, unless t failed) when t ends.
func startEnv(t *testing.T, cfg envConfig) *env {
	t.Helper()
	ctx := context.Background()
	dir := cluster.TempDir(t, "kmsr-")
	var err error
	e := &env{dir: dir, want: map[objKey]string{}, rotateLog: filepath.Join(dir, "rotate.log")}
	start := time.Now()
	hc := cluster.HAConfig{
		PluginBinary: bins.plugin, KubeAPIServerBinary: bins.apiserver, EtcdBinary: bins.etcd,
		Dir: dir, Nodes: cfg.nodes, Resources: cfg.resources, PluginPollInterval: cfg.pluginPoll,
		AdminTLS: cfg.adminTLS,
	}
	if cfg.azure {
		if e.vault, err = cluster.StartVault(ctx, dir, "etcd-kek"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := e.vault.Stop(); err != nil {
				t.Errorf("stop kvtestd: %v", err)
			}
		})
		e.providerArgs, e.providerEnv = e.vault.ProviderArgs(), e.vault.Env()
		hc.PluginArgs, hc.PluginEnv = e.providerArgs, e.providerEnv
	}
	if cfg.keysetCopies {
		// A keyset as a local plugin creates it on its first start.
		src := filepath.Join(dir, "keyset-src")
		if err := os.Mkdir(src, 0o700); err != nil {
			t.Fatal(err)
		}
		p, err := cluster.StartPlugin(ctx, cluster.PluginConfig{Binary: bins.plugin, Dir: src})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		hc.LocalKeyset = p.Keyset
	}
	if e.h, err = cluster.StartHA(ctx, hc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.h.Close(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s", e.h.LogTails(40))
			if e.vault != nil {
				t.Logf("----- kvtestd -----\n%s", e.vault.Process().LogTail(20))
			}
			if data, err := os.ReadFile(e.rotateLog); err == nil {
				t.Logf("----- rotate and verify runs (%s), last 80 lines -----\n%s", e.rotateLog, tail(string(data), 80))
			}
		}
	})
	t.Logf("%d-node control plane (%s) ready in %v", len(e.h.Nodes), map[bool]string{true: "Azure Key Vault test server", false: "local keyset"}[cfg.azure], time.Since(start).Round(time.Millisecond))
	return e
}

// populate creates, per namespace, nSecrets Secrets and nConfigMaps
// ConfigMaps with random values, spread over the nodes' apiservers.
func (e *env) populate(t *testing.T, namespaces []string, nSecrets, nConfigMaps int) {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	for _, ns := range namespaces {
		if _, err := e.h.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var keys []objKey
	for _, ns := range namespaces {
		for i := range nSecrets {
			keys = append(keys, objKey{"secrets", ns, fmt.Sprintf("secret-%05d", i)})
		}
		for i := range nConfigMaps {
			keys = append(keys, objKey{"configmaps", ns, fmt.Sprintf("config-%05d", i)})
		}
	}
	values := make([]string, len(keys))
	err := cluster.Parallel(len(keys), 16, func(i int) error {
		k, v := keys[i], "v0-"+cluster.RandomHex(12)
		client := e.h.Nodes[i%len(e.h.Nodes)].Client
		meta := metav1.ObjectMeta{Name: k.name, Namespace: k.namespace}
		var err error
		if k.resource == "secrets" {
			_, err = client.CoreV1().Secrets(k.namespace).Create(ctx, &corev1.Secret{ObjectMeta: meta, Data: map[string][]byte{"value": []byte(v)}}, metav1.CreateOptions{})
		} else {
			_, err = client.CoreV1().ConfigMaps(k.namespace).Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"value": v}}, metav1.CreateOptions{})
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", k, err)
		}
		values[i] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.namespaces = append(e.namespaces, namespaces...)
	for i, k := range keys {
		e.want[k] = values[i]
	}
	e.mu.Unlock()
	t.Logf("created %d Secrets and %d ConfigMaps in %d namespaces in %v", nSecrets*len(namespaces), nConfigMaps*len(namespaces), len(namespaces), time.Since(start).Round(time.Millisecond))
}

// snapshot returns a copy of the expected values.
func (e *env) snapshot() (map[objKey]string, []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	want := make(map[objKey]string, len(e.want))
	for k, v := range e.want {
		want[k] = v
	}
	return want, slices.Clone(e.namespaces)
}

// setWant records new expected values.
func (e *env) setWant(values map[objKey]string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for k, v := range values {
		e.want[k] = v
	}
}

// checkAPI lists every test namespace's Secrets and ConfigMaps through
// client (paged) and compares each object's value with what was written.
func (e *env) checkAPI(ctx context.Context, client kubernetes.Interface) error {
	want, namespaces := e.snapshot()
	got := make(map[objKey]string, len(want))
	for _, ns := range namespaces {
		cont := ""
		for {
			list, err := client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{Limit: 500, Continue: cont})
			if err != nil {
				return fmt.Errorf("list secrets in %s: %w", ns, err)
			}
			for _, s := range list.Items {
				got[objKey{"secrets", ns, s.Name}] = string(s.Data["value"])
			}
			if cont = list.Continue; cont == "" {
				break
			}
		}
		for {
			list, err := client.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{Limit: 500, Continue: cont})
			if err != nil {
				return fmt.Errorf("list configmaps in %s: %w", ns, err)
			}
			for _, c := range list.Items {
				got[objKey{"configmaps", ns, c.Name}] = c.Data["value"]
			}
			if cont = list.Continue; cont == "" {
				break
			}
		}
	}
	var bad []string
	for k, v := range want {
		g, ok := got[k]
		switch {
		case !ok:
			bad = append(bad, k.String()+": missing")
		case g != v:
			bad = append(bad, fmt.Sprintf("%s: value %q, want %q", k, g, v))
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("%d of %d objects wrong through the API, first: %s", len(bad), len(want), strings.Join(bad[:min(len(bad), 5)], "; "))
	}
	return nil
}

// checkAPIEverywhere runs checkAPI through every node's apiserver.
func (e *env) checkAPIEverywhere(t *testing.T) {
	t.Helper()
	for _, n := range e.h.Nodes {
		if err := e.checkAPI(context.Background(), n.Client); err != nil {
			t.Fatalf("through %s's kube-apiserver: %v", n.Name, err)
		}
	}
}

// checkStored scans every stored object of the encrypted resources in etcd
// (not only the test's): each must be a KMS v2 EncryptedObject of the
// provider under one of the allowed key_ids, and no test object's value
// may appear in clear. It returns the number of objects per key_id.
func (e *env) checkStored(t *testing.T, allowed ...string) map[string]int {
	t.Helper()
	ctx := context.Background()
	want, _ := e.snapshot()
	byKey := map[string]int{}
	var bad []string
	for _, r := range e.h.Resources {
		objs, err := cluster.ScanStored(ctx, e.h.EtcdClient, r, e.h.ProviderName)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			switch {
			case !o.Encrypted:
				bad = append(bad, fmt.Sprintf("%s: %v", o.Key, o.Err))
			case !slices.Contains(allowed, o.KeyID):
				bad = append(bad, fmt.Sprintf("%s: key_id %q, want one of %q", o.Key, o.KeyID, allowed))
			default:
				byKey[o.KeyID]++
			}
			if v, ok := want[objKey{o.Resource, o.Namespace, o.Name}]; ok && bytes.Contains(o.Raw, []byte(v)) {
				bad = append(bad, o.Key+": value stored in clear")
			}
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%d stored objects are wrong in etcd, first: %s", len(bad), strings.Join(bad[:min(len(bad), 5)], "; "))
	}
	return byKey
}

// keyID returns the key_id every plugin reports, failing t unless they
// agree and are ready.
func (e *env) keyID(t *testing.T) cluster.PluginStatus {
	t.Helper()
	var first cluster.PluginStatus
	for i, n := range e.h.Nodes {
		st, err := n.Plugin.Status(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		if !st.Ready || st.KeyID == "" {
			t.Fatalf("%s: plugin status %+v, want ready with a key_id", n.Name, st)
		}
		if i == 0 {
			first = st
		} else if st.KeyID != first.KeyID {
			t.Fatalf("%s reports key_id %q, %s %q; want the same", n.Name, st.KeyID, e.h.Nodes[0].Name, first.KeyID)
		}
	}
	return first
}

// rotate is a `kms-plugin rotate` run against the control plane with the
// harness's flags, the key store's flags and extra on top (later flags
// win). The test defaults: rotate on every run (--min-age 0s), converge
// within 4 minutes; everything else as rotate's own defaults.
func (e *env) rotate(extraEnv []string, extra ...string) cluster.Command {
	args := append(e.h.RotateArgs(), e.providerArgs...)
	args = append(args, "--min-age", "0s", "--converge-timeout", "4m")
	return cluster.Command{
		Binary:  bins.plugin,
		Args:    append(args, extra...),
		Env:     append(slices.Clone(e.providerEnv), extraEnv...),
		Timeout: 6 * time.Minute,
		LogPath: e.rotateLog,
	}
}

// bgRotate is a rotate process running in the background. The test's
// cleanup kills it if it is still running then.
type bgRotate struct {
	pid  int
	done chan struct{}
	res  cluster.CommandResult
	end  time.Time
}

// startRotate starts rotate (as rotate builds it) in the background.
func (e *env) startRotate(t *testing.T, extraEnv []string, extra ...string) *bgRotate {
	t.Helper()
	pid, wait, err := e.rotate(extraEnv, extra...).Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r := &bgRotate{pid: pid, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		res, err := wait()
		if err != nil {
			res.Stderr = append(res.Stderr, []byte("\n"+err.Error())...)
		}
		r.res, r.end = res, time.Now()
	}()
	t.Cleanup(func() {
		if !r.exited() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			<-r.done
		}
	})
	return r
}

// exited reports whether the process has ended.
func (r *bgRotate) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// wait waits at most timeout for the process to end and returns how it
// ended and when.
func (r *bgRotate) wait(t *testing.T, timeout time.Duration) (cluster.CommandResult, time.Time) {
	t.Helper()
	select {
	case <-r.done:
		return r.res, r.end
	case <-time.After(timeout):
		t.Fatalf("rotate (pid %d) did not end within %v", r.pid, timeout)
		return cluster.CommandResult{}, time.Time{}
	}
}

// runRotate runs rotate and fails t unless it exits with want.
func (e *env) runRotate(t *testing.T, want int, extraEnv []string, extra ...string) cluster.CommandResult {
	t.Helper()
	res, err := e.rotate(extraEnv, extra...).Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != want {
		t.Fatalf("rotate %s: want exit %d, got %s", strings.Join(extra, " "), want, res)
	}
	return res
}

// verify runs `kms-plugin verify -o json --expect-key-id keyID` (plus
// extra) and decodes its report; the exit status must be wantExit.
func (e *env) verify(t *testing.T, keyID string, wantExit int, extra ...string) cluster.VerifyReport {
	t.Helper()
	args := append(e.h.VerifyArgs(), extra...)
	if keyID != "" {
		args = append(args, "--expect-key-id", keyID)
	}
	res, err := cluster.Command{Binary: bins.plugin, Args: args, Timeout: 2 * time.Minute, LogPath: e.rotateLog}.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != wantExit {
		t.Fatalf("verify %s: want exit %d, got %s\nstdout: %s", strings.Join(extra, " "), wantExit, res, res.Stdout)
	}
	report, err := cluster.ParseVerifyReport(res.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	return report
}

// checkVerifyClean checks that report shows every object of every
// resource encrypted under keyID, with at least minTotal[resource] objects.
func (e *env) checkVerifyClean(t *testing.T, report cluster.VerifyReport, keyID string, minTotal map[string]int) {
	t.Helper()
	if report.Stale != 0 {
		t.Errorf("verify: stale = %d, want 0", report.Stale)
	}
	if report.ExpectedKeyID != keyID {
		t.Errorf("verify: expectedKeyID %q, want %q", report.ExpectedKeyID, keyID)
	}
	for _, r := range e.h.Resources {
		res, ok := report.Resource(r)
		if !ok {
			t.Errorf("verify: no counts for %s in %+v", r, report)
			continue
		}
		if res.Total < minTotal[r] {
			t.Errorf("verify: %s total %d, want at least %d", r, res.Total, minTotal[r])
		}
		if res.Unencrypted != 0 {
			t.Errorf("verify: %s unencrypted = %d, want 0", r, res.Unencrypted)
		}
		if len(res.ByKey) != 1 || res.ByKey[0].KeyID != keyID || res.ByKey[0].Count != res.Total || res.ByKey[0].Provider != e.h.ProviderName {
			t.Errorf("verify: %s by key %+v, want all %d under provider %s key_id %s", r, res.ByKey, res.Total, e.h.ProviderName, keyID)
		}
	}
}

// waitLeaseHeld waits until rotate's Lease has a holder, failing t if the
// run (exited) ends first.
func (e *env) waitLeaseHeld(t *testing.T, exited func() bool, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		lease, err := e.h.Client.CoordinationV1().Leases(cluster.RotationNamespace).Get(context.Background(), cluster.RotationName, metav1.GetOptions{})
		if err == nil && lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity != "" {
			return *lease.Spec.HolderIdentity
		}
		if exited() {
			t.Fatalf("rotate exited before its Lease %s/%s was seen held (last error: %v)", cluster.RotationNamespace, cluster.RotationName, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotate's Lease %s/%s not held after %v (last error: %v)", cluster.RotationNamespace, cluster.RotationName, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// state returns rotate's state (nil before the first run).
func (e *env) state(t *testing.T) *cluster.RotationState {
	t.Helper()
	data, err := e.h.RotationState(context.Background(), cluster.RotationNamespace, cluster.RotationName)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// writer updates Secrets unconditionally, one goroutine per disjoint share
// of them, through the nodes' apiservers in turn, and remembers the last
// value each update wrote successfully. stop lets the update in flight
// finish, so that what the writer remembers is what the apiserver stored.
type writer struct {
	stopping chan struct{}
	wg       sync.WaitGroup
	writes   atomic.Int64
	mu       sync.Mutex
	last     map[objKey]string
	errs     []error
}

func (e *env) startWriter(keys []objKey, goroutines int, pause time.Duration) *writer {
	w := &writer{stopping: make(chan struct{}), last: map[objKey]string{}}
	for g := range goroutines {
		w.wg.Go(func() {
			for i := g; ; i += goroutines {
				select {
				case <-w.stopping:
					return
				case <-time.After(pause):
				}
				k := keys[i%len(keys)]
				v := fmt.Sprintf("w%d-%s", i, cluster.RandomHex(6))
				client := e.h.Nodes[i%len(e.h.Nodes)].Client
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: k.name, Namespace: k.namespace}, Data: map[string][]byte{"value": []byte(v)}}
				_, err := client.CoreV1().Secrets(k.namespace).Update(ctx, s, metav1.UpdateOptions{})
				cancel()
				w.mu.Lock()
				if err == nil {
					w.writes.Add(1)
					w.last[k] = v
				} else {
					w.errs = append(w.errs, fmt.Errorf("update %s through %s: %w", k, e.h.Nodes[i%len(e.h.Nodes)].Name, err))
				}
				w.mu.Unlock()
			}
		})
	}
	return w
}

// stop stops the writer and returns the last value written per Secret and
// the errors seen.
func (w *writer) stop() (map[objKey]string, []error) {
	close(w.stopping)
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last, w.errs
}

// reader checks every test object through the apiservers in turn, in a
// loop, until stopped.
type reader struct {
	cancel context.CancelFunc
	done   chan struct{}
	passes atomic.Int64
	mu     sync.Mutex
	errs   []error
}

func (e *env) startReader() *reader {
	ctx, cancel := context.WithCancel(context.Background())
	r := &reader{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for i := 0; ctx.Err() == nil; i++ {
			n := e.h.Nodes[i%len(e.h.Nodes)]
			rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
			err := e.checkAPI(rctx, n.Client)
			rcancel()
			switch {
			case err == nil:
				r.passes.Add(1)
			case ctx.Err() != nil:
				return
			default:
				r.mu.Lock()
				r.errs = append(r.errs, fmt.Errorf("%s at %s: %w", n.Name, time.Now().Format("15:04:05.000"), err))
				r.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return r
}

func (r *reader) stop() (passes int64, errs []error) {
	r.cancel()
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.passes.Load(), r.errs
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
