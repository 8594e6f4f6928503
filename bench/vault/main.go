// Command vault measures what the vault provider costs Vault, against a
// real Vault core (e2e/tools/vault-server, $KMS_VAULT_SERVER_BIN), side by
// side with the design of the existing transit plugins ("peer"): one
// transit call per Encrypt, per Decrypt and per Status.
//
//  1. Vault calls per node-hour at idle: the plugin (envelope hierarchy +
//     vault provider, default 60 s poll, a token of 1 h TTL renewed by the
//     LifetimeWatcher) and the peer (kube-apiserver's Status once a minute),
//     over one hour compressed by -scale. Every request that reaches Vault
//     is counted by a transport in front of the client.
//
//  2. kube-apiserver cold start: -seeds distinct DEK seeds encrypted, then
//     a fresh plugin (empty cache) decrypting all of them; the peer
//     decrypts each in Vault.
//
//  3. Steady writes: -seeds Encrypts with a warm plugin.
//
//     go run ./bench/vault [-scale 600] [-seeds 1000] [-out FILE]
package main

import (
	"context"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault/vaulttest"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "bench/vault: %v\n", err)
		os.Exit(1)
	}
}

type result struct {
	idleOurs, idlePeer           float64 // calls per node-hour
	idleOursRenew                float64 // of idleOurs: token renewals and logins
	coldOurs, coldPeer           int     // Vault calls for -seeds cold decrypts
	coldOursTime, coldPeerTime   time.Duration
	writesOurs, writesPeer       int
	writesOursTime, writePeerTim time.Duration
}

func run(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("bench/vault", flag.ContinueOnError)
	scale := fs.Float64("scale", 600, "compress the idle hour by this factor (poll interval, Status schedule and token TTL divided by it)")
	seeds := fs.Int("seeds", 1000, "DEK seeds for the cold start and steady writes")
	out := fs.String("out", "", "also write the report (markdown) to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	bin := os.Getenv(vaulttest.EnvBinary)
	if bin == "" {
		return fmt.Errorf("%s is not set (make bench builds it: bash e2e/tools/build.sh vault-server)", vaulttest.EnvBinary)
	}
	dir, err := os.MkdirTemp("", "bench-vault-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := vaulttest.Start(bin, dir, vaulttest.Options{})
	if err != nil {
		return err
	}
	defer srv.Stop()
	ctx := context.Background()
	if err := srv.Setup(ctx, "transit", "kek", nil); err != nil {
		return err
	}
	root, err := srv.Client(srv.RootToken)
	if err != nil {
		return err
	}
	if err := root.Sys().PutPolicyWithContext(ctx, "kms-plugin", vaulttest.PolicyFor("transit", "kek")); err != nil {
		return err
	}
	var r result
	hour := time.Duration(float64(time.Hour) / *scale)
	ttl := max(time.Duration(float64(time.Hour) / *scale), 2*time.Second)

	// 1. Idle hour.
	oursCalls, oursAuth, err := idleOurs(ctx, srv, dir, hour, ttl, *scale)
	if err != nil {
		return fmt.Errorf("idle, plugin: %w", err)
	}
	peerCalls, err := idlePeer(ctx, srv, hour, *scale)
	if err != nil {
		return fmt.Errorf("idle, peer: %w", err)
	}
	hours := float64(hour) / float64(time.Hour) * *scale // 1, give or take the timer
	r.idleOurs, r.idleOursRenew, r.idlePeer = float64(oursCalls)/hours, float64(oursAuth)/hours, float64(peerCalls)/hours

	// 2 and 3. Writes, then a cold start.
	if err := coldAndWrites(ctx, srv, dir, *seeds, &r); err != nil {
		return err
	}

	report := render(r, *scale, *seeds)
	fmt.Fprint(stdout, report)
	if *out != "" {
		return os.WriteFile(*out, []byte(report), 0o644)
	}
	return nil
}

// counting is an http.RoundTripper counting requests by path.
type counting struct {
	next http.RoundTripper
	mu   sync.Mutex
	n    map[string]int
}

func (c *counting) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.n[strings.TrimPrefix(r.URL.Path, "/v1/")]++
	c.mu.Unlock()
	return c.next.RoundTrip(r)
}

func (c *counting) total() (all, auth int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, n := range c.n {
		all += n
		if strings.HasPrefix(p, "auth/") {
			auth += n
		}
	}
	return all, auth
}

func newProvider(srv *vaulttest.Server, dir, token string) (*vault.Provider, *counting, error) {
	tokenFile := dir + "/token-" + fmt.Sprint(time.Now().UnixNano())
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		return nil, nil, err
	}
	s := &vault.Settings{Address: srv.Addr, KeyName: "kek", Auth: vault.AuthSettings{Method: vault.AuthToken, TokenFile: tokenFile}}
	base, err := s.NewClient(nil)
	if err != nil {
		return nil, nil, err
	}
	cnt := &counting{next: base.CloneConfig().HttpClient.Transport, n: map[string]int{}}
	c, err := s.NewClient(&http.Client{Transport: cnt})
	if err != nil {
		return nil, nil, err
	}
	p, err := vault.New(vault.Config{Client: c, KeyName: "kek", Auth: s.Method()})
	return p, cnt, err
}

