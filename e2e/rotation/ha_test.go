package rotation

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// Sizes of the 3-node test: 2,000 Secrets and 200 ConfigMaps, in 4
// namespaces.
const (
	haNamespaces       = 4
	haSecretsPerNS     = 500
	haConfigMapsPerNS  = 50
	haHotSecretsPerNS  = 25 // updated by the writer during the rotation
	haCrashReencryptAt = 700
)

// TestRotateHAAzure runs rotate on a 3-node control plane whose plugins
// share one key of the Key Vault test server, with Secrets and ConfigMaps
// encrypted. The plugins' admin ports serve HTTPS and admit only the
// admin client certificate or token: rotate presents the certificate,
// status and verify the token. The subtests share the control plane and
// run in order; each needs the previous one to have passed.
func TestRotateHAAzure(t *testing.T) {
	e := startEnv(t, envConfig{nodes: 3, azure: true, resources: []string{"secrets", "configmaps"}, adminTLS: true})
	t.Cleanup(e.h.ProbeReadyz(3 * time.Second))
	var namespaces []string
	for i := range haNamespaces {
		namespaces = append(namespaces, fmt.Sprintf("rot-%d", i))
	}
	e.populate(t, namespaces, haSecretsPerNS, haConfigMapsPerNS)
	minTotal := map[string]int{"secrets": haNamespaces * haSecretsPerNS, "configmaps": haNamespaces * haConfigMapsPerNS}
	k1 := e.keyID(t)
	if got := e.checkStored(t, k1.KeyID); got[k1.KeyID] < minTotal["secrets"]+minTotal["configmaps"] {
		t.Fatalf("stored under %s: %d objects, want at least %d", k1.KeyID, got[k1.KeyID], minTotal["secrets"]+minTotal["configmaps"])
	}

	steps := []struct {
		name string
		f    func(t *testing.T)
	}{
		{"AdminPortRefusesWithoutCredential", func(t *testing.T) { haAdminAuth(t, e, k1) }},
		{"PluginDownStopsBeforeReencrypt", func(t *testing.T) { haPluginDown(t, e, k1) }},
		{"LaggingPluginStopsBeforeReencrypt", func(t *testing.T) { haLaggingPlugin(t, e, k1) }},
		{"LocalProviderRefusedOnThreeNodes", func(t *testing.T) { haLocalRefused(t, e) }},
		{"EndToEndWithWriterAndSecondRuns", func(t *testing.T) { haEndToEnd(t, e, namespaces, minTotal) }},
		{"KilledAtEachStage", func(t *testing.T) { haKilledAtEachStage(t, e, minTotal) }},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.f) {
			return
		}
	}
}

