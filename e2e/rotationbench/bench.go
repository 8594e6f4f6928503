// Package rotationbench measures a key rotation of N Secrets two ways on the
// same control plane (one kube-apiserver, one kms-plugin on the Key Vault
// test server, etcd over TLS): the documented manual path, a new key
// version followed by `kubectl get secrets -A -o json | kubectl replace -f -`,
// and `kms-plugin rotate`. For each it records the wall time, the objects
// re-encrypted per second, the peak RSS of every process involved (wait4
// rusage) and the key-store calls (kvtestd's counters), and it checks with
// `kms-plugin verify` that both paths leave no stale object.
//
// The e2e test in this package runs it at a small size and asserts only
// correctness; cmd/rotationbench runs it at the benchmark sizes and writes
// the Markdown report.
package rotationbench

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// Config configures one run.
type Config struct {
	PluginBinary, KubeAPIServerBinary, EtcdBinary, KubectlBinary string
	// Secrets is the number of Secrets; required.
	Secrets int
	// ValueBytes is the size of each Secret's random value; zero means 1024.
	ValueBytes int
	// PerNamespace is the number of Secrets per namespace; zero means 1000.
	PerNamespace int
	// RotateVariants are extra flags for rotate (for example --qps 1000);
	// rotate runs once per variant, each a full rotation after the previous
	// one. Empty means one run with the defaults.
	RotateVariants [][]string
	// Repeats is how many times both paths run, alternating (kubectl, then
	// every rotate variant, then kubectl again, ...); zero means once.
	Repeats int
	// Logf reports progress; nil means silent.
	Logf func(format string, args ...any)
}

// Proc is one process's share of a measurement.
type Proc struct {
	Duration time.Duration
	MaxRSS   int64         // bytes
	CPU      time.Duration // user + system
}

// ServerCPU is the CPU time each control-plane process used during a
// measurement, by process name ("kube-apiserver", "etcd", "kms-plugin",
// "kvtestd").
type ServerCPU map[string]time.Duration

// Switch is when, counted from the start of a path, the plugin and then
// kube-apiserver moved to the new key_id, as a watcher polling the plugin's
// /status and writing a probe Secret read back from etcd saw it (every
// 200 ms). Pickup is the part no client can shorten: kube-apiserver learns a
// new key_id only when it next asks the plugin for its Status (its cached
// health answer lives 20 s).
type Switch struct {
	Plugin, APIServer time.Duration
}

// Pickup is the time from the plugin reporting the new key_id to
// kube-apiserver writing with it.
func (s Switch) Pickup() time.Duration { return s.APIServer - s.Plugin }

// Kubectl is the documented path.
type Kubectl struct {
	// Switch is counted from the new key version in the vault; the pipe
	// starts as soon as kube-apiserver writes with the new key_id.
	Switch Switch
	// Pipe is the wall time of get | replace.
	Pipe         time.Duration
	Get, Replace Proc
	// JSONBytes is the size of the List get printed; Replaced the number
	// of objects replace reported.
	JSONBytes int64
	Replaced  int
	// Calls are the key-store calls during the pipe.
	Calls map[string]int64
	// ServerCPU is what the control plane spent during the pipe.
	ServerCPU ServerCPU
	// KeyID is the key_id the path moved to.
	KeyID  string
	Verify cluster.VerifyReport
}

// Total is the path's wall time: key switch, then the pipe.
func (k *Kubectl) Total() time.Duration { return k.Switch.APIServer + k.Pipe }

// Rate is the objects per second of the pipe.
func (k *Kubectl) Rate() float64 { return float64(k.Replaced) / k.Pipe.Seconds() }

// Rotate is one `kms-plugin rotate` run.
type Rotate struct {
	// Args are the flags added to the benchmark's defaults.
	Args []string
	// FromKeyID and KeyID are the key_ids before and after.
	FromKeyID, KeyID string
	Total            time.Duration
	Process          Proc
	ExitCode         int
	// Stages are the stage durations from rotate's state.
	Stages map[string]time.Duration
	// Rewritten is the number of objects rotate rewrote.
	Rewritten int64
	// Switch is counted from the start of the rotate process.
	Switch Switch
	Calls  map[string]int64
	// ServerCPU is what the control plane spent from kube-apiserver's
	// switch to the new key_id until rotate ended: re-encryption, verify
	// and retire.
	ServerCPU ServerCPU
	Verify    cluster.VerifyReport
	Stderr    string
}

