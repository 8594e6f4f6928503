//go:build pkcs11

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/plugin"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/pkcs11"
)

const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "bench/pkcs11: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	seeds int
	calls int
	idle  time.Duration
	poll  time.Duration
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("bench/pkcs11", flag.ContinueOnError)
	var o options
	fs.IntVar(&o.seeds, "seeds", 1000, "distinct DEK seeds in the cold start")
	fs.IntVar(&o.calls, "calls", 5000, "warm Decrypt calls per target")
	fs.DurationVar(&o.idle, "idle", 3*time.Minute, "idle window in which the plugin's HSM calls are counted")
	fs.DurationVar(&o.poll, "poll", envelope.DefaultPollInterval, "the plugin's poll interval in the idle window")
	out := fs.String("out", "", "also write the report to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var report bytes.Buffer
	w := io.MultiWriter(stdout, &report)
	dir, err := os.MkdirTemp("", "pkcs11bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	tok, err := newToken(dir)
	if err != nil {
		return err
	}
	t0 := time.Now()
	fmt.Fprintf(w, "# pkcs11 provider: HSM calls and the warm path\n\n")
	fmt.Fprintf(w, "On a temporary SoftHSM2 token (%s), %s, %s/%s, %d CPUs; `CGO_ENABLED=1 go run -tags pkcs11 ./bench/pkcs11 -seeds %d -calls %d -idle %s -poll %s`.\n\n",
		softHSMVersion(), time.Now().UTC().Format(time.RFC3339), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), o.seeds, o.calls, o.idle, o.poll)
	if err := coldStart(ctx, w, tok, o); err != nil {
		return fmt.Errorf("cold start: %w", err)
	}
	if err := warmPath(ctx, w, tok, dir, o); err != nil {
		return fmt.Errorf("warm path: %w", err)
	}
	if o.idle > 0 {
		if err := idleCalls(ctx, w, tok, dir, o); err != nil {
			return fmt.Errorf("idle: %w", err)
		}
	}
	fmt.Fprintf(w, "Total run time %s.\n", time.Since(t0).Round(time.Second))
	if *out != "" {
		return os.WriteFile(*out, report.Bytes(), 0o644)
	}
	return nil
}

// token is the temporary SoftHSM token.
type token struct {
	label, pinFile string
}

func newToken(dir string) (*token, error) {
	tokens := filepath.Join(dir, "tokens")
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		return nil, err
	}
	os.Setenv("SOFTHSM2_CONF", conf)
	t := &token{label: "bench", pinFile: filepath.Join(dir, "pin")}
	if out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", t.label, "--so-pin", "1234", "--pin", "5678").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("softhsm2-util --init-token (bash hack/apt-install.sh softhsm2 opensc): %v: %s", err, out)
	}
	if err := os.WriteFile(t.pinFile, []byte("5678\n"), 0o600); err != nil {
		return nil, err
	}
	return t, nil
}

func softHSMVersion() string {
	out, err := exec.Command("softhsm2-util", "--version").Output()
	if err != nil {
		return "SoftHSM2"
	}
	return "SoftHSM " + strings.TrimSpace(string(out))
}

// open opens a fresh provider on the token, as a plugin process does.
func (t *token) open(ctx context.Context) (*pkcs11.Provider, error) {
	return pkcs11.New(ctx, pkcs11.Config{Module: softHSMModule, TokenLabel: t.label, PIN: "5678", PINFile: t.pinFile,
		KeyLabel: "kek", Create: true, NodeLocal: true})
}

