package azurekv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

func TestConformance(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts kvtest.Options
		kty  string
		edit func(*Config)
	}{
		{"KeyVaultRSA", kvtest.Options{}, kvtest.KeyTypeRSA, nil},
		{"KeyVaultRSAWrapInVault", kvtest.Options{}, kvtest.KeyTypeRSA, func(c *Config) { c.WrapInVault = true }},
		{"ManagedHSMRSA", kvtest.Options{ManagedHSM: true}, kvtest.KeyTypeRSAHSM, nil},
		{"ManagedHSMOctHSM", kvtest.Options{ManagedHSM: true}, kvtest.KeyTypeOctHSM, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, tt.opts)
			var n atomic.Int64
			providertest.Run(t, func(t *testing.T) provider.Provider {
				return newTestProvider(t, srv, fmt.Sprintf("conformance-%d", n.Add(1)), tt.kty, tt.edit)
			})
		})
	}
}

// TestWrapCalls checks which wraps reach the vault: none for RSA keys by
// default, one wrapkey per Wrap with WrapInVault and for oct-HSM keys.
func TestWrapCalls(t *testing.T) {
	for _, tt := range []struct {
		name       string
		opts       kvtest.Options
		kty        string
		edit       func(*Config)
		wantWraps  int64
		wantScheme byte
	}{
		{"rsa local", kvtest.Options{}, kvtest.KeyTypeRSA, nil, 0, schemeRSAOAEP256},
		{"rsa in vault", kvtest.Options{}, kvtest.KeyTypeRSA, func(c *Config) { c.WrapInVault = true }, 3, schemeRSAOAEP256},
		{"oct-HSM", kvtest.Options{ManagedHSM: true}, kvtest.KeyTypeOctHSM, nil, 3, schemeA256KW},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, tt.opts)
			p := newTestProvider(t, srv, "wrapcalls", tt.kty, tt.edit)
			ctx := context.Background()
			if _, err := p.CurrentVersion(ctx); err != nil {
				t.Fatal(err)
			}
			before := srv.Calls("wrapkey")
			for range 3 {
				w, err := p.Wrap(ctx, bytes.Repeat([]byte{7}, 32))
				if err != nil {
					t.Fatal(err)
				}
				if w.Ciphertext[0] != tt.wantScheme {
					t.Fatalf("scheme byte = %#x; want %#x", w.Ciphertext[0], tt.wantScheme)
				}
			}
			if got := srv.Calls("wrapkey") - before; got != tt.wantWraps {
				t.Fatalf("wrapkey calls = %d; want %d", got, tt.wantWraps)
			}
		})
	}
}

func TestCurrentVersionIsOneGet(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "onecall", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	if _, err := p.CurrentVersion(ctx); err != nil { // challenge + token
		t.Fatal(err)
	}
	srv.ResetCalls()
	for range 10 {
		if _, err := p.CurrentVersion(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := srv.VaultCalls(); got != 10 {
		t.Fatalf("10 polls made %d vault calls (%v); want 10", got, srv.AllCalls())
	}
	if got := srv.Calls("token"); got != 0 {
		t.Fatalf("polls asked for %d new tokens; want 0 (cached)", got)
	}
}

func TestRotationNewVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "rotating", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	v1, err := p.CurrentVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	key := bytes.Repeat([]byte{1}, 32)
	w1, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	kid2, err := srv.NewVersion("rotating") // by hand or by a rotation policy
	if err != nil {
		t.Fatal(err)
	}
	v2, err := p.CurrentVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v2 != kid2 || v2 == v1 {
		t.Fatalf("after a new version CurrentVersion = %q; want %q (was %q)", v2, kid2, v1)
	}
	if envelope.DeriveKeyID(Name, v1) == envelope.DeriveKeyID(Name, v2) {
		t.Fatalf("new version kept the key_id")
	}
	w2, err := p.Wrap(ctx, key)
	if err != nil || w2.Version != v2 {
		t.Fatalf("Wrap after rotation = %q, %v; want version %q", w2.Version, err, v2)
	}
	for _, w := range []provider.WrappedKey{w1, w2} {
		if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap(%s) = %v", w.Version, err)
		}
	}
	// Disabling the old version makes its data unreadable, clearly.
	if err := srv.SetEnabled("rotating", lastSegment(v1), false); err != nil {
		t.Fatal(err)
	}
	_, err = p.Unwrap(ctx, w1)
	if !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap with a disabled version = %v; want ErrKeyDisabled", err)
	}
	if r := Remedy(err); !strings.Contains(r, "set-attributes") {
		t.Fatalf("Remedy(%v) = %q; want the enable command", err, r)
	}
}