// Result is one size's runs.
type Result struct {
	Secrets  int
	Populate time.Duration
	OldKeyID string
	// Kubectls and Rotates are in the order they ran; Rotates holds every
	// variant of every repeat.
	Kubectls []Kubectl
	Rotates  []Rotate
}

// ReencryptRate is the objects per second of rotate's re-encrypt stage.
func (r *Rotate) ReencryptRate() float64 {
	d := r.Stages["reencrypt"]
	if d == 0 {
		return 0
	}
	return float64(r.Rewritten) / d.Seconds()
}

// Run starts the control plane in a temporary directory, runs both paths
// and stops everything again. The directory is removed unless Run fails.
func Run(ctx context.Context, cfg Config) (res *Result, err error) {
	if cfg.Secrets <= 0 {
		return nil, errors.New("rotationbench: Secrets must be positive")
	}
	if cfg.ValueBytes == 0 {
		cfg.ValueBytes = 1024
	}
	if cfg.PerNamespace == 0 {
		cfg.PerNamespace = 1000
	}
	logf := cfg.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	dir, err := os.MkdirTemp("", "kmsb-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w (state and logs kept in %s)", err, dir)
			return
		}
		os.RemoveAll(dir)
	}()
	vault, err := cluster.StartVault(ctx, dir, "etcd-kek")
	if err != nil {
		return nil, err
	}
	defer vault.Stop()
	h, err := cluster.StartHA(ctx, cluster.HAConfig{
		PluginBinary: cfg.PluginBinary, KubeAPIServerBinary: cfg.KubeAPIServerBinary, EtcdBinary: cfg.EtcdBinary,
		Dir: dir, Nodes: 1, PluginArgs: vault.ProviderArgs(), PluginEnv: vault.Env(),
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := h.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, h.LogTails(30))
		}
	}()
	defer h.ProbeReadyz(3 * time.Second)()
	b := &bench{cfg: cfg, h: h, vault: vault, dir: dir, logf: logf, res: &Result{Secrets: cfg.Secrets}}
	if err := b.populate(ctx); err != nil {
		return nil, err
	}
	variants := cfg.RotateVariants
	if len(variants) == 0 {
		variants = [][]string{nil}
	}
	from := b.res.OldKeyID
	for rep := range max(1, cfg.Repeats) {
		k, err := b.kubectlPath(ctx, from)
		if err != nil {
			return nil, fmt.Errorf("kubectl path (run %d): %w", rep+1, err)
		}
		b.res.Kubectls = append(b.res.Kubectls, k)
		from = k.KeyID
		for _, v := range variants {
			r, err := b.rotatePath(ctx, v, from)
			if err != nil {
				return nil, fmt.Errorf("rotate %s (run %d): %w", strings.Join(v, " "), rep+1, err)
			}
			b.res.Rotates = append(b.res.Rotates, r)
			from = r.KeyID
		}
	}
	return b.res, nil
}

type bench struct {
	cfg   Config
	h     *cluster.HA
	vault *cluster.Vault
	dir   string
	logf  func(string, ...any)
	res   *Result
}