func coldStart(ctx context.Context, w io.Writer, tok *token, o options) error {
	writerP, err := tok.open(ctx)
	if err != nil {
		return err
	}
	defer writerP.Close()
	writer, err := envelope.New(envelope.Config{Provider: writerP})
	if err != nil {
		return err
	}
	if err := writer.Refresh(ctx); err != nil {
		return err
	}
	seeds := make([][]byte, o.seeds)
	cts := make([]*kmsservice.EncryptResponse, o.seeds)
	for i := range seeds {
		seeds[i] = make([]byte, 32)
		rand.Read(seeds[i])
		if cts[i], err = writer.Encrypt(ctx, "seed", seeds[i]); err != nil {
			return err
		}
	}
	writerEncrypts := writerP.Calls()["C_Encrypt"]

	// A fresh plugin, as after a restart.
	t0 := time.Now()
	readerP, err := tok.open(ctx)
	if err != nil {
		return err
	}
	defer readerP.Close()
	reader, err := envelope.New(envelope.Config{Provider: readerP})
	if err != nil {
		return err
	}
	if err := reader.Refresh(ctx); err != nil {
		return err
	}
	startup := time.Since(t0)
	atStart := readerP.Calls()
	t1 := time.Now()
	for i, c := range cts {
		pt, err := reader.Decrypt(ctx, "seed", &kmsservice.DecryptRequest{Ciphertext: c.Ciphertext, KeyID: c.KeyID, Annotations: c.Annotations})
		if err != nil || !bytes.Equal(pt, seeds[i]) {
			return fmt.Errorf("decrypt seed %d: %v", i, err)
		}
	}
	decryptAll := time.Since(t1)
	after := readerP.Calls()
	unwraps := after["C_Decrypt"] - atStart["C_Decrypt"]

	// The same seeds unwrapped one by one in the HSM (no hierarchy).
	wrapped := make([]provider.WrappedKey, o.seeds)
	for i := range wrapped {
		if wrapped[i], err = writerP.Wrap(ctx, seeds[i]); err != nil {
			return err
		}
	}
	directP, err := tok.open(ctx)
	if err != nil {
		return err
	}
	defer directP.Close()
	t2 := time.Now()
	for i, wk := range wrapped {
		if pt, err := directP.Unwrap(ctx, wk); err != nil || !bytes.Equal(pt, seeds[i]) {
			return fmt.Errorf("direct unwrap %d: %v", i, err)
		}
	}
	direct := time.Since(t2)

	fmt.Fprintf(w, "## 1. kube-apiserver cold start: %d distinct DEK seeds\n\n", o.seeds)
	fmt.Fprintf(w, "A writer plugin encrypted the seeds (%d HSM encrypt: one local KEK wrapped); a fresh plugin (a new provider: its own session, login and listing, empty cache; the module itself stays loaded in this process) starts and decrypts all of them in process, as after a restart.\n\n", writerEncrypts)
	fmt.Fprintf(w, "| | plugin start | decrypt all | HSM unwraps (C_Decrypt) | all HSM calls while decrypting |\n| --- | ---: | ---: | ---: | ---: |\n")
	fmt.Fprintf(w, "| hierarchy (kms-plugin) | %s | **%s** | **%d** | %d (%s) |\n", ms(startup), ms(decryptAll), unwraps,
		after.Total()-atStart.Total(), formatCalls(diff(after, atStart)))
	fmt.Fprintf(w, "| every seed unwrapped in the HSM | | %s | %d | |\n\n", ms(direct), directP.Calls()["C_Decrypt"])
	if unwraps != 1 {
		return fmt.Errorf("the cold start made %d HSM unwraps; want 1", unwraps)
	}
	return nil
}

