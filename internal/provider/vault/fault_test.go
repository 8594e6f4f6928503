package vault_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault/vaulttest"
)

// Sealed Vault: every call is unavailable, calls back off instead of
// hammering Vault, and the provider recovers once Vault is unsealed.
func TestSealed(t *testing.T) {
	ctx := context.Background()
	srv := vaulttest.MustStart(t, vaulttest.Options{})
	f := newFixture(t, srv, fixtureOpts{})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Seal(ctx); err != nil {
		t.Fatal(err)
	}
	before := f.counter.Total()
	start := time.Now()
	for i := 0; i < 200; i++ {
		if _, err := f.p.Unwrap(ctx, w); !errors.Is(err, provider.ErrUnavailable) {
			t.Fatalf("Unwrap while sealed = %v; want ErrUnavailable", err)
		}
	}
	if _, err := f.p.CurrentVersion(ctx); !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("CurrentVersion while sealed = %v; want ErrUnavailable", err)
	}
	// 201 calls: the first three reach Vault (each retried once by the
	// client), then the backoff answers (a probe a second on a slow run).
	if n := f.counter.Total() - before; n > 10 {
		t.Fatalf("201 calls within %s while sealed cost %d requests; want at most 10 (no hot loop)", time.Since(start).Round(time.Millisecond), n)
	}
	var be interface{ RetryAfter() time.Duration }
	_, err = f.p.Unwrap(ctx, w)
	if !errors.As(err, &be) || be.RetryAfter() <= 0 || be.RetryAfter() > vault.DefaultMaxBackoff {
		t.Fatalf("a failed-fast call = %v; want a RetryAfter hint within the backoff", err)
	}
	if st := f.p.ReportState(); st.Breaker != provider.BreakerOpen {
		t.Fatalf("breaker = %q while sealed; want open", st.Breaker)
	}
	if err := srv.Unseal(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "recovery after unseal", func() error {
		got, err := f.p.Unwrap(ctx, w)
		if err == nil && !bytes.Equal(got, key) {
			return errors.New("wrong key")
		}
		return err
	})
}

// A revoked token: the provider notices Vault refusing the token, logs in
// again (AppRole) and the call succeeds, with no error seen by the caller.
func TestTokenRevokedAppRole(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	var roleIDFile, secretIDFile string
	f := newFixture(t, srv, fixtureOpts{method: func(f *fixture) vault.Method {
		roleIDFile, secretIDFile = setupAppRole(t, f, "role-"+f.key, map[string]any{"token_ttl": "1h"})
		return vault.AppRole{Mount: "approle", RoleIDFile: roleIDFile, SecretIDFile: secretIDFile}
	}})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if n := f.p.Token().Logins; n != 1 {
		t.Fatalf("logins = %d; want 1", n)
	}
	revokeCurrentToken(t, f)
	got, err := f.p.Unwrap(ctx, w)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap after the token was revoked: %v; want a new login and success", err)
	}
	if n := f.p.Token().Logins; n != 2 {
		t.Fatalf("logins = %d; want 2", n)
	}
}

// A revoked token from a token file: the call fails as permission denied
// until the file holds a new token; then the provider picks it up.
func TestTokenRevokedTokenFile(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	revokeCurrentToken(t, f)
	old, err := os.ReadFile(f.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	_, uerr := f.p.Unwrap(ctx, w)
	if !errors.Is(uerr, provider.ErrPermissionDenied) {
		t.Fatalf("Unwrap with a revoked token and no new one = %v; want ErrPermissionDenied", uerr)
	}
	if strings.Contains(uerr.Error(), strings.TrimSpace(string(old))) {
		t.Fatal("an error holds the token")
	}
	tok, err := srv.Token(ctx, []string{"plugin-" + f.key}, 0, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the new token file's token in use", func() error {
		_, err := f.p.Unwrap(ctx, w)
		return err
	})
}

// A token TTL shorter than the run: the LifetimeWatcher renews it, and at
// its max TTL the provider logs in again; no call fails meanwhile.
func TestTokenTTLExpiringDuringRun(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for 12 s")
	}
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{method: func(f *fixture) vault.Method {
		r, s := setupAppRole(t, f, "role-"+f.key, map[string]any{"token_ttl": "3s", "token_max_ttl": "6s"})
		return vault.AppRole{Mount: "approle", RoleIDFile: r, SecretIDFile: s}
	}})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(12 * time.Second)
	calls := 0
	for time.Now().Before(deadline) {
		if _, err := f.p.CurrentVersion(ctx); err != nil {
			t.Fatalf("CurrentVersion at call %d: %v", calls, err)
		}
		if got, err := f.p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap at call %d: %v", calls, err)
		}
		calls++
		time.Sleep(250 * time.Millisecond)
	}
	ti := f.p.Token()
	if ti.Renewals < 1 {
		t.Fatalf("renewals = %d; want at least one (3 s TTL over 12 s)", ti.Renewals)
	}
	if ti.Logins < 2 {
		t.Fatalf("logins = %d; want a re-login at the 6 s max TTL", ti.Logins)
	}
	t.Logf("%d calls over 12 s: %d logins, %d renewals", calls, ti.Logins, ti.Renewals)
}