func (b *bench) populate(ctx context.Context) error {
	start := time.Now()
	nsCount := (b.cfg.Secrets + b.cfg.PerNamespace - 1) / b.cfg.PerNamespace
	for i := range nsCount {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-%d", i)}}
		if _, err := b.h.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	err := cluster.Parallel(b.cfg.Secrets, 16, func(i int) error {
		value := make([]byte, b.cfg.ValueBytes)
		if _, err := rand.Read(value); err != nil {
			return err
		}
		ns := fmt.Sprintf("bench-%d", i/b.cfg.PerNamespace)
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s-%06d", i), Namespace: ns}, Data: map[string][]byte{"value": value}}
		_, err := b.h.Client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("create secrets: %w", err)
	}
	b.res.Populate = time.Since(start)
	st, err := b.h.Nodes[0].Plugin.Status(ctx)
	if err != nil {
		return err
	}
	b.res.OldKeyID = st.KeyID
	b.logf("%d Secrets of %d random bytes created in %v", b.cfg.Secrets, b.cfg.ValueBytes, b.res.Populate.Round(time.Millisecond))
	return nil
}

// kubectlPath makes a new key version, waits until kube-apiserver writes
// with it, then rewrites every Secret with kubectl.
func (b *bench) kubectlPath(ctx context.Context, from string) (Kubectl, error) {
	k := Kubectl{}
	start := time.Now()
	w := b.watchSwitch(ctx, from, start)
	defer w.stop()
	if _, err := b.vault.NewKeyVersion(ctx); err != nil {
		return k, err
	}
	sw, keyID, err := w.wait(3 * time.Minute)
	if err != nil {
		return k, err
	}
	w.stop()
	k.Switch, k.KeyID = sw, keyID
	b.logf("kubectl path: the plugin reports the new key_id after %v, kube-apiserver writes with it after %v",
		sw.Plugin.Round(time.Millisecond), sw.APIServer.Round(time.Millisecond))

	if err := b.vault.ResetCalls(ctx); err != nil {
		return k, err
	}
	cpu0, err := b.serverCPU()
	if err != nil {
		return k, err
	}
	if err := b.kubectlPipe(ctx, &k); err != nil {
		return k, err
	}
	cpu1, err := b.serverCPU()
	if err != nil {
		return k, err
	}
	k.ServerCPU = cpu1.since(cpu0)
	if k.Calls, err = b.vault.Calls(ctx); err != nil {
		return k, err
	}
	b.logf("kubectl path: %d Secrets replaced in %v (get %.0f MiB, replace %.0f MiB peak RSS; CPU get %v, replace %v, control plane %v)", k.Replaced, k.Pipe.Round(time.Millisecond),
		mib(k.Get.MaxRSS), mib(k.Replace.MaxRSS), k.Get.CPU, k.Replace.CPU, k.ServerCPU)
	k.Verify, err = b.verify(ctx, keyID)
	return k, err
}

// switchWatch records when the plugin, then kube-apiserver, move off a
// key_id.
type switchWatch struct {
	done   chan struct{} // closed when the watch ends
	cancel context.CancelFunc
	// Valid once done is closed.
	sw    Switch
	keyID string
	// cpu is the control plane's CPU time when kube-apiserver switched.
	cpu ServerCPU
	err error
}

// probeNamespace holds the watcher's probe Secret.
const probeNamespace = "bench-canary"

// watchSwitch starts watching, counting from start: every 200 ms it asks
// the plugin for its key_id and, once that changed from from, writes the
// probe Secret and reads its key_id back from etcd.
func (b *bench) watchSwitch(ctx context.Context, from string, start time.Time) *switchWatch {
	ctx, cancel := context.WithCancel(ctx)
	w := &switchWatch{done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(w.done)
		w.err = b.watch(ctx, from, start, w)
	}()
	return w
}

func (b *bench) watch(ctx context.Context, from string, start time.Time, w *switchWatch) error {
	client := b.h.Client.CoreV1()
	if _, err := client.Namespaces().Get(ctx, probeNamespace, metav1.GetOptions{}); err != nil {
		if _, err := client.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: probeNamespace}}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	secrets := client.Secrets(probeNamespace)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if w.keyID == "" {
			st, err := b.h.Nodes[0].Plugin.Status(ctx)
			if err != nil || st.KeyID == from || st.KeyID == "" {
				continue
			}
			w.sw.Plugin, w.keyID = time.Since(start), st.KeyID
		}
		// A write through the API, read back raw: update, or create the
		// first time.
		data := map[string][]byte{"n": fmt.Appendf(nil, "%d", n)}
		s, err := secrets.Get(ctx, "probe", metav1.GetOptions{})
		switch {
		case err == nil:
			s.Data = data
			_, err = secrets.Update(ctx, s, metav1.UpdateOptions{})
		default:
			_, err = secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: probeNamespace}, Data: data}, metav1.CreateOptions{})
		}
		if err != nil {
			continue // a conflict with rotate's own rewrite; try again
		}
		resp, err := b.h.EtcdClient.Get(ctx, cluster.SecretKey(probeNamespace, "probe"))
		if err != nil || len(resp.Kvs) != 1 {
			continue
		}
		if obj, err := cluster.DecodeStored(resp.Kvs[0].Value, b.h.ProviderName); err == nil && obj.KeyID == w.keyID {
			w.sw.APIServer = time.Since(start)
			w.cpu, err = b.serverCPU()
			return err
		}
	}
}