func lastSegment(kid string) string { return kid[strings.LastIndex(kid, "/")+1:] }

func TestBackwardsVersion(t *testing.T) {
	for _, forbidden := range []bool{false, true} {
		t.Run(fmt.Sprintf("disabledGetForbidden=%v", forbidden), func(t *testing.T) {
			srv := startServer(t, kvtest.Options{DisabledGetForbidden: forbidden, PageSize: 2})
			p := newTestProvider(t, srv, "backwards", kvtest.KeyTypeRSA, nil)
			other := newTestProvider(t, srv, "backwards", "", nil) // a second node
			ctx := context.Background()
			seen := map[string]string{} // key_id -> version string
			current := func(want string) string {
				t.Helper()
				v, err := p.CurrentVersion(ctx)
				if err != nil {
					t.Fatalf("CurrentVersion: %v", err)
				}
				if vo, err := other.CurrentVersion(ctx); err != nil || vo != v {
					t.Fatalf("another node sees %q, %v; this one %q", vo, err, v)
				}
				if want != "" && v != want {
					t.Fatalf("CurrentVersion = %q; want %q", v, want)
				}
				id := envelope.DeriveKeyID(Name, v)
				if prev, ok := seen[id]; ok && prev != v {
					t.Fatalf("key_id of %q reused for %q", prev, v)
				}
				seen[id] = v
				// The version string unwraps what it wraps.
				w, err := p.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
				if err != nil || w.Version != v {
					t.Fatalf("Wrap = %q, %v; want version %q", w.Version, err, v)
				}
				if _, err := other.Unwrap(ctx, w); err != nil {
					t.Fatalf("Unwrap(%q) on another node: %v", v, err)
				}
				return v
			}
			kid1, _ := srv.KeyID("backwards", "")
			v1 := current(kid1)
			kid2, _ := srv.NewVersion("backwards")
			current(kid2)
			id2 := lastSegment(kid2)

			// Newest disabled: back to v1, under a key_id v1 never had.
			if err := srv.SetEnabled("backwards", id2, false); err != nil {
				t.Fatal(err)
			}
			back := current(kid1 + "#after=" + id2)
			if envelope.DeriveKeyID(Name, back) == envelope.DeriveKeyID(Name, v1) {
				t.Fatal("going back reused the old key_id")
			}
			// Steady state while backwards: a GET and a listing per poll,
			// no second GET.
			srv.ResetCalls()
			if v, err := p.CurrentVersion(ctx); err != nil || v != back {
				t.Fatalf("CurrentVersion = %q, %v; want %q", v, err, back)
			}
			if srv.Calls("get") != 1 || srv.Calls("list") != 1 || srv.VaultCalls() != 2 {
				t.Fatalf("a backwards poll made %v calls; want 1 get and 1 list", srv.AllCalls())
			}

			// A newer version disabled too: v1 again, under yet another key_id.
			kid3, _ := srv.NewVersion("backwards")
			current(kid3)
			if err := srv.SetEnabled("backwards", lastSegment(kid3), false); err != nil {
				t.Fatal(err)
			}
			current(kid1 + "#after=" + lastSegment(kid3))

			// Re-enabled v2 is the newest enabled one; v3 is still newest.
			if err := srv.SetEnabled("backwards", id2, true); err != nil {
				t.Fatal(err)
			}
			current(kid2 + "#after=" + lastSegment(kid3))

			// Nothing enabled: a clear error.
			for _, id := range srv.VersionIDs("backwards") {
				if err := srv.SetEnabled("backwards", id, false); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := p.CurrentVersion(ctx); !errors.Is(err, provider.ErrKeyDisabled) || !strings.Contains(err.Error(), "no version of key backwards is enabled") {
				t.Fatalf("CurrentVersion with every version disabled = %v; want ErrKeyDisabled", err)
			}
		})
	}
}

func TestExpiredNewestVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	p := newTestProvider(t, srv, "expiring", kvtest.KeyTypeRSA, func(c *Config) { c.Now = clock.Now })
	kid1, _ := srv.KeyID("expiring", "")
	ctx := context.Background()
	kid2, _ := srv.NewVersion("expiring")
	// v2 expires: set exp through the REST API, as an operator would.
	if _, err := p.client.UpdateKey(ctx, "expiring", lastSegment(kid2), updateExpires(clock.Now().Add(time.Hour)), nil); err != nil {
		t.Fatal(err)
	}
	if v, err := p.CurrentVersion(ctx); err != nil || v != kid2 {
		t.Fatalf("CurrentVersion = %q, %v; want %q", v, err, kid2)
	}
	clock.Add(2 * time.Hour)
	if v, err := p.CurrentVersion(ctx); err != nil || v != kid1+"#after="+lastSegment(kid2) {
		t.Fatalf("CurrentVersion after the newest expired = %q, %v; want %q", v, err, kid1+"#after="+lastSegment(kid2))
	}
}

func TestPinnedVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	kid1, err := srv.CreateKey("pinned", kvtest.KeyTypeRSA, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.NewVersion("pinned"); err != nil {
		t.Fatal(err)
	}
	p := newTestProvider(t, srv, "pinned", "", func(c *Config) { c.KeyVersion = lastSegment(kid1) })
	ctx := context.Background()
	if v, err := p.CurrentVersion(ctx); err != nil || v != kid1 {
		t.Fatalf("CurrentVersion = %q, %v; want the pinned %q", v, err, kid1)
	}
	if _, err := p.Rotate(ctx); err == nil || !strings.Contains(err.Error(), "pinned") {
		t.Fatalf("Rotate with a pinned version = %v; want an error", err)
	}
	if err := srv.SetEnabled("pinned", lastSegment(kid1), false); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CurrentVersion(ctx); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("CurrentVersion of a disabled pinned version = %v; want ErrKeyDisabled", err)
	}
}

func TestThrottlingAndServerErrors(t *testing.T) {
	for _, tt := range []struct {
		name        string
		inject      func(*kvtest.Server)
		wantErr     error
		wantCalls   int64
		minDuration time.Duration
		maxDuration time.Duration
	}{
		{"429 twice with retry-after-ms", func(s *kvtest.Server) { s.Throttle(2, 300*time.Millisecond) }, nil, 3, 600 * time.Millisecond, 5 * time.Second},
		{"429 with Retry-After seconds", func(s *kvtest.Server) { s.Throttle(1, time.Second) }, nil, 2, time.Second, 5 * time.Second},
		{"429 storm is bounded", func(s *kvtest.Server) { s.Throttle(-1, 50*time.Millisecond) }, provider.ErrUnavailable, 4, 150 * time.Millisecond, 5 * time.Second},
		{"Retry-After beyond the cap is not retried", func(s *kvtest.Server) { s.Throttle(1, 30*time.Second) }, provider.ErrUnavailable, 1, 0, time.Second},
		{"503 twice", func(s *kvtest.Server) { s.Fail(2, 503) }, nil, 3, 0, 5 * time.Second},
		{"500 until cleared", func(s *kvtest.Server) { s.Fail(-1, 500) }, provider.ErrUnavailable, 4, 0, 5 * time.Second},
		{"403 is not retried", func(s *kvtest.Server) { s.Fail(1, 403) }, provider.ErrPermissionDenied, 1, 0, time.Second},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, kvtest.Options{})
			p := newTestProvider(t, srv, "throttled", kvtest.KeyTypeRSA, nil)
			ctx := context.Background()
			if _, err := p.CurrentVersion(ctx); err != nil {
				t.Fatal(err)
			}
			tt.inject(srv)
			srv.ResetCalls()
			start := time.Now()
			_, err := p.CurrentVersion(ctx)
			elapsed := time.Since(start)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("CurrentVersion = %v; want %v", err, tt.wantErr)
			}
			if got := srv.Calls("get"); got != tt.wantCalls {
				t.Fatalf("vault saw %d attempts; want %d", got, tt.wantCalls)
			}
			if elapsed < tt.minDuration || elapsed > tt.maxDuration {
				t.Fatalf("took %s; want between %s and %s", elapsed, tt.minDuration, tt.maxDuration)
			}
		})
	}
}

