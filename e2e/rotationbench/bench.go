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
	// Logf reports progress; nil means silent.
	Logf func(format string, args ...any)
}

// Proc is one process's share of a measurement.
type Proc struct {
	Duration time.Duration
	MaxRSS   int64 // bytes
}

// Kubectl is the documented path.
type Kubectl struct {
	// KeySwitch is the time from the new key version in the vault until
	// kube-apiserver wrote a Secret under the new key_id (the plugin's
	// poll plus kube-apiserver's Status poll, sped up by /readyz probes).
	KeySwitch time.Duration
	// Pipe is the wall time of get | replace.
	Pipe         time.Duration
	Get, Replace Proc
	// JSONBytes is the size of the List get printed; Replaced the number
	// of objects replace reported.
	JSONBytes int64
	Replaced  int
	// Calls are the key-store calls during the pipe.
	Calls  map[string]int64
	Verify cluster.VerifyReport
}

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
	Calls     map[string]int64
	Verify    cluster.VerifyReport
	Stderr    string
}

// Result is one run.
type Result struct {
	Secrets   int
	Populate  time.Duration
	OldKeyID  string
	KubectlID string // key_id the kubectl path moved to
	Kubectl   Kubectl
	Rotates   []Rotate
}

// KubectlRate is the objects per second of the kubectl pipe.
func (r *Result) KubectlRate() float64 {
	return float64(r.Kubectl.Replaced) / r.Kubectl.Pipe.Seconds()
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
	if err := b.kubectlPath(ctx); err != nil {
		return nil, fmt.Errorf("kubectl path: %w", err)
	}
	variants := cfg.RotateVariants
	if len(variants) == 0 {
		variants = [][]string{nil}
	}
	from := b.res.KubectlID
	for _, v := range variants {
		r, err := b.rotatePath(ctx, v, from)
		if err != nil {
			return nil, fmt.Errorf("rotate %s: %w", strings.Join(v, " "), err)
		}
		b.res.Rotates = append(b.res.Rotates, r)
		from = r.KeyID
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
func (b *bench) kubectlPath(ctx context.Context) error {
	plugin := b.h.Nodes[0].Plugin
	start := time.Now()
	if _, err := b.vault.NewKeyVersion(ctx); err != nil {
		return err
	}
	st, err := plugin.WaitForKeyIDChange(ctx, b.res.OldKeyID, time.Minute)
	if err != nil {
		return err
	}
	b.res.KubectlID = st.KeyID
	if err := b.waitWritesUse(ctx, st.KeyID, 3*time.Minute); err != nil {
		return err
	}
	b.res.Kubectl.KeySwitch = time.Since(start)
	b.logf("kubectl path: kube-apiserver writes with the new key_id %v after the new key version", b.res.Kubectl.KeySwitch.Round(time.Millisecond))

	if err := b.vault.ResetCalls(ctx); err != nil {
		return err
	}
	if err := b.kubectlPipe(ctx); err != nil {
		return err
	}
	if b.res.Kubectl.Calls, err = b.vault.Calls(ctx); err != nil {
		return err
	}
	b.logf("kubectl path: %d Secrets replaced in %v (get %.0f MiB, replace %.0f MiB peak RSS)", b.res.Kubectl.Replaced, b.res.Kubectl.Pipe.Round(time.Millisecond),
		mib(b.res.Kubectl.Get.MaxRSS), mib(b.res.Kubectl.Replace.MaxRSS))
	b.res.Kubectl.Verify, err = b.verify(ctx, st.KeyID)
	return err
}

// waitWritesUse writes canary Secrets (in namespace bench-canary) until
// one is stored under keyID.
func (b *bench) waitWritesUse(ctx context.Context, keyID string, timeout time.Duration) error {
	const ns = "bench-canary"
	if _, err := b.h.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err != nil {
		if _, err := b.h.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(timeout)
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "canary", Namespace: ns}, Data: map[string][]byte{}}
	for i := 0; ; i++ {
		s.Data["n"] = fmt.Appendf(nil, "%d", i)
		var err error
		if i == 0 {
			s, err = b.h.Client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{})
		} else {
			s, err = b.h.Client.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{})
		}
		if err != nil {
			return err
		}
		resp, err := b.h.EtcdClient.Get(ctx, cluster.SecretKey(ns, "canary"))
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 1 {
			if obj, err := cluster.DecodeStored(resp.Kvs[0].Value, b.h.ProviderName); err == nil && obj.KeyID == keyID {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver still does not write with key_id %s after %v", keyID, timeout)
		}
		time.Sleep(time.Second)
	}
}

// kubectlPipe runs kubectl get secrets -A -o json | kubectl replace -f -.
func (b *bench) kubectlPipe(ctx context.Context) error {
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
	k := &b.res.Kubectl
	k.Pipe = time.Since(start)
	k.Get = Proc{Duration: getDone, MaxRSS: maxRSS(get)}
	k.Replace = Proc{Duration: k.Pipe, MaxRSS: maxRSS(replace)}
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
	// --migration update: the harness runs no kube-controller-manager, so
	// with the default auto rotate would wait --svm-start-timeout (2m) for
	// a StorageVersionMigration controller before it falls back to updates.
	args = append(args, "--min-age", "0s", "--migration", "update")
	args = append(args, extra...)
	res, err := cluster.Command{
		Binary: b.cfg.PluginBinary, Args: args, Env: b.vault.Env(),
		Timeout: 30 * time.Minute, LogPath: filepath.Join(b.dir, "rotate.log"),
	}.Run(ctx)
	r.Total, r.Process, r.ExitCode, r.Stderr = res.Duration, Proc{Duration: res.Duration, MaxRSS: res.MaxRSS}, res.ExitCode, string(res.Stderr)
	if err != nil {
		return r, err
	}
	if res.ExitCode != 0 {
		return r, fmt.Errorf("rotate: %s", res)
	}
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
	b.logf("rotate %s: exit 0 in %v, %d objects rewritten, re-encrypt stage %v, peak RSS %.0f MiB", strings.Join(extra, " "), r.Total.Round(time.Millisecond), r.Rewritten,
		r.Stages["reencrypt"].Round(time.Millisecond), mib(r.Process.MaxRSS))
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

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