// idleOurs runs the plugin's key hierarchy for one compressed hour with
// kube-apiserver asking Status once a (compressed) minute.
func idleOurs(ctx context.Context, srv *vaulttest.Server, dir string, hour, ttl time.Duration, scale float64) (calls, auth int, err error) {
	token, err := srv.Token(ctx, []string{"kms-plugin"}, ttl, 0, true)
	if err != nil {
		return 0, 0, err
	}
	p, cnt, err := newProvider(srv, dir, token)
	if err != nil {
		return 0, 0, err
	}
	defer p.Close()
	minute := time.Duration(float64(time.Minute) / scale)
	svc, err := envelope.New(envelope.Config{Provider: p, PollInterval: minute})
	if err != nil {
		return 0, 0, err
	}
	if err := svc.Refresh(ctx); err != nil {
		return 0, 0, err
	}
	c0, a0 := cnt.total()
	rctx, cancel := context.WithTimeout(ctx, hour)
	defer cancel()
	go func() { _ = svc.Run(rctx) }()
	tick := time.NewTicker(minute)
	defer tick.Stop()
	for {
		select {
		case <-rctx.Done():
			c1, a1 := cnt.total()
			return c1 - c0, a1 - a0, nil
		case <-tick.C:
			if _, err := svc.Status(ctx); err != nil {
				return 0, 0, fmt.Errorf("status: %w", err)
			}
		}
	}
}

// peer is the design of the existing transit plugins: every operation is
// one transit call.
type peer struct {
	c   *api.Client
	cnt *counting
}

func newPeer(srv *vaulttest.Server, token string) (*peer, error) {
	c, err := srv.Client(token)
	if err != nil {
		return nil, err
	}
	cnt := &counting{next: c.CloneConfig().HttpClient.Transport, n: map[string]int{}}
	cfg := c.CloneConfig()
	cfg.HttpClient = &http.Client{Transport: cnt}
	c2, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c2.SetToken(token)
	return &peer{c: c2, cnt: cnt}, nil
}

func (p *peer) encrypt(ctx context.Context, plain []byte) (string, error) {
	s, err := p.c.Logical().WriteWithContext(ctx, "transit/encrypt/kek", map[string]any{"plaintext": base64.StdEncoding.EncodeToString(plain)})
	if err != nil {
		return "", err
	}
	return s.Data["ciphertext"].(string), nil
}

func (p *peer) decrypt(ctx context.Context, ct string) error {
	_, err := p.c.Logical().WriteWithContext(ctx, "transit/decrypt/kek", map[string]any{"ciphertext": ct})
	return err
}

// status is the peers' health check: a round trip through transit.
func (p *peer) status(ctx context.Context) error {
	ct, err := p.encrypt(ctx, []byte("health"))
	if err != nil {
		return err
	}
	return p.decrypt(ctx, ct)
}

func idlePeer(ctx context.Context, srv *vaulttest.Server, hour time.Duration, scale float64) (int, error) {
	p, err := newPeer(srv, srv.RootToken)
	if err != nil {
		return 0, err
	}
	minute := time.Duration(float64(time.Minute) / scale)
	deadline := time.Now().Add(hour)
	for time.Now().Before(deadline) {
		if err := p.status(ctx); err != nil {
			return 0, err
		}
		time.Sleep(minute)
	}
	n, _ := p.cnt.total()
	return n, nil
}