func TestCircuitBreaker(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	p := newTestProvider(t, srv, "breaker", kvtest.KeyTypeRSA, func(c *Config) {
		c.Now, c.FailureThreshold, c.OpenDuration, c.MaxRetries = clock.Now, 3, time.Minute, 1
	})
	ctx := context.Background()
	v, err := p.CurrentVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w, err := p.Wrap(ctx, []byte("a local KEK of thirty-two bytes!"))
	if err != nil {
		t.Fatal(err)
	}
	srv.SetOutage(true)
	for i := range 3 {
		if _, err := p.CurrentVersion(ctx); !errors.Is(err, provider.ErrUnavailable) || errors.Is(err, errCircuitOpen) {
			t.Fatalf("call %d during the outage = %v; want ErrUnavailable from the vault", i, err)
		}
	}
	// Open: calls fail fast without reaching the vault.
	before := srv.VaultCalls()
	start := time.Now()
	for range 20 {
		_, err := p.Unwrap(ctx, w)
		if !errors.Is(err, provider.ErrUnavailable) || !errors.Is(err, errCircuitOpen) {
			t.Fatalf("Unwrap with an open circuit = %v; want a fast ErrUnavailable", err)
		}
	}
	if got := srv.VaultCalls() - before; got != 0 {
		t.Fatalf("an open circuit let %d calls through", got)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("20 failing-fast calls took %s", d)
	}
	// Half-open after the cool-down: one probe, which fails and reopens.
	clock.Add(time.Minute)
	if _, err := p.CurrentVersion(ctx); errors.Is(err, errCircuitOpen) || !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("probe = %v; want a real attempt", err)
	}
	if got := srv.VaultCalls() - before; got != 2 {
		t.Fatalf("probe made %d attempts; want 2 (MaxRetries 1)", got)
	}
	if _, err := p.CurrentVersion(ctx); !errors.Is(err, errCircuitOpen) {
		t.Fatalf("after a failed probe = %v; want the circuit open again", err)
	}
	// The vault is back: the next probe closes the circuit.
	srv.SetOutage(false)
	clock.Add(time.Minute)
	if got, err := p.CurrentVersion(ctx); err != nil || got != v {
		t.Fatalf("after recovery CurrentVersion = %q, %v", got, err)
	}
	if _, err := p.Unwrap(ctx, w); err != nil {
		t.Fatalf("Unwrap after recovery: %v", err)
	}
	if r := Remedy(fmt.Errorf("x: %w", errCircuitOpen)); !strings.Contains(r, "paused") {
		t.Fatalf("Remedy for an open circuit = %q", r)
	}
}

func TestBreakerHalfOpenAllowsOneProbe(t *testing.T) {
	b := newBreaker(1, time.Second)
	now := time.Now()
	probe, err := b.allow(now)
	if err != nil || probe {
		t.Fatalf("closed breaker: allow = %v, %v", probe, err)
	}
	b.done(now, probe, failure, errors.New("boom"))
	if _, err := b.allow(now); !errors.Is(err, errCircuitOpen) {
		t.Fatalf("open breaker allowed a call: %v", err)
	}
	later := now.Add(time.Second)
	var wg sync.WaitGroup
	var allowed atomic.Int64
	for range 10 {
		wg.Go(func() {
			if _, err := b.allow(later); err == nil {
				allowed.Add(1)
			}
		})
	}
	wg.Wait()
	if allowed.Load() != 1 {
		t.Fatalf("half-open breaker let %d calls through; want 1", allowed.Load())
	}
	b.done(later, true, neutral, nil) // the probe's caller gave up
	if probe, err := b.allow(later); err != nil || !probe {
		t.Fatalf("after a neutral probe: allow = %v, %v; want another probe", probe, err)
	}
	b.done(later, true, success, nil)
	if b.isOpen() {
		t.Fatal("breaker still open after a successful probe")
	}
}