// haAdminAuth attacks the plugins' admin port from the node itself: a
// POST /refresh or GET /status with no credential, a wrong token or a
// client certificate of another CA gets 401 (or a failed handshake) from
// every plugin, even on loopback, and a rotate without the credential stops
// in preflight naming the 401, with every key version as it was. The
// next subtests rotate with the client certificate, and read status with
// the token.
func haAdminAuth(t *testing.T, e *env, k1 cluster.PluginStatus) {
	ctx := context.Background()
	anon, err := e.h.AdminPKI.HTTPClient(false)
	if err != nil {
		t.Fatal(err)
	}
	plain := &http.Client{Timeout: 5 * time.Second}
	for _, n := range e.h.Nodes {
		url := n.Plugin.URL()
		for _, tt := range []struct {
			name, method, path, auth string
		}{
			{"no credential", http.MethodPost, "/refresh", ""},
			{"no credential", http.MethodGet, "/status", ""},
			{"wrong token", http.MethodPost, "/refresh", "Bearer not-the-token"},
			{"wrong token", http.MethodGet, "/status", "Bearer not-the-token"},
		} {
			req, err := http.NewRequestWithContext(ctx, tt.method, url+tt.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			resp, err := anon.Do(req)
			if err != nil {
				t.Fatalf("%s %s %s (%s): %v", n.Name, tt.method, tt.path, tt.name, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized || bytes.Contains(body, []byte(k1.KeyID)) {
				t.Errorf("%s: %s %s with %s: %d %q; want 401 and nothing about the key", n.Name, tt.method, tt.path, tt.name, resp.StatusCode, body)
			}
		}
		// Plain http to the TLS port: no answer with a status.
		if resp, err := plain.Get("http://" + n.Plugin.HTTPAddr + "/status"); err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || bytes.Contains(body, []byte(k1.KeyID)) {
				t.Errorf("%s: plain http GET /status: %d %q; want no status over plain http", n.Name, resp.StatusCode, body)
			}
		}
	}

	before := e.versions(t)
	cmd := e.rotate(nil, "--keep", "0")
	cmd.Args = withoutFlags(cmd.Args, "--plugin-cert-file", "--plugin-key-file")
	res, err := cmd.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stderr := string(res.Stderr)
	if res.ExitCode != 1 || !strings.Contains(stderr, "preflight") || !strings.Contains(stderr, "401 Unauthorized") {
		t.Errorf("rotate without the plugins' credential: exit %d; want 1 at preflight naming the 401:\n%s", res.ExitCode, tail(stderr, 20))
	}
	t.Logf("rotate without the plugins' credential: exit %d: %s", res.ExitCode, lastLine(stderr))
	if after := e.versions(t); !slices.Equal(after, before) {
		t.Errorf("key versions changed by a refused rotate:\nbefore %v\nafter  %v", before, after)
	}
	if st := e.status(t); !st.Agree || len(st.Plugins) != len(e.h.Nodes) {
		t.Errorf("status with the token: %+v; want every plugin ready and agreeing", st)
	}
	e.checkStored(t, k1.KeyID)
}

// withoutFlags drops each "--NAME VALUE" pair of names from args.
func withoutFlags(args []string, names ...string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if slices.Contains(names, args[i]) && i+1 < len(args) {
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}

// haPluginDown stops node 2's plugin: rotate must fail before it changes
// anything, naming the plugin it cannot reach, with every key version as
// it was and every object readable.
func haPluginDown(t *testing.T, e *env, k1 cluster.PluginStatus) {
	ctx := context.Background()
	before := e.versions(t)
	down := e.h.Nodes[2]
	if err := down.Plugin.Stop(); err != nil {
		t.Fatalf("stop %s's plugin: %v", down.Name, err)
	}
	res := e.runRotate(t, 1, nil, "--keep", "0")
	stderr := string(res.Stderr)
	if !strings.Contains(stderr, down.Plugin.HTTPAddr) {
		t.Errorf("rotate's error does not name the plugin that is down (%s):\n%s", down.Plugin.HTTPAddr, tail(stderr, 20))
	}
	if !strings.Contains(stderr, "preflight") {
		t.Errorf("rotate's error does not say it stopped in preflight:\n%s", tail(stderr, 20))
	}
	t.Logf("rotate with %s's plugin down: exit %d after %v: %s", down.Name, res.ExitCode, res.Duration.Round(time.Millisecond), lastLine(stderr))
	if st := e.state(t); st != nil && st.Stage != "preflight" {
		t.Errorf("state after the failed preflight: stage %q, want preflight; state %s", st.Stage, st.JSON)
	}
	if after := e.versions(t); !slices.Equal(after, before) {
		t.Errorf("key versions changed by a failed rotate:\nbefore %v\nafter  %v", before, after)
	}
	for _, n := range e.h.Nodes[:2] {
		st, err := n.Plugin.Status(ctx)
		if err != nil || st.KeyID != k1.KeyID {
			t.Errorf("%s: status %+v, %v; want key_id %s", n.Name, st, err, k1.KeyID)
		}
	}
	e.checkStored(t, k1.KeyID)
	if err := e.checkAPI(ctx, e.h.Nodes[0].Client); err != nil {
		t.Error(err)
	}
	st := e.status(t)
	if st.Agree || len(st.Plugins) != 3 || st.Plugins[2].Error == "" || st.Plugins[0].Status == nil || st.Plugins[0].Status.KeyIDHash != k1.KeyIDHash {
		t.Errorf("status with %s's plugin down: %+v; want agree=false, an error for the third plugin, the others on %s", down.Name, st, k1.KeyIDHash)
	}

	if err := down.Plugin.Start(ctx); err != nil {
		t.Fatalf("restart %s's plugin: %v", down.Name, err)
	}
	if err := down.APIServer.WaitReady(ctx, "/readyz", 2*time.Minute); err != nil {
		t.Fatalf("%s's kube-apiserver after its plugin came back: %v", down.Name, err)
	}
	if got := e.keyID(t); got.KeyID != k1.KeyID {
		t.Fatalf("after the restart the plugins report %s, want %s", got.KeyID, k1.KeyID)
	}
}

// haLaggingPlugin restarts node 2's plugin with a provider poll of 10
// minutes, then makes a new key version out of band (as an operator in the
// portal would): nodes 0 and 1 follow it, node 2 lags on the old key_id.
// rotate must refuse in preflight, naming the lagging plugin, and change
// nothing. Node 2's plugin then restarts with the normal poll and catches
// up; the data stays under the first key_id until the next rotation.
func haLaggingPlugin(t *testing.T, e *env, k1 cluster.PluginStatus) {
	ctx := context.Background()
	lag := e.h.Nodes[2]
	proc := lag.Plugin.Process()
	args := proc.Args
	if err := lag.Plugin.Stop(); err != nil {
		t.Fatal(err)
	}
	proc.Args = append(slices.Clone(args), "--provider-poll-interval", "10m")
	err := lag.Plugin.Start(ctx)
	proc.Args = args
	if err != nil {
		t.Fatal(err)
	}
	kid, err := e.vault.NewKeyVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := e.versions(t)
	for _, n := range e.h.Nodes[:2] {
		st, err := n.Plugin.WaitForKeyIDChange(ctx, k1.KeyID, 30*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		if st.RemoteVersion != kid {
			t.Fatalf("%s follows %s, want the new version %s", n.Name, st.RemoteVersion, kid)
		}
	}
	if st, err := lag.Plugin.Status(ctx); err != nil || st.KeyID != k1.KeyID {
		t.Fatalf("%s's plugin: %+v, %v; want it lagging on %s", lag.Name, st, err, k1.KeyID)
	}

	res := e.runRotate(t, 1, nil, "--keep", "0")
	stderr := string(res.Stderr)
	for _, want := range []string{"preflight", "not on the same key_id", lag.Plugin.HTTPAddr} {
		if !strings.Contains(stderr, want) {
			t.Errorf("rotate's error does not say %q:\n%s", want, tail(stderr, 20))
		}
	}
	t.Logf("rotate with %s's plugin lagging: exit %d: %s", lag.Name, res.ExitCode, lastLine(stderr))
	if after := e.versions(t); !slices.Equal(after, before) {
		t.Errorf("key versions changed by a refused rotate:\nbefore %v\nafter  %v", before, after)
	}
	e.checkStored(t, k1.KeyID)

	if err := lag.Plugin.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if st := e.keyID(t); st.RemoteVersion != kid {
		t.Fatalf("after the restart the plugins follow %s, want %s", st.RemoteVersion, kid)
	}
	e.checkAPIEverywhere(t)
}

// haLocalRefused runs rotate with the local provider against the three
// plugins: each node would keep its own keyset, so rotate must refuse
// before it touches anything.
func haLocalRefused(t *testing.T, e *env) {
	before := e.versions(t)
	// A keyset as a local plugin creates it on its first start.
	dir := filepath.Join(e.dir, "local")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p, err := cluster.StartPlugin(context.Background(), cluster.PluginConfig{Binary: bins.plugin, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	res := e.runRotate(t, 1, nil, "--provider", "local", "--local-keyset", p.Keyset)
	if stderr := string(res.Stderr); !strings.Contains(stderr, "refusing to rotate the local provider with 3 plugins") {
		t.Errorf("rotate --provider local on 3 nodes: want a refusal that names the 3 plugins:\n%s", tail(stderr, 20))
	}
	t.Logf("rotate --provider local on 3 nodes: exit %d: %s", res.ExitCode, lastLine(string(res.Stderr)))
	if after := e.versions(t); !slices.Equal(after, before) {
		t.Errorf("key versions changed by a refused rotate:\nbefore %v\nafter  %v", before, after)
	}
	if st := e.state(t); st != nil && st.Stage != "preflight" {
		t.Errorf("state after the refusal: stage %q, want preflight; state %s", st.Stage, st.JSON)
	}
}

// haEndToEnd rotates while a writer updates Secrets through every
// apiserver; while the run holds its Lease, a second run without --wait
// exits 2 and a third with --wait waits for it and then finds no rotation
// due. Afterwards every object is under the new key_id, in etcd (verify and
// the test's own scan) and through every apiserver, the old key version is
// disabled, and an apiserver and plugin restarted with empty caches read
// everything.
func haEndToEnd(t *testing.T, e *env, namespaces []string, minTotal map[string]int) {
	ctx := context.Background()
	k1 := e.keyID(t)
	before := e.versions(t)
	var hot []objKey
	for _, ns := range namespaces {
		for i := range haHotSecretsPerNS {
			hot = append(hot, objKey{"secrets", ns, fmt.Sprintf("secret-%05d", i*(haSecretsPerNS/haHotSecretsPerNS))})
		}
	}
	w := e.startWriter(hot, 2, 50*time.Millisecond)
	writerStopped := false
	defer func() {
		if !writerStopped {
			w.stop()
		}
	}()
	calls0, err := e.vault.Calls(ctx)
	if err != nil {
		t.Fatal(err)
	}

	first := e.startRotate(t, nil, "--keep", "0")
	holder := e.waitLeaseHeld(t, first.exited, time.Minute)
	t.Logf("first run holds the Lease as %s", holder)

	second := e.runRotate(t, 2, nil, "--keep", "0")
	if first.exited() {
		t.Fatalf("the first run ended before the second was refused; the Lease test proved nothing")
	}
	if !strings.Contains(string(second.Stderr), cluster.RotationName) {
		t.Errorf("second run's message does not name the Lease %s:\n%s", cluster.RotationName, tail(string(second.Stderr), 10))
	}
	t.Logf("second run without --wait: exit 2 after %v: %s", second.Duration.Round(time.Millisecond), lastLine(string(second.Stderr)))

	// A third run waits for the Lease; with --min-age 1h it then finds the
	// rotation the first run completed recent enough.
	third := e.startRotate(t, nil, "--keep", "0", "--wait", "--min-age", "1h")

	res, firstEnd := first.wait(t, 6*time.Minute)
	if res.ExitCode != 0 {
		t.Fatalf("first rotate: %s", res)
	}
	t.Logf("rotate: exit 0 in %v, peak RSS %.1f MiB", res.Duration.Round(time.Millisecond), float64(res.MaxRSS)/(1<<20))
	thirdRes, thirdEnd := third.wait(t, 2*time.Minute)
	if thirdRes.ExitCode != 0 {
		t.Errorf("third run (--wait --min-age 1h): %s", thirdRes)
	}
	if thirdEnd.Before(firstEnd) {
		t.Errorf("third run (--wait) ended %v before the first released the Lease", firstEnd.Sub(thirdEnd))
	}
	t.Logf("third run with --wait: exit %d, %v after the first ended: %s", thirdRes.ExitCode, thirdEnd.Sub(firstEnd).Round(time.Millisecond), lastLine(string(thirdRes.Stderr)))

	last, errs := w.stop()
	writerStopped = true
	if len(errs) > 0 {
		t.Errorf("%d of the writer's updates failed during the rotation, first: %v", len(errs), errs[:min(len(errs), 5)])
	}
	if w.writes.Load() == 0 {
		t.Fatal("the writer wrote nothing")
	}
	t.Logf("writer: %d updates of %d Secrets through 3 apiservers during the rotation", w.writes.Load(), len(hot))
	e.setWant(last)

	k2 := e.keyID(t)
	if k2.KeyID == k1.KeyID || k2.RemoteVersion == k1.RemoteVersion {
		t.Fatalf("after rotate the plugins report %+v, as before", k2)
	}
	var want []string
	for _, v := range before {
		want = append(want, strings.Replace(v, " enabled", " disabled", 1))
	}
	want = append(want, k2.RemoteVersion+" enabled")
	if versions := e.versions(t); !slices.Equal(versions, want) {
		t.Errorf("key versions after rotate --keep 0:\n got %v\nwant %v", versions, want)
	}
	report := e.verify(t, k2.KeyID, 0, "--fail-on-stale")
	e.checkVerifyClean(t, report, k2.KeyID, minTotal)
	stored := e.checkStored(t, k2.KeyID)
	for _, r := range report.Resources {
		stored[k2.KeyID] -= r.Total
	}
	if stored[k2.KeyID] != 0 {
		t.Errorf("verify counted %d objects fewer than the test's own scan of etcd", stored[k2.KeyID])
	}
	e.checkAPIEverywhere(t)
	calls, err := e.vault.Calls(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("key store calls during the rotation (3 plugins polling every second included): %v", diffCalls(calls0, calls))
	if st := e.state(t); st == nil || st.Doc.LastCompleted == nil || st.Doc.LastCompleted.NewKeyID != k2.KeyID || !st.Doc.LastCompleted.Verified {
		t.Errorf("state after the rotation does not show it completed and verified with %s: %+v", k2.KeyID, st)
	} else {
		t.Logf("state: stage %s, status %s, %d objects rewritten", st.Stage, st.Status, st.Doc.LastCompleted.Rewritten)
	}

	status := e.status(t)
	if !status.Agree || len(status.Plugins) != len(e.h.Nodes) {
		t.Errorf("status: agree %v with %d plugins; want agreement of %d", status.Agree, len(status.Plugins), len(e.h.Nodes))
	}
	for i, p := range status.Plugins {
		if p.Status == nil || p.Status.KeyIDHash != k2.KeyIDHash || p.URL != e.h.PluginEndpoints()[i] {
			t.Errorf("status: plugin %d %+v; want %s on key_id hash %s", i, p, e.h.PluginEndpoints()[i], k2.KeyIDHash)
		}
	}
	if status.State == nil || status.State.LastCompleted == nil || status.State.LastCompleted.NewKeyID != k2.KeyID || status.Lease.Holder != "" {
		t.Errorf("status: lease holder %q, last completed %+v; want no holder and the rotation to %s", status.Lease.Holder, status.State, k2.KeyID)
	}

	// Node 1 restarted, plugin and apiserver: both caches empty, so every
	// read unwraps through the vault, where only the new version is enabled.
	n := e.h.Nodes[1]
	if err := n.APIServer.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := n.Plugin.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.APIServer.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.checkAPI(ctx, n.Client); err != nil {
		t.Fatalf("after restarting %s's plugin and kube-apiserver: %v", n.Name, err)
	}
}

// haKilledAtEachStage runs rotate again, killing it right after each stage
// in turn (and once in the middle of re-encryption); each run resumes the
// last. A reader checks every object through the apiservers throughout,
// and after every kill the test checks etcd: every object encrypted under
// the old or the new key_id, never in clear, the old key version enabled
// until retire. The rotation must create exactly one new key version.
func haKilledAtEachStage(t *testing.T, e *env, minTotal map[string]int) {
	k2 := e.keyID(t)
	before := e.versions(t)
	if len(before) == 0 || before[len(before)-1] != k2.RemoteVersion+" enabled" {
		t.Fatalf("key versions %v; want the current %s last", before, k2.RemoteVersion)
	}
	r := e.startReader()
	readerStopped := false
	defer func() {
		if !readerStopped {
			r.stop()
		}
	}()
	// sigkill is not a hook: the test kills the process with SIGKILL in the
	// middle of re-encryption, once it has persisted some progress.
	const sigkill = "SIGKILL"
	crashes := []string{"preflight", "rotate", "converge", sigkill, fmt.Sprintf("reencrypt:%d", haCrashReencryptAt), "reencrypt", "verify", "retire"}
	known := []string{k2.KeyID}
	var k3 cluster.PluginStatus
	for i, crash := range crashes {
		var res cluster.CommandResult
		stage, _, _ := strings.Cut(crash, ":")
		if crash == sigkill {
			res = e.killDuringReencrypt(t, "--keep", "0")
			stage = "reencrypt"
		} else {
			res = e.runRotate(t, cluster.CrashExitCode, []string{cluster.EnvRotateCrashAfter + "=" + crash}, "--keep", "0")
		}
		st := e.state(t)
		if st == nil {
			t.Fatalf("no state after the kill at %s", crash)
		}
		t.Logf("killed after %-13s in %6v: stage %s, status %s, %d rewritten", crash, res.Duration.Round(time.Millisecond), st.Stage, st.Status, st.Rewritten())
		if st.Stage != stage {
			t.Errorf("state after the kill at %s: stage %q, want %q", crash, st.Stage, stage)
		}
		if i >= 1 { // the provider rotated
			k3 = e.keyIDEventually(t, k2.KeyID)
			if !slices.Contains(known, k3.KeyID) {
				known = append(known, k3.KeyID)
			}
		}
		if len(known) > 2 {
			t.Fatalf("resumed runs made more than one new key_id: %q", known)
		}
		counts := e.checkStored(t, known...)
		// The old version stays enabled until retire; exactly one new one.
		want := slices.Clone(before)
		if crash == "retire" {
			want[len(want)-1] = k2.RemoteVersion + " disabled"
		}
		if i >= 1 {
			want = append(want, k3.RemoteVersion+" enabled")
		}
		if versions := e.versions(t); !slices.Equal(versions, want) {
			t.Fatalf("after the kill at %s: key versions\n got %v\nwant %v", crash, versions, want)
		}
		if crash == "converge" {
			// Converged, nothing rewritten yet: verify sees stale objects
			// and --fail-on-stale fails.
			report := e.verify(t, "", 1, "--fail-on-stale", "--plugin-endpoints", strings.Join(e.h.PluginEndpoints(), ","))
			if report.ExpectedKeyID != k3.KeyID || report.Stale == 0 {
				t.Errorf("verify after converge: expected %q stale %d; want %q and stale > 0", report.ExpectedKeyID, report.Stale, k3.KeyID)
			}
		}
		t.Logf("  stored by key_id: %v", counts)
	}
	res := e.runRotate(t, 0, nil, "--keep", "0")
	t.Logf("final run: exit 0 in %v: %s", res.Duration.Round(time.Millisecond), lastLine(string(res.Stderr)))
	passes, errs := r.stop()
	readerStopped = true
	if len(errs) > 0 {
		t.Errorf("%d reads through the apiservers failed during the killed runs, first: %v", len(errs), errs[:min(len(errs), 3)])
	}
	if passes == 0 {
		t.Error("the reader never completed a pass")
	}
	t.Logf("reader: %d full passes over every object through the apiservers, %d failed", passes, len(errs))

	if got := e.keyID(t); got.KeyID != k3.KeyID {
		t.Fatalf("plugins report %s after the final run, want %s", got.KeyID, k3.KeyID)
	}
	e.checkVerifyClean(t, e.verify(t, k3.KeyID, 0, "--fail-on-stale"), k3.KeyID, minTotal)
	e.checkStored(t, k3.KeyID)
	want := append(slices.Clone(before[:len(before)-1]), k2.RemoteVersion+" disabled", k3.RemoteVersion+" enabled")
	if versions := e.versions(t); !slices.Equal(versions, want) {
		t.Errorf("key versions after the resumed rotation:\n got %v\nwant %v", versions, want)
	}
	e.checkAPIEverywhere(t)
}

// killDuringReencrypt starts rotate, waits until its state shows rewritten
// objects, and kills it with SIGKILL.
func (e *env) killDuringReencrypt(t *testing.T, extra ...string) cluster.CommandResult {
	t.Helper()
	r := e.startRotate(t, nil, extra...)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if st := e.state(t); st != nil && st.Stage == "reencrypt" && st.Rewritten() > 0 {
			break
		}
		if r.exited() {
			t.Fatalf("rotate ended before it had rewritten anything: %s", r.res)
		}
		if time.Now().After(deadline) {
			t.Fatal("rotate did not reach reencrypt with progress within 2 minutes")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := syscall.Kill(r.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	res, _ := r.wait(t, time.Minute)
	if res.ExitCode != 128+int(syscall.SIGKILL) {
		t.Fatalf("rotate killed during reencrypt: %s; want death by SIGKILL", res)
	}
	return res
}

// versions lists the vault key's versions, oldest first, as "KID enabled"
// or "KID disabled".
func (e *env) versions(t *testing.T) []string {
	t.Helper()
	vs, err := e.vault.KeyVersions(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = v.KID + map[bool]string{true: " enabled", false: " disabled"}[v.Enabled]
	}
	return out
}

// keyIDEventually waits until every plugin reports the same key_id other
// than old (the plugins poll the vault every second).
func (e *env) keyIDEventually(t *testing.T, old string) cluster.PluginStatus {
	t.Helper()
	var st cluster.PluginStatus
	cluster.WaitFor(context.Background(), t, 30*time.Second, 200*time.Millisecond, "every plugin on a new key_id", func() error {
		var first string
		for i, n := range e.h.Nodes {
			s, err := n.Plugin.Status(context.Background())
			if err != nil {
				return err
			}
			if s.KeyID == old || !s.Ready || (i > 0 && s.KeyID != first) {
				return fmt.Errorf("%s: %+v", n.Name, s)
			}
			first, st = s.KeyID, s
		}
		return nil
	})
	return st
}

// clusterStatus is the part of `kms-plugin status -o json` the tests read.
type clusterStatus struct {
	Plugins []struct {
		URL    string `json:"url"`
		Status *struct {
			KeyIDHash string `json:"keyIDHash"`
			Ready     bool   `json:"ready"`
		} `json:"status"`
		Error string `json:"error"`
	} `json:"plugins"`
	Agree bool `json:"agree"`
	Lease struct {
		Holder string `json:"holder"`
	} `json:"lease"`
	State *struct {
		LastCompleted *struct {
			NewKeyID string `json:"newKeyID"`
		} `json:"lastCompleted"`
	} `json:"state"`
}

// status runs `kms-plugin status -o json` and decodes its output.
func (e *env) status(t *testing.T) clusterStatus {
	t.Helper()
	res, err := cluster.Command{
		Binary:  bins.plugin,
		Args:    append([]string{"status", "--kubeconfig", e.h.Kubeconfig, "--plugin-endpoints", strings.Join(e.h.PluginEndpoints(), ","), "-o", "json"}, e.h.PluginTokenArgs()...),
		Timeout: time.Minute,
		LogPath: e.rotateLog,
	}.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("status: %s", res)
	}
	var st clusterStatus
	if err := json.Unmarshal(res.Stdout, &st); err != nil {
		t.Fatalf("status -o json: %v in %s", err, res.Stdout)
	}
	return st
}

func diffCalls(before, after map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