func diff(a, b pkcs11.Calls) pkcs11.Calls {
	out := pkcs11.Calls{}
	for k, v := range a {
		if d := v - b[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

func formatCalls(c pkcs11.Calls) string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, c[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// noop is the transport floor: fixed answers sized like the plugin's.
type noop struct {
	kmsapi.UnimplementedKeyManagementServiceServer
}

func (noop) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "kp1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, nil
}

func (noop) Decrypt(context.Context, *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	return &kmsapi.DecryptResponse{Plaintext: bytes.Repeat([]byte{0x5e}, 32)}, nil
}

func serveNoop(socket string) (func(), error) {
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	srv := grpc.NewServer()
	kmsapi.RegisterKeyManagementServiceServer(srv, noop{})
	go srv.Serve(lis)
	return srv.Stop, nil
}

// servePlugin runs the shipped assembly on p at socket.
func servePlugin(ctx context.Context, p provider.Provider, socket string, poll time.Duration) (func(), error) {
	pl, err := plugin.New(plugin.Config{Provider: p, Endpoint: "unix://" + socket, PollInterval: poll, Version: "bench"})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pl.Run(ctx) }()
	return func() { cancel(); <-done }, nil
}

type target struct {
	name   string
	client kmsapi.KeyManagementServiceClient
	req    *kmsapi.DecryptRequest
	times  []time.Duration
}

func dial(socket string) (kmsapi.KeyManagementServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("localhost"))
	if err != nil {
		return nil, nil, err
	}
	return kmsapi.NewKeyManagementServiceClient(conn), func() { conn.Close() }, nil
}

// warmRequest waits for the target to answer, then encrypts one seed and
// returns the matching Decrypt request.
func warmRequest(ctx context.Context, c kmsapi.KeyManagementServiceClient, floor bool) (*kmsapi.DecryptRequest, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Status(ctx, &kmsapi.StatusRequest{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(20 * time.Millisecond)
	}
	if floor {
		return &kmsapi.DecryptRequest{Ciphertext: bytes.Repeat([]byte{0xc7}, 61), KeyId: "kp1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Uid: "u"}, nil
	}
	r, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: bytes.Repeat([]byte{1}, 32), Uid: "u"})
	if err != nil {
		return nil, err
	}
	return &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyId, Annotations: r.Annotations, Uid: "u"}, nil
}

func warmPath(ctx context.Context, w io.Writer, tok *token, dir string, o options) error {
	stopNoop, err := serveNoop(filepath.Join(dir, "noop.sock"))
	if err != nil {
		return err
	}
	defer stopNoop()
	hsm, err := tok.open(ctx)
	if err != nil {
		return err
	}
	defer hsm.Close()
	stopHSM, err := servePlugin(ctx, hsm, filepath.Join(dir, "pkcs11.sock"), 0)
	if err != nil {
		return err
	}
	defer stopHSM()
	lp, err := local.New(local.Config{Path: filepath.Join(dir, "keyset.json"), Create: true})
	if err != nil {
		return err
	}
	stopLocal, err := servePlugin(ctx, lp, filepath.Join(dir, "local.sock"), 0)
	if err != nil {
		return err
	}
	defer stopLocal()

	var targets []*target
	for _, n := range []string{"floor", "local", "pkcs11"} {
		c, closeConn, err := dial(filepath.Join(dir, map[string]string{"floor": "noop.sock", "local": "local.sock", "pkcs11": "pkcs11.sock"}[n]))
		if err != nil {
			return err
		}
		defer closeConn()
		req, err := warmRequest(ctx, c, n == "floor")
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		targets = append(targets, &target{name: n, client: c, req: req})
	}
	// Warm up, then measure in rounds of 100 calls per target, the order
	// rotating each round to cancel drift.
	call := func(t *target) error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		_, err := t.client.Decrypt(cctx, t.req)
		return err
	}
	for _, t := range targets {
		for range 500 {
			if err := call(t); err != nil {
				return fmt.Errorf("%s warm-up: %w", t.name, err)
			}
		}
	}
	before := hsm.Calls()
	for round := 0; round*100 < o.calls; round++ {
		for k := range targets {
			t := targets[(k+round)%len(targets)]
			for range 100 {
				s := time.Now()
				if err := call(t); err != nil {
					return fmt.Errorf("%s: %w", t.name, err)
				}
				t.times = append(t.times, time.Since(s))
			}
		}
	}
	warmCalls := diff(hsm.Calls(), before)

	fmt.Fprintf(w, "## 2. Warm Decrypt over the socket: pkcs11 vs local vs the no-op floor\n\n")
	fmt.Fprintf(w, "Sequential Decrypt calls from one gRPC connection per target over a Unix socket, %d per target after 500 warm-up, in rounds of 100 whose order rotates. Floor: a no-op KMS v2 server with fixed answers. local and pkcs11: the shipped assembly (internal/plugin: envelope, server, metrics) on each provider, warm. All three in this one process, so the absolute figures include the client's and the other servers' share of the CPU; compare the ratios.\n\n", o.calls)
	fmt.Fprintf(w, "| target | p50 µs | p90 µs | p99 µs | ratio p50 to floor | ratio p99 to floor |\n| --- | ---: | ---: | ---: | ---: | ---: |\n")
	floor := summarize(targets[0].times)
	for _, t := range targets {
		d := summarize(t.times)
		fmt.Fprintf(w, "| %s | %.1f | %.1f | %.1f | %.2f× | %.2f× |\n", t.name, us(d.p50), us(d.p90), us(d.p99), float64(d.p50)/float64(floor.p50), float64(d.p99)/float64(floor.p99))
	}
	fmt.Fprintf(w, "\nHSM calls made by the pkcs11 plugin during the %d measured warm Decrypts: **%d** (%s).\n\n", len(targets[2].times), warmCalls.Total(), formatCalls(warmCalls))
	if warmCalls["C_Decrypt"] != 0 {
		return errors.New("the warm path called C_Decrypt")
	}
	return nil
}

