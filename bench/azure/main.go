// Command azure measures what the azurekeyvault provider costs the vault,
// against the in-repo Key Vault protocol server (kvtest) and the real azkeys
// and azidentity clients:
//
//  1. Key Vault calls per hour per node at steady state: the plugin
//     (envelope hierarchy + azurekv, default 60 s poll) against a plugin
//     that calls the vault on every request and health probe, both driven
//     by the same hour of kube-apiserver traffic. The hour is compressed by
//     -scale (poll interval and traffic schedule divided by it); the calls
//     the server counts are reported as calls per real hour, which they
//     are, since each is tied to a scheduled event. Status calls are
//     measured directly as well: N Status calls, vault calls counted.
//
//  2. kube-apiserver cold start: a fresh plugin decrypting -seeds distinct
//     DEK seeds with -latency added to every vault answer, hierarchy on
//     (local KEKs) and off (every seed wrapped and unwrapped in the vault).
//
//  3. A flood of forged Decrypts (one genuine wrapped local KEK under
//     -forged distinct version spellings) against the shipped assembly,
//     beside a legitimate workload: vault unwraps, the legitimate cache hit
//     rate and the plugin's log lines.
//
//     go run ./bench/azure [-scale 1000] [-seeds 1000] [-latency 20ms] [-forged 10000] [-out FILE]
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "bench/azure: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	scale       int
	seeds       int
	latency     time.Duration
	clients     int
	statusCalls int
	forged      int
}