// Renewal that fails while the token still works, and a login that fails
// after it: CurrentVersion (so /readyz) and the gauge report it before the
// token expires; a good credential file clears it without a restart.
func TestRenewalFailureVisibleBeforeExpiry(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	var secretIDFile, role string
	f := newFixture(t, srv, fixtureOpts{method: func(f *fixture) vault.Method {
		role = "role-" + f.key
		// No default policy: renew-self is denied, so renewal fails; a
		// secret ID good for one login, so the login after it fails.
		var r string
		r, secretIDFile = setupAppRole(t, f, role, map[string]any{"token_ttl": "12s", "token_max_ttl": "1h", "token_no_default_policy": true, "secret_id_num_uses": 1})
		return vault.AppRole{Mount: "approle", RoleIDFile: r, SecretIDFile: secretIDFile}
	}})
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	expiry := f.p.Token().Expiry
	var seen time.Time
	eventually(t, 13*time.Second, "renewal failure reported", func() error {
		_, err := f.p.CurrentVersion(ctx)
		if err == nil {
			return errors.New("CurrentVersion still succeeds")
		}
		seen = time.Now()
		if !strings.Contains(err.Error(), "renewal") {
			return fmt.Errorf("CurrentVersion = %v; want the renewal failure", err)
		}
		return nil
	})
	if !seen.Before(expiry) {
		t.Fatalf("failure seen at %s, after the token expired at %s", seen, expiry)
	}
	if g := gauge(f.p, "vault_token_renewal_failing"); g != 1 {
		t.Fatalf("vault_token_renewal_failing = %v; want 1", g)
	}
	if g := gauge(f.p, "vault_token_expiry_timestamp_seconds"); g < float64(time.Now().Unix()) {
		t.Fatalf("token expiry gauge %v is in the past", g)
	}
	t.Logf("renewal failure reported %s before the token's expiry", expiry.Sub(seen).Round(100*time.Millisecond))
	// A new secret ID in the file: the next login works.
	s := rootWrite(t, srv, "auth/approle/role/"+role+"/secret-id", nil)
	if err := os.WriteFile(secretIDFile, []byte(s.Data["secret_id"].(string)), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "recovery with a new secret ID", func() error {
		_, err := f.p.CurrentVersion(ctx)
		return err
	})
	if g := gauge(f.p, "vault_token_renewal_failing"); g != 0 {
		t.Fatalf("vault_token_renewal_failing = %v after recovery; want 0", g)
	}
}

func gauge(p *vault.Provider, name string) float64 {
	for _, g := range p.ReportState().Gauges {
		if g.Name == name {
			return g.Value
		}
	}
	return -1
}

// The token's policy removed: 403s are permission denied, no login is
// attempted (the token is fine), and repeated calls are answered from the
// remembered denial.
func TestPolicyRemoved(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	w, err := f.p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Root(t).Sys().DeletePolicyWithContext(ctx, "plugin-"+f.key); err != nil {
		t.Fatal(err)
	}
	before := f.counter.Total()
	for i := 0; i < 100; i++ {
		_, err = f.p.Unwrap(ctx, w)
		if !errors.Is(err, provider.ErrPermissionDenied) {
			t.Fatalf("Unwrap without a policy = %v; want ErrPermissionDenied", err)
		}
	}
	if n := f.counter.Total() - before; n > 3 {
		t.Fatalf("100 denied calls cost %d requests; want at most 3", n)
	}
	if n := f.p.Token().Logins; n != 1 {
		t.Fatalf("logins = %d; a policy denial must not log in again", n)
	}
	if fix := vault.Remedy(err); !strings.Contains(fix, `path "transit/decrypt/`+f.key+`"`) {
		t.Fatalf("Remedy = %q; want the policy to grant", fix)
	}
}

