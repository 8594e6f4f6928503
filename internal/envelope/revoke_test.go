package envelope

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

// TestRetiredVersionStopsDecryptingWithinOnePoll retires a key version
// whose local KEK a running reader holds unwrapped: the reader's next poll
// drops it, and Decrypt of data under it fails at once instead of working
// until the process restarts.
func TestRetiredVersionStopsDecryptingWithinOnePoll(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "keyset.json")
	lp, err := local.New(local.Config{Path: path, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	writer, _ := New(Config{Provider: lp})
	if err := writer.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	old, err := writer.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	oldVersion := mustVersion(t, lp)
	if _, err := lp.Rotate(ctx); err != nil {
		t.Fatal(err)
	}

	// Another node's plugin, on its own copy of the same keyset file.
	reader, _ := New(Config{Provider: mustLocal(t, path)})
	if err := reader.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(old)); err != nil {
		t.Fatalf("Decrypt before retire: %v", err)
	}
	if err := lp.Retire(ctx, oldVersion); err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(old)); err != nil {
		t.Fatalf("Decrypt before the next poll (still cached, as documented): %v", err)
	}
	if err := reader.Refresh(ctx); err != nil {
		t.Fatalf("poll after retire: %v", err)
	}
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(old)); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Decrypt after the poll that saw the retire = %v; want ErrKeyDisabled", err)
	}
	// Data under the current version is unaffected.
	cur, err := reader.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(cur)); err != nil {
		t.Fatalf("Decrypt under the current version: %v", err)
	}
}

func mustLocal(t *testing.T, path string) *local.Provider {
	t.Helper()
	p, err := local.New(local.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCacheTTLUnwrapsAgain checks that an unwrapped local KEK is kept no
// longer than CacheTTL: then the store is asked again.
func TestCacheTTLUnwrapsAgain(t *testing.T) {
	ctx := context.Background()
	writer, resp := writtenObject(t)
	remote := providertest.NewFaulty(writer.local)
	reader := newFixture(t, func(c *Config) { c.Provider = remote; c.CacheTTL = time.Hour })
	for range 3 {
		if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); err != nil {
			t.Fatal(err)
		}
	}
	if got := remote.UnwrapCalls.Load(); got != 1 {
		t.Fatalf("unwraps within the TTL = %d; want 1", got)
	}
	reader.clock.Add(time.Hour)
	if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); err != nil {
		t.Fatal(err)
	}
	if got := remote.UnwrapCalls.Load(); got != 2 {
		t.Fatalf("unwraps after the TTL = %d; want 2", got)
	}
}

// TestRevokedCurrentVersionStopsEncrypt makes the store answer that the
// current version is disabled (and no usable one exists): Encrypt fails
// with ErrRevoked instead of going on with the cached local KEK, Status is
// not ok, and both come back when the store does.
func TestRevokedCurrentVersionStopsEncrypt(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	before, _ := f.svc.Encrypt(ctx, "uid", seed(t))
	f.remote.SetError(fmt.Errorf("vault: %w", provider.ErrKeyDisabled))
	if err := f.svc.Refresh(ctx); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Refresh = %v; want ErrKeyDisabled", err)
	}
	if _, err := f.svc.Encrypt(ctx, "uid", seed(t)); !errors.Is(err, ErrRevoked) || !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Encrypt after revocation = %v; want ErrRevoked (a FailedPrecondition)", err)
	}
	if st, _ := f.svc.Status(ctx); st.Healthz == "ok" {
		t.Fatalf("Status after revocation = %+v; want not ok", st)
	}
	if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(before)); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Decrypt of data under the revoked version = %v; want ErrKeyDisabled", err)
	}

	// An outage, unlike a revocation, keeps the current local KEK.
	f.remote.SetError(nil)
	f.refresh(t)
	f.remote.SetError(fmt.Errorf("down: %w", provider.ErrUnavailable))
	_ = f.svc.Refresh(ctx)
	if _, err := f.svc.Encrypt(ctx, "uid", seed(t)); err != nil {
		t.Fatalf("Encrypt during an outage = %v; want it to go on", err)
	}
	f.remote.SetError(nil)
	f.refresh(t)
	if st, _ := f.svc.Status(ctx); st.Healthz != "ok" {
		t.Fatalf("Status after the store answered again = %+v", st)
	}
	if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(before)); err != nil {
		t.Fatalf("Decrypt after re-enable: %v", err)
	}
}

// switchableStore is a real keyset whose whole key can be revoked at once:
// with off set, the store reports every version disabled.
type switchableStore struct {
	*local.Provider
	off atomic.Bool
}

func (s *switchableStore) CurrentVersion(ctx context.Context) (string, error) {
	if s.off.Load() {
		return "", fmt.Errorf("vault: %w", provider.ErrKeyDisabled)
	}
	return s.Provider.CurrentVersion(ctx)
}

func (s *switchableStore) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if s.off.Load() {
		return nil, fmt.Errorf("vault: %w", provider.ErrKeyDisabled)
	}
	return s.Provider.Unwrap(ctx, w)
}

// TestRevokingTheWholeKeyDropsEveryVersion disables every version (an
// emergency revocation of the key): the first poll that sees it drops the
// cached local KEKs of older versions too, not only the current one's.
func TestRevokingTheWholeKeyDropsEveryVersion(t *testing.T) {
	ctx := context.Background()
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	store := &switchableStore{Provider: lp}
	svc, _ := New(Config{Provider: store})
	if err := svc.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	old, _ := svc.Encrypt(ctx, "uid", seed(t))
	if _, err := lp.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := svc.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	cur, _ := svc.Encrypt(ctx, "uid", seed(t))
	store.off.Store(true)
	if err := svc.Refresh(ctx); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Refresh with the key revoked = %v; want ErrKeyDisabled", err)
	}
	for name, r := range map[string]*kmsservice.EncryptResponse{"older version": old, "current version": cur} {
		if _, err := svc.Decrypt(ctx, "uid", decryptRequest(r)); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Errorf("Decrypt of data under the %s after the key was revoked = %v; want ErrKeyDisabled", name, err)
		}
	}
	if n := svc.Stats().CacheEntries; n != 0 {
		t.Errorf("cache entries after the key was revoked = %d; want 0", n)
	}
}