func coldAndWrites(ctx context.Context, srv *vaulttest.Server, dir string, seeds int, r *result) error {
	token, err := srv.Token(ctx, []string{"kms-plugin"}, time.Hour, 0, true)
	if err != nil {
		return err
	}
	// Ours: warm plugin encrypts the seeds.
	p, cnt, err := newProvider(srv, dir, token)
	if err != nil {
		return err
	}
	defer p.Close()
	svc, err := envelope.New(envelope.Config{Provider: p, PollInterval: time.Hour})
	if err != nil {
		return err
	}
	if err := svc.Refresh(ctx); err != nil {
		return err
	}
	c0, _ := cnt.total()
	start := time.Now()
	encs := make([]*kmsservice.EncryptResponse, seeds)
	for i := range encs {
		if encs[i], err = svc.Encrypt(ctx, "w", seed(i)); err != nil {
			return err
		}
	}
	r.writesOursTime = time.Since(start)
	c1, _ := cnt.total()
	r.writesOurs = c1 - c0

	// A fresh plugin (restarted node): every seed decrypted once.
	p2, cnt2, err := newProvider(srv, dir, token)
	if err != nil {
		return err
	}
	defer p2.Close()
	svc2, err := envelope.New(envelope.Config{Provider: p2, PollInterval: time.Hour})
	if err != nil {
		return err
	}
	if err := svc2.Refresh(ctx); err != nil {
		return err
	}
	d0, _ := cnt2.total()
	start = time.Now()
	for i, e := range encs {
		got, err := svc2.Decrypt(ctx, "r", &kmsservice.DecryptRequest{Ciphertext: e.Ciphertext, KeyID: e.KeyID, Annotations: e.Annotations})
		if err != nil {
			return err
		}
		if string(got) != string(seed(i)) {
			return fmt.Errorf("seed %d decrypted wrong", i)
		}
	}
	r.coldOursTime = time.Since(start)
	d1, _ := cnt2.total()
	r.coldOurs = d1 - d0

	// Peer: each seed encrypted and decrypted in Vault.
	pe, err := newPeer(srv, token)
	if err != nil {
		return err
	}
	cts := make([]string, seeds)
	start = time.Now()
	for i := range cts {
		if cts[i], err = pe.encrypt(ctx, seed(i)); err != nil {
			return err
		}
	}
	r.writePeerTim = time.Since(start)
	r.writesPeer, _ = pe.cnt.total()
	start = time.Now()
	for _, ct := range cts {
		if err := pe.decrypt(ctx, ct); err != nil {
			return err
		}
	}
	r.coldPeerTime = time.Since(start)
	all, _ := pe.cnt.total()
	r.coldPeer = all - r.writesPeer
	return nil
}

func calls(n int) string {
	if n == 1 {
		return "1 call"
	}
	return fmt.Sprintf("%d calls", n)
}

func seed(i int) []byte { return []byte(fmt.Sprintf("dek-seed-%06d-0123456789abcdef", i)) }

func render(r result, scale float64, seeds int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Vault transit provider: Vault calls\n\n")
	fmt.Fprintf(&b, "`go run ./bench/vault -scale %g -seeds %d` against a real Vault v1.21.4 core on loopback (e2e/tools/vault-server), %s. ", scale, seeds, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Every request reaching Vault is counted by a transport in front of the client. Peer: the design of the existing transit plugins, one transit call per Encrypt, per Decrypt, and a transit round trip per Status.\n\n")
	fmt.Fprintf(&b, "| measure | kms-plugin (vault provider) | peer design |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| Vault calls per node-hour at idle (Status once a minute, 60 s poll, 1 h token) | %.0f (%.0f of them token renewals and logins) | %.0f |\n", r.idleOurs, r.idleOursRenew, r.idlePeer)
	fmt.Fprintf(&b, "| %d Encrypts (new DEK seeds), warm | %s, %s | %s, %s |\n", seeds, calls(r.writesOurs), r.writesOursTime.Round(time.Millisecond), calls(r.writesPeer), r.writePeerTim.Round(time.Millisecond))
	fmt.Fprintf(&b, "| cold start: %d seeds decrypted by a fresh plugin | %s, %s | %s, %s |\n", seeds, calls(r.coldOurs), r.coldOursTime.Round(time.Millisecond), calls(r.coldPeer), r.coldPeerTime.Round(time.Millisecond))
	fmt.Fprintf(&b, "\nThe idle hour is compressed %gx (poll, Status schedule and token TTL divided by %g); each counted call is tied to a scheduled event, so the counts are per real hour. ", scale, scale)
	fmt.Fprintf(&b, "The plugin's idle calls are its poll (one read of the key per minute: it follows rotations, auto_rotate_period included, and revocations) and the token's renewals; Status never reaches Vault. ")
	fmt.Fprintf(&b, "Its cold start costs one decrypt per local KEK, not per seed: here one local KEK wrapped every seed.\n")
	return b.String()
}