// A deleted key: CurrentVersion and Unwrap report ErrKeyNotFound (the
// envelope then stops encrypting), RevokedVersions reports every version.
func TestKeyDeleted(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	w, err := f.p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	rootWrite(t, srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"deletion_allowed": true})
	if _, err := srv.Root(t).Logical().Delete(f.mount + "/keys/" + f.key); err != nil {
		t.Fatal(err)
	}
	if _, err := f.p.CurrentVersion(ctx); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("CurrentVersion of a deleted key = %v; want ErrKeyNotFound", err)
	}
	if _, err := f.p.Unwrap(ctx, w); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Unwrap with a deleted key = %v; want ErrKeyNotFound", err)
	}
	if _, err := f.p.Wrap(ctx, randomKey(t)); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Wrap with a deleted key = %v; want ErrKeyNotFound (and no key made again)", err)
	}
	time.Sleep(2100 * time.Millisecond) // past the key state's freshness
	revoked, err := f.p.RevokedVersions(ctx, []string{"1"})
	if err != nil || len(revoked) != 1 {
		t.Fatalf("RevokedVersions of a deleted key = %v, %v", revoked, err)
	}
	if _, err := srv.Root(t).Logical().Read(f.mount + "/keys/" + f.key); err != nil {
		t.Fatal(err)
	}
	if s, _ := srv.Root(t).Logical().Read(f.mount + "/keys/" + f.key); s != nil {
		t.Fatal("the provider made the deleted key again")
	}
}

// A token file readable by others is refused, naming the fix, and the
// token never appears in the error.
func TestTokenFileMode(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	tok, err := os.ReadFile(f.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(f.tokenFile, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = f.p.CurrentVersion(ctx)
	if !errors.Is(err, provider.ErrPermissionDenied) || !strings.Contains(err.Error(), "mode 0644") {
		t.Fatalf("CurrentVersion with a 0644 token file = %v; want a refusal naming the mode", err)
	}
	if strings.Contains(err.Error(), strings.TrimSpace(string(tok))) {
		t.Fatal("the error holds the token")
	}
	if fix := vault.Remedy(err); !strings.Contains(fix, "chmod 600") {
		t.Fatalf("Remedy = %q; want chmod 600", fix)
	}
	// A symlink to a directory and an empty file are refused too.
	if err := os.Chmod(f.tokenFile, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.tokenFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // past the login backoff
	if _, err := f.p.CurrentVersion(ctx); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("CurrentVersion with an empty token file = %v", err)
	}
}

func setupAppRole(t *testing.T, f *fixture, role string, params map[string]any) (roleIDFile, secretIDFile string) {
	t.Helper()
	ctx := context.Background()
	root := f.srv.Root(t)
	auths, err := root.Sys().ListAuthWithContext(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := auths["approle/"]; !ok {
		if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, "approle", &api.EnableAuthOptions{Type: "approle"}); err != nil {
			t.Fatal(err)
		}
	}
	body := map[string]any{"token_policies": "plugin-" + f.key}
	numUses := params["secret_id_num_uses"]
	for k, v := range params {
		if k != "secret_id_num_uses" {
			body[k] = v
		}
	}
	rootWrite(t, f.srv, "auth/approle/role/"+role, body)
	s, err := root.Logical().Read("auth/approle/role/" + role + "/role-id")
	if err != nil {
		t.Fatal(err)
	}
	sidBody := map[string]any{}
	if numUses != nil {
		sidBody["num_uses"] = numUses
	}
	sid := rootWrite(t, f.srv, "auth/approle/role/"+role+"/secret-id", sidBody)
	return writeSecret(t, "role-id", s.Data["role_id"].(string)), writeSecret(t, "secret-id", sid.Data["secret_id"].(string))
}

// revokeCurrentToken revokes every token holding the key's policy: the
// provider's among them.
func revokeCurrentToken(t *testing.T, f *fixture) {
	t.Helper()
	root := f.srv.Root(t)
	s, err := root.Logical().List("auth/token/accessors")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, a := range s.Data["keys"].([]any) {
		info, err := root.Auth().Token().LookupAccessor(a.(string))
		if err != nil || info == nil {
			continue
		}
		pols, _ := info.Data["policies"].([]any)
		for _, p := range pols {
			if p == "plugin-"+f.key {
				if err := root.Auth().Token().RevokeAccessor(a.(string)); err != nil {
					t.Fatal(err)
				}
				n++
			}
		}
	}
	if n == 0 {
		t.Fatal("no token to revoke")
	}
}

// A non-renewable token whose file is never replaced: the trouble shows
// once the plugin tries to replace it (two thirds of the TTL), before it
// expires; a new token in the file clears it.
func TestNonRenewableTokenFile(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	tok, err := srv.Token(ctx, []string{"plugin-" + f.key}, 6*time.Second, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	expiry := f.p.Token().Expiry
	eventually(t, 6*time.Second, "trouble reported", func() error {
		if _, err := f.p.CurrentVersion(ctx); err == nil || !strings.Contains(err.Error(), "not renewable") {
			return fmt.Errorf("CurrentVersion = %v", err)
		}
		return nil
	})
	if !time.Now().Before(expiry) {
		t.Fatalf("trouble reported only after the token expired at %s", expiry)
	}
	tok2, err := srv.Token(ctx, []string{"plugin-" + f.key}, time.Hour, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.tokenFile, []byte(tok2), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "recovery with a new token", func() error {
		_, err := f.p.CurrentVersion(ctx)
		return err
	})
}