func TestPermissionDenied(t *testing.T) {
	for _, tt := range []struct {
		name       string
		opts       kvtest.Options
		keep       []kvtest.Permission
		call       func(*Provider, provider.WrappedKey) error
		op         string
		permission string
		action     string
		remedy     string
	}{
		{
			name: "access policy without unwrapKey", keep: []kvtest.Permission{kvtest.PermGet, kvtest.PermWrapKey},
			call: func(p *Provider, w provider.WrappedKey) error {
				_, err := p.Unwrap(context.Background(), w)
				return err
			},
			op: "unwrapKey", permission: "keys/unwrapKey", action: "Microsoft.KeyVault/vaults/keys/unwrap/action",
			remedy: "--key-permissions get wrapKey unwrapKey",
		},
		{
			name: "RBAC without read", opts: kvtest.Options{RBAC: true}, keep: []kvtest.Permission{kvtest.PermWrapKey, kvtest.PermUnwrapKey},
			call: func(p *Provider, _ provider.WrappedKey) error {
				_, err := p.CurrentVersion(context.Background())
				return err
			},
			op: "get", permission: "keys/get", action: "Microsoft.KeyVault/vaults/keys/read",
			remedy: "Key Vault Crypto Service Encryption User",
		},
		{
			name: "Managed HSM without unwrap", opts: kvtest.Options{ManagedHSM: true, RBAC: true}, keep: []kvtest.Permission{kvtest.PermGet},
			call: func(p *Provider, w provider.WrappedKey) error {
				_, err := p.Unwrap(context.Background(), w)
				return err
			},
			op: "unwrapKey", permission: "keys/unwrapKey", action: "Microsoft.KeyVault/managedHsm/keys/unwrap/action",
			remedy: "Managed HSM Crypto User",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, tt.opts)
			clock := clocktest.New(time.Now())
			if _, err := srv.CreateKey("denied", kvtest.KeyTypeRSA, 0); err != nil {
				t.Fatal(err)
			}
			cred, clientID := secretCredential(t, srv)
			cfg := testConfig(srv, cred, "denied")
			cfg.Now = clock.Now
			p, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			w, err := p.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
			if err != nil {
				t.Fatal(err)
			}
			srv.SetPermissions(kvtest.App(clientID), tt.keep...)
			err = tt.call(p, w)
			var e *Error
			if !errors.Is(err, provider.ErrPermissionDenied) || !errors.As(err, &e) {
				t.Fatalf("call without permission = %v; want ErrPermissionDenied", err)
			}
			if e.Op != tt.op || e.Permission != tt.permission || e.RBACAction != tt.action || e.Status != 403 {
				t.Fatalf("error = %+v; want op %s, permission %s, action %s", e, tt.op, tt.permission, tt.action)
			}
			if !strings.Contains(err.Error(), tt.permission) {
				t.Fatalf("message %q does not name %s", err, tt.permission)
			}
			if r := Remedy(err); !strings.Contains(r, tt.remedy) {
				t.Fatalf("Remedy = %q; want it to mention %q", r, tt.remedy)
			}
			// Not hot-looped: the denial is remembered.
			before := srv.VaultCalls()
			for range 5 {
				if err := tt.call(p, w); !errors.Is(err, provider.ErrPermissionDenied) || !strings.Contains(err.Error(), "remembered") {
					t.Fatalf("repeated call = %v; want the remembered denial", err)
				}
			}
			if got := srv.VaultCalls() - before; got != 0 {
				t.Fatalf("repeated denied calls reached the vault %d times", got)
			}
			// Granted, and after the back-off, it works again.
			srv.SetPermissions(kvtest.App(clientID), kvtest.AllPermissions()...)
			clock.Add(DefaultDeniedBackoff)
			if err := tt.call(p, w); err != nil {
				t.Fatalf("after granting: %v", err)
			}
		})
	}
}

func TestUnauthorized(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("k", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	cred := &staticCredential{token: "not-a-token-of-this-tenant"}
	cfg := testConfig(srv, nil, "k")
	cfg.Credential = cred
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.CurrentVersion(context.Background())
	var e *Error
	if !errors.Is(err, provider.ErrPermissionDenied) || !errors.As(err, &e) || e.Status != 401 {
		t.Fatalf("CurrentVersion with a bad token = %v; want a 401 ErrPermissionDenied", err)
	}
	if strings.Contains(err.Error(), cred.token) {
		t.Fatalf("error %q contains the token", err)
	}
	if r := Remedy(err); !strings.Contains(r, "tenant") {
		t.Fatalf("Remedy = %q; want a hint about the tenant", r)
	}
}

func TestNotFound(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "present", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	kid, _ := srv.KeyID("present", "")
	w, err := p.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	missing := newTestProvider(t, srv, "absent", "", nil)
	_, err = missing.CurrentVersion(ctx)
	if !errors.Is(err, provider.ErrKeyNotFound) || !strings.Contains(Remedy(err), "azure.keyName") {
		t.Fatalf("CurrentVersion of a missing key = %v (%s); want ErrKeyNotFound", err, Remedy(err))
	}
	for _, tt := range []struct {
		name    string
		version string
		remote  bool
	}{
		{"unknown version", strings.TrimSuffix(kid, lastSegment(kid)) + "0123456789abcdef0123456789abcdef", true},
		{"other vault", strings.Replace(kid, srv.VaultHost(), "other.vault.azure.net", 1), false},
		{"http scheme", strings.Replace(kid, "https://", "http://", 1), false},
		{"versionless", strings.TrimSuffix(kid, "/"+lastSegment(kid)), false},
		{"not a URL", "3f2a", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			start := srv.VaultCalls()
			_, err := p.Unwrap(ctx, provider.WrappedKey{Version: tt.version, Ciphertext: w.Ciphertext})
			if !errors.Is(err, provider.ErrKeyNotFound) {
				t.Fatalf("Unwrap(%q) = %v; want ErrKeyNotFound", tt.version, err)
			}
			if got := srv.VaultCalls() - start; (got > 0) != tt.remote {
				t.Fatalf("Unwrap(%q) made %d vault calls; remote = %v", tt.version, got, tt.remote)
			}
		})
	}
}