type dist struct{ p50, p90, p99 time.Duration }

func summarize(s []time.Duration) dist {
	s = slices.Clone(s)
	slices.Sort(s)
	at := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return dist{at(0.50), at(0.90), at(0.99)}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func idleCalls(ctx context.Context, w io.Writer, tok *token, dir string, o options) error {
	p, err := tok.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	socket := filepath.Join(dir, "idle.sock")
	stop, err := servePlugin(ctx, p, socket, o.poll)
	if err != nil {
		return err
	}
	defer stop()
	c, closeConn, err := dial(socket)
	if err != nil {
		return err
	}
	defer closeConn()
	if _, err := warmRequest(ctx, c, false); err != nil {
		return err
	}
	vs, err := p.Versions(ctx)
	if err != nil {
		return err
	}
	// The window starts just after a poll and ends just after the k-th
	// poll after it, so it holds exactly k polls; kube-apiserver asks
	// Status every 20 s meanwhile (health loop and /readyz), which never
	// reaches the HSM.
	listings := func() uint64 { return p.Calls()["C_FindObjectsInit"] }
	settle := 300 * time.Millisecond // a poll's listing takes well under this
	k := max(1, int(o.idle/o.poll))
	l0 := listings()
	for listings() == l0 {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(settle)
	before := p.Calls()
	t0 := time.Now()
	target := listings() + uint64(k)
	statuses := 0
	var lastStatus time.Time
	for listings() < target {
		if time.Since(lastStatus) >= 20*time.Second {
			if _, err := c.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
				return err
			}
			statuses++
			lastStatus = time.Now()
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(settle)
	window := time.Since(t0)
	calls := diff(p.Calls(), before)
	polls := k
	perPoll := float64(calls.Total()) / float64(polls)
	perHour := float64(calls.Total()) * float64(time.Hour) / float64(window)

	fmt.Fprintf(w, "## 3. HSM calls per node-hour at idle\n\n")
	fmt.Fprintf(w, "The plugin on the pkcs11 provider (one key version: %d), poll interval %s, left idle for %d polls (%s, from just after one poll to just after %d more), except for %d Status calls (one every 20 s, as kube-apiserver's health loop and cached /readyz make them).\n\n", len(vs), o.poll, polls, window.Round(time.Second), polls, statuses)
	fmt.Fprintf(w, "Counted: **%d** calls into the module in the window (%s): %.1f per poll (one listing: C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal, one C_GetAttributeValue per version; the revocation check after each poll reuses it).\n\n", calls.Total(), formatCalls(calls), perPoll)
	fmt.Fprintf(w, "Per node-hour: %d calls × (1 h / %s) = **%.0f calls per node-hour**; the same from the poll: %.1f calls × (1 h / %s = %.0f polls) = %.0f. Status calls add none; no unwrap, no encrypt, no login at idle. With N versions on the token a poll costs 3 + N calls.\n\n",
		calls.Total(), window.Round(time.Second), perHour, perPoll, o.poll, float64(time.Hour)/float64(o.poll), perPoll*float64(time.Hour)/float64(o.poll))
	return nil
}