func run(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("bench/azure", flag.ContinueOnError)
	var o options
	fs.IntVar(&o.scale, "scale", 1000, "time compression of the steady-state hour (60 s poll -> 60 s/scale)")
	fs.IntVar(&o.seeds, "seeds", 1000, "distinct DEK seeds in the cold start")
	fs.DurationVar(&o.latency, "latency", 20*time.Millisecond, "added to every vault answer in the cold start")
	fs.IntVar(&o.clients, "clients", 16, "concurrent Decrypt callers in the second cold-start run")
	fs.IntVar(&o.statusCalls, "status-calls", 100000, "Status calls in the direct Status measurement")
	fs.IntVar(&o.forged, "forged", 10000, "forged Decrypts in the flood (0 skips it)")
	out := fs.String("out", "", "also write the report to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var report bytes.Buffer
	w := io.MultiWriter(stdout, &report)
	ctx := context.Background()

	fmt.Fprintf(w, "# azurekeyvault provider: vault calls\n\nAgainst kvtest (in-repo Key Vault protocol server) with the real azkeys/azidentity clients; %s.\n\n", time.Now().UTC().Format(time.RFC3339))
	if err := steadyState(ctx, w, o); err != nil {
		return err
	}
	if err := coldStart(ctx, w, o); err != nil {
		return err
	}
	if o.forged > 0 {
		if err := forgedReport(ctx, w, o.forged); err != nil {
			return err
		}
	}
	if *out != "" {
		return os.WriteFile(*out, report.Bytes(), 0o644)
	}
	return nil
}

// env is a fake vault with one RSA key and an app allowed to use it.
type env struct {
	srv  *kvtest.Server
	cred azurekv.CredentialConfig
}

func newEnv(key string) (*env, error) {
	srv, err := kvtest.Start(kvtest.Options{})
	if err != nil {
		return nil, err
	}
	if _, err := srv.CreateKey(key, kvtest.KeyTypeRSA, 3072); err != nil {
		srv.Close()
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kvbench-")
	if err != nil {
		srv.Close()
		return nil, err
	}
	secretFile := dir + "/secret"
	if err := os.WriteFile(secretFile, []byte("kvbench-secret"), 0o600); err != nil {
		srv.Close()
		return nil, err
	}
	srv.AddClientSecret("kvbench", "kvbench-secret")
	return &env{srv: srv, cred: azurekv.CredentialConfig{
		Kind: azurekv.CredentialClientSecret, TenantID: srv.TenantID(), ClientID: "kvbench", ClientSecretFile: secretFile,
		AuthorityHost: srv.AuthorityHost(), Transport: srv.HTTPClient(),
	}}, nil
}

func (e *env) close() {
	e.srv.Close()
	if i := strings.LastIndex(e.cred.ClientSecretFile, "/"); i > 0 {
		os.RemoveAll(e.cred.ClientSecretFile[:i])
	}
}

// provider returns a fresh provider, as a plugin process has at start.
func (e *env) provider(key string, wrapInVault bool) (*azurekv.Provider, error) {
	cred, _, err := azurekv.NewCredential(e.cred)
	if err != nil {
		return nil, err
	}
	return azurekv.New(azurekv.Config{VaultURL: e.srv.VaultURL(), KeyName: key, Credential: cred, Transport: e.srv.HTTPClient(), WrapInVault: wrapInVault})
}

// naive is a plugin without the hierarchy and without a poll loop: every
// Status is a vault GET (its health probe), every Encrypt a wrapkey, every
// Decrypt an unwrapkey.
type naive struct{ p provider.Provider }

func (n *naive) Status(ctx context.Context) (*kmsservice.StatusResponse, error) {
	v, err := n.p.CurrentVersion(ctx)
	if err != nil {
		return nil, err
	}
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: envelope.DeriveKeyID("naive", v)}, nil
}

func (n *naive) Encrypt(ctx context.Context, _ string, pt []byte) (*kmsservice.EncryptResponse, error) {
	w, err := n.p.Wrap(ctx, pt)
	if err != nil {
		return nil, err
	}
	return &kmsservice.EncryptResponse{Ciphertext: w.Ciphertext, KeyID: envelope.DeriveKeyID("naive", w.Version),
		Annotations: map[string][]byte{"version.naive.kms-plugin.io": []byte(w.Version)}}, nil
}

func (n *naive) Decrypt(ctx context.Context, _ string, req *kmsservice.DecryptRequest) ([]byte, error) {
	return n.p.Unwrap(ctx, provider.WrappedKey{Version: string(req.Annotations["version.naive.kms-plugin.io"]), Ciphertext: req.Ciphertext})
}

// apiserverHour is one hour of what a healthy kube-apiserver asks a KMS v2
// plugin: Status every 60 s from its health loop, and Status from /readyz
// probes, whose result it caches for 20 s (kubelet probes far more often),
// so at most every 20 s. Writes and cached reads never reach the plugin.
func apiserverHour() []time.Duration {
	var at []time.Duration
	for t := time.Duration(0); t < time.Hour; t += 20 * time.Second {
		at = append(at, t) // /readyz
		if t%time.Minute == 0 {
			at = append(at, t) // health loop
		}
	}
	return at
}

func steadyState(ctx context.Context, w io.Writer, o options) error {
	e, err := newEnv("steady")
	if err != nil {
		return err
	}
	defer e.close()
	scale := time.Duration(o.scale)
	hour := apiserverHour()

	// The plugin: hierarchy, background poll every 60 s (scaled).
	p, err := e.provider("steady", false)
	if err != nil {
		return err
	}
	svc, err := envelope.New(envelope.Config{Provider: p, PollInterval: envelope.DefaultPollInterval / scale})
	if err != nil {
		return err
	}
	if err := svc.Refresh(ctx); err != nil { // the poll at start, before the socket opens
		return err
	}
	e.srv.ResetCalls()
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	start := time.Now()
	wg.Go(func() {
		t := time.NewTimer(envelope.DefaultPollInterval / scale) // Run polls at once; the start poll was that one
		defer t.Stop()
		select {
		case <-runCtx.Done():
			return
		case <-t.C:
		}
		_ = svc.Run(runCtx)
	})
	statuses, err := drive(ctx, start, scale, hour, svc)
	if err != nil {
		stop()
		return err
	}
	time.Sleep(time.Until(start.Add(time.Hour / scale)))
	stop()
	wg.Wait()
	pluginCalls := e.srv.AllCalls()
	pluginTotal := e.srv.VaultCalls()

	// Status alone, measured directly.
	e.srv.ResetCalls()
	for range o.statusCalls {
		if _, err := svc.Status(ctx); err != nil {
			return err
		}
	}
	statusVault := e.srv.VaultCalls()

	// The naive plugin, same hour.
	np, err := e.provider("steady", true)
	if err != nil {
		return err
	}
	nv := &naive{p: np}
	if _, err := nv.Status(ctx); err != nil { // its start: challenge, token
		return err
	}
	e.srv.ResetCalls()
	start = time.Now()
	naiveStatuses, err := drive(ctx, start, scale, hour, nv)
	if err != nil {
		return err
	}
	naiveTotal := e.srv.VaultCalls()

	fmt.Fprintf(w, "## Key Vault calls per hour per node, steady state\n\n")
	fmt.Fprintf(w, "One hour of kube-apiserver traffic (%d Status calls: every 60 s from its health loop, every 20 s from cached /readyz probes), compressed %dx: the poll interval is 60 s/%d, each call tied to a scheduled event, so the counts are per real hour.\n\n", len(hour), o.scale, o.scale)
	fmt.Fprintf(w, "| plugin | Status calls | vault calls in the hour | per Status |\n| --- | ---: | ---: | ---: |\n")
	fmt.Fprintf(w, "| kms-plugin (hierarchy, 60 s poll) | %d | **%d** (%s) | 0 |\n", statuses, pluginTotal, formatCalls(pluginCalls))
	fmt.Fprintf(w, "| vault on every request and probe | %d | **%d** | %.0f |\n\n", naiveStatuses, naiveTotal, float64(naiveTotal)/float64(max(1, naiveStatuses)))
	fmt.Fprintf(w, "Status measured directly: %d Status calls made **%d** vault calls.\n\n", o.statusCalls, statusVault)
	return nil
}

// drive calls Status at each scheduled time, compressed by scale.
func drive(ctx context.Context, start time.Time, scale time.Duration, at []time.Duration, svc kmsservice.Service) (int, error) {
	n := 0
	for _, d := range at {
		time.Sleep(time.Until(start.Add(d / scale)))
		if _, err := svc.Status(ctx); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

func formatCalls(m map[string]int64) string {
	var parts []string
	for _, op := range []string{"get", "list", "wrapkey", "unwrapkey", "token"} {
		if m[op] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", op, m[op]))
		}
	}
	return strings.Join(parts, ", ")
}

type coldResult struct {
	mode           string
	clients        int
	wall, startup  time.Duration
	vault, unwraps int64
}

func coldStart(ctx context.Context, w io.Writer, o options) error {
	fmt.Fprintf(w, "## kube-apiserver cold start: %d distinct DEK seeds, %s vault latency\n\n", o.seeds, o.latency)
	fmt.Fprintf(w, "A writer plugin encrypted the seeds; a fresh plugin (new process: new provider, token, empty cache) starts and decrypts all of them, as a restarting kube-apiserver does. Vault calls are counted by the server; the first vault request of a fresh client is the unauthenticated challenge.\n\n")
	fmt.Fprintf(w, "| hierarchy | Decrypt callers | plugin start | decrypt all | vault calls | unwrapkey |\n| --- | ---: | ---: | ---: | ---: | ---: |\n")
	for _, mode := range []string{"on", "off"} {
		for _, clients := range []int{1, o.clients} {
			r, err := measureCold(ctx, mode, clients, o)
			if err != nil {
				return fmt.Errorf("cold start %s/%d: %w", mode, clients, err)
			}
			fmt.Fprintf(w, "| %s | %d | %s | **%s** | %d | %d |\n", r.mode, r.clients, r.startup.Round(time.Millisecond), r.wall.Round(time.Millisecond), r.vault, r.unwraps)
		}
	}
	fmt.Fprintln(w)
	return nil
}

func measureCold(ctx context.Context, mode string, clients int, o options) (coldResult, error) {
	res := coldResult{mode: mode, clients: clients}
	e, err := newEnv("cold")
	if err != nil {
		return res, err
	}
	defer e.close()
	newService := func() (kmsservice.Service, func(context.Context) error, error) {
		if mode == "on" {
			p, err := e.provider("cold", false)
			if err != nil {
				return nil, nil, err
			}
			svc, err := envelope.New(envelope.Config{Provider: p})
			if err != nil {
				return nil, nil, err
			}
			return svc, svc.Refresh, nil
		}
		p, err := e.provider("cold", true)
		if err != nil {
			return nil, nil, err
		}
		nv := &naive{p: p}
		return nv, func(ctx context.Context) error { _, err := nv.Status(ctx); return err }, nil
	}
	writer, start, err := newService()
	if err != nil {
		return res, err
	}
	if err := start(ctx); err != nil {
		return res, err
	}
	seeds := make([][]byte, o.seeds)
	cts := make([]*kmsservice.EncryptResponse, o.seeds)
	for i := range seeds {
		seeds[i] = make([]byte, 32)
		if _, err := rand.Read(seeds[i]); err != nil {
			return res, err
		}
		if cts[i], err = writer.Encrypt(ctx, "seed", seeds[i]); err != nil {
			return res, err
		}
	}

	e.srv.SetLatency(o.latency)
	e.srv.ResetCalls()
	t0 := time.Now()
	reader, start, err := newService()
	if err != nil {
		return res, err
	}
	if err := start(ctx); err != nil {
		return res, err
	}
	res.startup = time.Since(t0)
	t1 := time.Now()
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= o.seeds {
					return
				}
				c := cts[i]
				pt, err := reader.Decrypt(ctx, "seed", &kmsservice.DecryptRequest{Ciphertext: c.Ciphertext, KeyID: c.KeyID, Annotations: c.Annotations})
				if err != nil || !bytes.Equal(pt, seeds[i]) {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	res.wall = time.Since(t1)
	if n := failed.Load(); n > 0 {
		return res, errors.New(fmt.Sprint(n, " decrypts failed"))
	}
	res.vault, res.unwraps = e.srv.VaultCalls(), e.srv.Calls("unwrapkey")
	return res, nil
}