func TestUnwrapAnyKeyOfTheVault(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	old := newTestProvider(t, srv, "old-key", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	key := []byte("0123456789abcdef0123456789abcdef")
	w, err := old.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	// The operator moved the plugin to a new key: old data stays readable.
	moved := newTestProvider(t, srv, "new-key", kvtest.KeyTypeRSA, nil)
	if got, err := moved.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap of the old key's data = %v", err)
	}
}

func TestChallengeResourceVerification(t *testing.T) {
	srv := startServer(t, kvtest.Options{Resource: "https://vault.example.org"})
	if _, err := srv.CreateKey("k", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	strict := newTestProvider(t, srv, "k", "", nil)
	_, err := strict.CurrentVersion(context.Background())
	if err == nil || !strings.Contains(Remedy(err), "disableChallengeResourceVerification") {
		t.Fatalf("challenge for another domain = %v (%q); want it refused", err, Remedy(err))
	}
	lax := newTestProvider(t, srv, "k", "", func(c *Config) { c.DisableChallengeResourceVerification = true })
	if _, err := lax.CurrentVersion(context.Background()); err != nil {
		t.Fatalf("with verification disabled: %v", err)
	}
}

func TestProbeAndCheckCredential(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "probe", kvtest.KeyTypeRSA, nil)
	srv.SetClockSkew(10 * time.Minute)
	ctx := context.Background()
	res, err := p.Probe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.TenantID != srv.TenantID() || res.Resource != kvtest.VaultResource {
		t.Fatalf("Probe = %+v; want tenant %s and resource %s", res, srv.TenantID(), kvtest.VaultResource)
	}
	if res.Skew < 9*time.Minute || res.Skew > 11*time.Minute {
		t.Fatalf("Probe skew = %s; want about 10m", res.Skew)
	}
	if err := p.CheckCredential(ctx, res); err != nil {
		t.Fatalf("CheckCredential: %v", err)
	}
	srv.SetOutage(true)
	if _, err := p.Probe(ctx); !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("Probe during an outage = %v; want ErrUnavailable", err)
	}
}

func TestNewValidation(t *testing.T) {
	cred := &staticCredential{token: "x"}
	for _, tt := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"http", Config{VaultURL: "http://v.vault.azure.net", KeyName: "k", Credential: cred}, "must be https"},
		{"path", Config{VaultURL: "https://v.vault.azure.net/keys", KeyName: "k", Credential: cred}, "no path"},
		{"no key", Config{VaultURL: "https://v.vault.azure.net", Credential: cred}, "key name"},
		{"bad key", Config{VaultURL: "https://v.vault.azure.net", KeyName: "a/b", Credential: cred}, "key name"},
		{"bad version", Config{VaultURL: "https://v.vault.azure.net", KeyName: "k", KeyVersion: "x/y", Credential: cred}, "key version"},
		{"no credential", Config{VaultURL: "https://v.vault.azure.net", KeyName: "k"}, "no credential"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.cfg); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v; want an error containing %q", err, tt.want)
			}
		})
	}
	if _, err := New(Config{VaultURL: "https://v.vault.azure.net/", KeyName: "k", Credential: cred}); err != nil {
		t.Fatalf("New with a trailing slash: %v", err)
	}
}

func TestPadding(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 14, 15, 16, 31, 32, 33, 64} {
		key := bytes.Repeat([]byte{0xab}, n)
		p := pad(key)
		if len(p)%8 != 0 || len(p) < 16 || len(p) <= n {
			t.Fatalf("pad(%d bytes) = %d bytes", n, len(p))
		}
		got, err := unpad(p)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("unpad(pad(%d bytes)) = %x, %v", n, got, err)
		}
	}
	for _, bad := range [][]byte{nil, make([]byte, 16), append(bytes.Repeat([]byte{1}, 15), 1), append(bytes.Repeat([]byte{1}, 7), 0x80)} {
		if _, err := unpad(bad); err == nil {
			t.Fatalf("unpad(%x) succeeded", bad)
		}
	}
}