// wait waits until kube-apiserver writes with the new key_id.
func (w *switchWatch) wait(timeout time.Duration) (Switch, string, error) {
	select {
	case <-w.done:
	case <-time.After(timeout):
		w.stop()
		return Switch{}, "", fmt.Errorf("kube-apiserver does not write with a new key_id after %v", timeout)
	}
	if w.err != nil {
		return Switch{}, "", w.err
	}
	return w.sw, w.keyID, nil
}

// stop ends the watch and waits for it.
func (w *switchWatch) stop() {
	w.cancel()
	<-w.done
}

// kubectlPipe runs kubectl get secrets -A -o json | kubectl replace -f -.
func (b *bench) kubectlPipe(ctx context.Context, k *Kubectl) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	kubeconfig := "--kubeconfig=" + b.h.Kubeconfig
	get := exec.CommandContext(ctx, b.cfg.KubectlBinary, kubeconfig, "get", "secrets", "-A", "-o", "json")
	replace := exec.CommandContext(ctx, b.cfg.KubectlBinary, kubeconfig, "replace", "-f", "-")
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	defer pr.Close()
	count := &countingWriter{w: pw}
	var getErr, replaceOut, replaceErr bytes.Buffer
	get.Stdout, get.Stderr = count, &getErr
	replace.Stdin, replace.Stdout, replace.Stderr = pr, &replaceOut, &replaceErr
	for _, c := range []*exec.Cmd{get, replace} {
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	start := time.Now()
	if err := replace.Start(); err != nil {
		pw.Close()
		return err
	}
	if err := get.Start(); err != nil {
		pw.Close()
		_ = replace.Wait()
		return err
	}
	gerr := get.Wait()
	getDone := time.Since(start)
	pw.Close()
	rerr := replace.Wait()
	k.Pipe = time.Since(start)
	k.Get = Proc{Duration: getDone, MaxRSS: maxRSS(get), CPU: cpu(get)}
	k.Replace = Proc{Duration: k.Pipe, MaxRSS: maxRSS(replace), CPU: cpu(replace)}
	k.JSONBytes = count.n.Load()
	k.Replaced = strings.Count(replaceOut.String(), " replaced\n")
	if gerr != nil {
		return fmt.Errorf("kubectl get: %w: %s", gerr, getErr.Bytes())
	}
	if rerr != nil {
		return fmt.Errorf("kubectl replace: %w: %s", rerr, lastLines(replaceErr.String(), 10))
	}
	return nil
}

func (b *bench) rotatePath(ctx context.Context, extra []string, from string) (Rotate, error) {
	r := Rotate{Args: extra, FromKeyID: from}
	if err := b.vault.ResetCalls(ctx); err != nil {
		return r, err
	}
	args := append(b.h.RotateArgs(), b.vault.ProviderArgs()...)
	args = append(args, "--min-age", "0s")
	args = append(args, extra...)
	w := b.watchSwitch(ctx, from, time.Now())
	defer w.stop()
	res, err := cluster.Command{
		Binary: b.cfg.PluginBinary, Args: args, Env: b.vault.Env(),
		Timeout: 30 * time.Minute, LogPath: filepath.Join(b.dir, "rotate.log"),
	}.Run(ctx)
	cpu1, cerr := b.serverCPU()
	r.Total, r.Process, r.ExitCode, r.Stderr = res.Duration, Proc{Duration: res.Duration, MaxRSS: res.MaxRSS, CPU: res.CPU}, res.ExitCode, string(res.Stderr)
	if err != nil {
		return r, err
	}
	if res.ExitCode != 0 {
		return r, fmt.Errorf("rotate: %s", res)
	}
	// rotate finished only after its canary saw the switch, so the
	// watcher has seen it too, or is about to.
	if r.Switch, _, err = w.wait(10 * time.Second); err != nil {
		return r, fmt.Errorf("switch watcher: %w", err)
	}
	if cerr != nil {
		return r, cerr
	}
	r.ServerCPU = cpu1.since(w.cpu)
	if r.Calls, err = b.vault.Calls(ctx); err != nil {
		return r, err
	}
	st, err := b.h.RotationState(ctx, cluster.RotationNamespace, cluster.RotationName)
	if err != nil {
		return r, err
	}
	if st == nil || st.Doc.Rotation == nil {
		return r, errors.New("rotate exited 0 but left no state")
	}
	if st.Doc.Rotation.OldKeyID != from {
		return r, fmt.Errorf("rotate started from key_id %s, want %s", st.Doc.Rotation.OldKeyID, from)
	}
	r.Stages = st.StageDurations()
	r.Rewritten = st.Rewritten()
	r.KeyID = st.Doc.Rotation.NewKeyID
	b.logf("rotate %s: exit 0 in %v (kube-apiserver pickup %v), %d objects rewritten, re-encrypt stage %v, peak RSS %.0f MiB, CPU %v (control plane %v)", strings.Join(extra, " "), r.Total.Round(time.Millisecond),
		r.Switch.Pickup().Round(time.Millisecond), r.Rewritten, r.Stages["reencrypt"].Round(time.Millisecond), mib(r.Process.MaxRSS), r.Process.CPU.Round(time.Millisecond), r.ServerCPU)
	r.Verify, err = b.verify(ctx, r.KeyID)
	return r, err
}

// verify runs kms-plugin verify -o json --expect-key-id keyID.
func (b *bench) verify(ctx context.Context, keyID string) (cluster.VerifyReport, error) {
	res, err := cluster.Command{
		Binary: b.cfg.PluginBinary, Args: append(b.h.VerifyArgs(), "--expect-key-id", keyID),
		Timeout: 10 * time.Minute, LogPath: filepath.Join(b.dir, "rotate.log"),
	}.Run(ctx)
	if err != nil {
		return cluster.VerifyReport{}, err
	}
	if res.ExitCode != 0 {
		return cluster.VerifyReport{}, fmt.Errorf("verify: %s", res)
	}
	return cluster.ParseVerifyReport(res.Stdout)
}

type countingWriter struct {
	w io.Writer
	n atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func maxRSS(c *exec.Cmd) int64 {
	if c.ProcessState == nil {
		return 0
	}
	if ru, ok := c.ProcessState.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss * 1024
	}
	return 0
}

func cpu(c *exec.Cmd) time.Duration {
	if c.ProcessState == nil {
		return 0
	}
	return c.ProcessState.UserTime() + c.ProcessState.SystemTime()
}

// serverCPU reads the CPU time used so far by every control-plane process.
func (b *bench) serverCPU() (ServerCPU, error) {
	out := ServerCPU{}
	procs := append([]*cluster.Process{b.vault.Process()}, b.h.Etcd.Members()...)
	for _, n := range b.h.Nodes {
		procs = append(procs, n.Plugin.Process(), n.APIServer.Process())
	}
	for _, p := range procs {
		d, err := p.CPUTime()
		if err != nil {
			return nil, err
		}
		name, _, _ := strings.Cut(p.Name, "@")
		if strings.HasPrefix(name, "etcd") {
			name = "etcd"
		}
		out[name] += d
	}
	return out, nil
}

// since returns the CPU each process used since before.
func (c ServerCPU) since(before ServerCPU) ServerCPU {
	out := ServerCPU{}
	for k, v := range c {
		out[k] = v - before[k]
	}
	return out
}

// Total is the CPU time of all processes.
func (c ServerCPU) Total() time.Duration {
	var t time.Duration
	for _, v := range c {
		t += v
	}
	return t
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
