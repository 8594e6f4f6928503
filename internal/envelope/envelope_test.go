package envelope

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

type fixture struct {
	svc    *Service
	remote *providertest.Faulty
	local  *local.Provider
	clock  *clocktest.Clock
}

func newFixture(t testing.TB, mutate func(*Config)) *fixture {
	t.Helper()
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{remote: providertest.NewFaulty(lp), local: lp, clock: clocktest.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))}
	cfg := Config{Provider: f.remote, Now: f.clock.Now}
	if mutate != nil {
		mutate(&cfg)
	}
	if f.svc, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) refresh(t *testing.T) {
	t.Helper()
	if err := f.svc.Refresh(context.Background()); err != nil {
		t.Fatalf("Refresh: %v", err)
	}
}

func (f *fixture) rotateRemote(t *testing.T) string {
	t.Helper()
	v, err := f.local.Rotate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func seed(t testing.TB) []byte {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func decryptRequest(r *kmsservice.EncryptResponse) *kmsservice.DecryptRequest {
	return &kmsservice.DecryptRequest{Ciphertext: bytes.Clone(r.Ciphertext), KeyID: r.KeyID, Annotations: maps.Clone(r.Annotations)}
}

func TestStatusBeforeAndAfterFirstRefresh(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	st, err := f.svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Healthz == "ok" {
		t.Fatalf("Status before any refresh is ok; want not ready")
	}
	if _, err := f.svc.Encrypt(ctx, "uid", seed(t)); !errors.Is(err, ErrNotReady) {
		t.Fatalf("Encrypt before refresh = %v; want ErrNotReady", err)
	}
	f.refresh(t)
	st, err = f.svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	version, _ := f.local.CurrentVersion(ctx)
	if st.Healthz != "ok" || st.Version != "v2" || st.KeyID != DeriveKeyID("local", version) {
		t.Fatalf("Status = %+v; want ok, v2, key_id of version %s", st, version)
	}
	calls := f.remote.CurrentVersionCalls.Load() + f.remote.WrapCalls.Load() + f.remote.UnwrapCalls.Load()
	for range 100 {
		if _, err := f.svc.Status(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := f.remote.CurrentVersionCalls.Load() + f.remote.WrapCalls.Load() + f.remote.UnwrapCalls.Load(); got != calls {
		t.Fatalf("100 Status calls made %d remote calls; want 0", got-calls)
	}
}

func TestEncryptDecryptRoundTrip(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	st, _ := f.svc.Status(ctx)
	for _, size := range []int{1, 32, MaxPlaintextSize} {
		pt := make([]byte, size)
		rand.Read(pt)
		resp, err := f.svc.Encrypt(ctx, "uid", pt)
		if err != nil {
			t.Fatalf("Encrypt(%d bytes): %v", size, err)
		}
		if resp.KeyID != st.KeyID {
			t.Fatalf("Encrypt key_id %q != Status key_id %q", resp.KeyID, st.KeyID)
		}
		if len(resp.Ciphertext) > maxCiphertextSize || len(resp.KeyID) > maxKeyIDSize || annotationsSize(resp.Annotations) > maxAnnotationsSize {
			t.Fatalf("response outside kube-apiserver limits: ct %d B, key_id %d B, annotations %d B", len(resp.Ciphertext), len(resp.KeyID), annotationsSize(resp.Annotations))
		}
		for k := range resp.Annotations {
			if strings.Contains(k, "/") || strings.Count(k, ".") < 1 || strings.ToLower(k) != k {
				t.Fatalf("annotation key %q is not a lowercase DNS name without /", k)
			}
		}
		if bytes.Contains(resp.Ciphertext, pt) && size > 4 {
			t.Fatalf("ciphertext contains the plaintext")
		}
		got, err := f.svc.Decrypt(ctx, "uid", decryptRequest(resp))
		if err != nil {
			t.Fatalf("Decrypt: %v", err)
		}
		if !bytes.Equal(got, pt) {
			t.Fatalf("Decrypt returned different bytes")
		}
	}
}

// TestHierarchyRemoteCalls checks the point of the hierarchy: a cold node
// decrypts many seeds under one local KEK with a single remote unwrap, and
// Encrypt makes no remote call at all.
func TestHierarchyRemoteCalls(t *testing.T) {
	ctx := context.Background()
	writer := newFixture(t, nil)
	writer.refresh(t)
	wrapsBefore := writer.remote.WrapCalls.Load()
	const n = 1000
	resps := make([]*kmsservice.EncryptResponse, n)
	for i := range resps {
		r, err := writer.svc.Encrypt(ctx, "uid", seed(t))
		if err != nil {
			t.Fatal(err)
		}
		resps[i] = r
	}
	if got := writer.remote.WrapCalls.Load() - wrapsBefore; got != 0 {
		t.Fatalf("%d Encrypts made %d remote wraps; want 0", n, got)
	}

	// A second node on the same key store, cold cache, all misses at once.
	reader, err := New(Config{Provider: providertest.NewFaulty(writer.local)})
	if err != nil {
		t.Fatal(err)
	}
	readerRemote := reader.provider.(*providertest.Faulty)
	readerRemote.Delay = 20 * time.Millisecond
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, r := range resps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := reader.Decrypt(ctx, "uid", decryptRequest(r)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Decrypt on a cold node: %v", err)
	}
	if got := readerRemote.UnwrapCalls.Load(); got != 1 {
		t.Fatalf("cold node made %d remote unwraps for %d seeds under one local KEK; want 1", got, n)
	}
	if st := reader.Stats(); st.CacheMisses+st.CacheHits != n || st.CacheMisses == 0 || st.ProviderUnwrap != 1 {
		t.Fatalf("Stats = %+v; want %d lookups, 1 unwrap", st, n)
	}
}

func TestRemoteRotationChangesKeyID(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	old, err := f.svc.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	next := f.rotateRemote(t)
	// Until the next poll the plugin keeps the old key_id.
	if st, _ := f.svc.Status(ctx); st.KeyID != old.KeyID {
		t.Fatalf("key_id changed before a poll")
	}
	f.refresh(t)
	st, _ := f.svc.Status(ctx)
	if st.KeyID == old.KeyID || st.KeyID != DeriveKeyID("local", next) {
		t.Fatalf("key_id after rotation = %q; want the key_id of version %s", st.KeyID, next)
	}
	resp, err := f.svc.Encrypt(ctx, "uid", seed(t))
	if err != nil || resp.KeyID != st.KeyID {
		t.Fatalf("Encrypt after rotation = %v, key_id %q; want %q", err, resp.KeyID, st.KeyID)
	}
	if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(old)); err != nil {
		t.Fatalf("Decrypt of a ciphertext from before the rotation: %v", err)
	}
	// Polling again without a change keeps the key_id and the local KEK.
	created := f.svc.Stats().LocalKEKs
	f.refresh(t)
	if st2, _ := f.svc.Status(ctx); st2.KeyID != st.KeyID || f.svc.Stats().LocalKEKs != created {
		t.Fatalf("a poll without a remote change replaced the key")
	}
}

func TestLocalKEKLimits(t *testing.T) {
	ctx := context.Background()
	t.Run("uses", func(t *testing.T) {
		f := newFixture(t, func(c *Config) { c.KEKMaxUses = 3 })
		f.refresh(t)
		var refs [][]byte
		for range 7 {
			r, err := f.svc.Encrypt(ctx, "uid", seed(t))
			if err != nil {
				t.Fatal(err)
			}
			refs = append(refs, r.Annotations[AnnotationLocalKEK])
			if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(r)); err != nil {
				t.Fatal(err)
			}
		}
		distinct := map[string]bool{}
		for _, r := range refs {
			distinct[string(r)] = true
		}
		if len(distinct) != 3 {
			t.Fatalf("7 encrypts with a limit of 3 uses made %d local KEKs; want 3", len(distinct))
		}
		if st, _ := f.svc.Status(ctx); st.KeyID != DeriveKeyID("local", mustVersion(t, f.local)) {
			t.Fatalf("a local KEK change altered the key_id")
		}
	})
	t.Run("age", func(t *testing.T) {
		f := newFixture(t, func(c *Config) { c.KEKMaxAge = time.Hour })
		f.refresh(t)
		first, _ := f.svc.Encrypt(ctx, "uid", seed(t))
		f.clock.Add(2 * time.Hour)
		f.refresh(t) // the background poll replaces it
		second, _ := f.svc.Encrypt(ctx, "uid", seed(t))
		if bytes.Equal(first.Annotations[AnnotationLocalKEK], second.Annotations[AnnotationLocalKEK]) {
			t.Fatalf("local KEK not replaced after its max age")
		}
		if first.KeyID != second.KeyID {
			t.Fatalf("age rotation changed the key_id")
		}
	})
	t.Run("limit reached during outage", func(t *testing.T) {
		f := newFixture(t, func(c *Config) { c.KEKMaxUses = 2 })
		f.refresh(t)
		f.remote.SetError(fmt.Errorf("vault down: %w", provider.ErrUnavailable))
		for i := range 5 {
			r, err := f.svc.Encrypt(ctx, "uid", seed(t))
			if err != nil {
				t.Fatalf("Encrypt %d during an outage past the soft limit: %v", i, err)
			}
			if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(r)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func mustVersion(t *testing.T, p provider.Provider) string {
	t.Helper()
	v, err := p.CurrentVersion(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestOutage(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	before, _ := f.svc.Encrypt(ctx, "uid", seed(t))

	f.remote.SetError(fmt.Errorf("connect: %w", provider.ErrUnavailable))
	if err := f.svc.Refresh(ctx); !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("Refresh during outage = %v; want ErrUnavailable", err)
	}
	st, _ := f.svc.Status(ctx)
	if st.Healthz != "ok" {
		t.Fatalf("Status during a key-store outage = %q; want ok (writes keep working)", st.Healthz)
	}
	stats := f.svc.Stats()
	if stats.Ready || !strings.Contains(stats.LastError, "unavailable") {
		t.Fatalf("Stats during outage = %+v; want not ready with the error", stats)
	}
	during, err := f.svc.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatalf("Encrypt during outage: %v", err)
	}
	for _, r := range []*kmsservice.EncryptResponse{before, during} {
		if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(r)); err != nil {
			t.Fatalf("Decrypt of a cached local KEK during outage: %v", err)
		}
	}
	// A node that never saw the local KEK cannot unwrap it during the outage,
	// and says why.
	cold, _ := New(Config{Provider: f.remote})
	if _, err := cold.Decrypt(ctx, "uid", decryptRequest(before)); !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("cold Decrypt during outage = %v; want ErrUnavailable", err)
	}
	f.remote.SetError(nil)
	f.refresh(t)
	if !f.svc.Stats().Ready {
		t.Fatalf("not ready after the key store came back")
	}
	if _, err := cold.Decrypt(ctx, "uid", decryptRequest(before)); err != nil {
		t.Fatalf("cold Decrypt after outage: %v", err)
	}
}

func TestStaleness(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.PollInterval = time.Minute })
	f.refresh(t)
	if !f.svc.Stats().Ready {
		t.Fatal("not ready after refresh")
	}
	f.clock.Add(4 * time.Minute)
	if f.svc.Stats().Ready {
		t.Fatal("ready with state four poll intervals old")
	}
}

func TestDecryptRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	good, err := f.svc.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	next := f.rotateRemote(t)
	f.refresh(t)
	newKeyID := DeriveKeyID("local", next)

	tamper := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 0x40; return b }
	lkek := good.Annotations[AnnotationLocalKEK]
	remoteVersion, wrapped, err := decodeLocalKEK(lkek)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		mutate func(r *kmsservice.DecryptRequest)
		want   error
	}{
		{"empty key_id", func(r *kmsservice.DecryptRequest) { r.KeyID = "" }, ErrInvalidInput},
		{"oversized key_id", func(r *kmsservice.DecryptRequest) { r.KeyID = strings.Repeat("k", 1025) }, ErrInvalidInput},
		{"unknown key_id", func(r *kmsservice.DecryptRequest) { r.KeyID = "kp1.unknown" }, ErrInvalidInput},
		{"moved to another key_id", func(r *kmsservice.DecryptRequest) { r.KeyID = newKeyID }, ErrInvalidInput},
		{"empty ciphertext", func(r *kmsservice.DecryptRequest) { r.Ciphertext = nil }, ErrInvalidInput},
		{"garbage ciphertext", func(r *kmsservice.DecryptRequest) { r.Ciphertext = []byte("garbage garbage garbage garbage garbage") }, ErrInvalidInput},
		{"truncated ciphertext", func(r *kmsservice.DecryptRequest) { r.Ciphertext = r.Ciphertext[:20] }, ErrInvalidInput},
		{"ciphertext missing its last byte", func(r *kmsservice.DecryptRequest) { r.Ciphertext = r.Ciphertext[:len(r.Ciphertext)-1] }, ErrInvalidInput},
		{"oversized ciphertext", func(r *kmsservice.DecryptRequest) { r.Ciphertext = append(r.Ciphertext, make([]byte, 1024)...) }, ErrInvalidInput},
		{"flipped ciphertext bit", func(r *kmsservice.DecryptRequest) { r.Ciphertext = tamper(r.Ciphertext, 20) }, ErrInvalidInput},
		{"flipped nonce bit", func(r *kmsservice.DecryptRequest) { r.Ciphertext = tamper(r.Ciphertext, 3) }, ErrInvalidInput},
		{"unknown format", func(r *kmsservice.DecryptRequest) { r.Ciphertext = tamper(r.Ciphertext, 0) }, ErrInvalidInput},
		{"no annotations", func(r *kmsservice.DecryptRequest) { r.Annotations = nil }, ErrInvalidInput},
		{"missing lkek", func(r *kmsservice.DecryptRequest) { delete(r.Annotations, AnnotationLocalKEK) }, ErrInvalidInput},
		{"missing version", func(r *kmsservice.DecryptRequest) { delete(r.Annotations, AnnotationVersion) }, ErrInvalidInput},
		{"future version", func(r *kmsservice.DecryptRequest) { r.Annotations[AnnotationVersion] = []byte("2") }, ErrInvalidInput},
		{"empty lkek", func(r *kmsservice.DecryptRequest) { r.Annotations[AnnotationLocalKEK] = nil }, ErrInvalidInput},
		{"truncated lkek", func(r *kmsservice.DecryptRequest) { r.Annotations[AnnotationLocalKEK] = lkek[:4] }, ErrInvalidInput},
		{"tampered wrapped KEK", func(r *kmsservice.DecryptRequest) {
			r.Annotations[AnnotationLocalKEK] = tamper(lkek, len(lkek)-1)
		}, provider.ErrInvalidCiphertext},
		{"lkek from another encryption", func(r *kmsservice.DecryptRequest) {
			// Same remote version, another local KEK: a well-formed but foreign annotation.
			w, err := f.local.Wrap(ctx, seed(t))
			if err != nil {
				t.Fatal(err)
			}
			r.KeyID = DeriveKeyID("local", w.Version)
			r.Annotations[AnnotationLocalKEK] = encodeLocalKEK(w.Version, w.Ciphertext)
		}, ErrInvalidInput},
		{"version not in the key store", func(r *kmsservice.DecryptRequest) {
			r.KeyID = DeriveKeyID("local", "77")
			r.Annotations[AnnotationLocalKEK] = encodeLocalKEK("77", wrapped)
		}, provider.ErrKeyNotFound},
		{"lkek renamed to another version", func(r *kmsservice.DecryptRequest) {
			r.KeyID = newKeyID
			r.Annotations[AnnotationLocalKEK] = encodeLocalKEK(next, wrapped)
		}, provider.ErrInvalidCiphertext},
		{"oversized annotations", func(r *kmsservice.DecryptRequest) { r.Annotations["x.example.com"] = make([]byte, 33*1024) }, ErrInvalidInput},
	}
	_ = remoteVersion
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := decryptRequest(good)
			tt.mutate(req)
			got, err := f.svc.Decrypt(ctx, "uid", req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Decrypt = (%x, %v); want %v", got, err, tt.want)
			}
		})
	}
	if _, err := f.svc.Decrypt(ctx, "uid", nil); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("Decrypt(nil) = %v", err)
	}
	// The untouched request still decrypts: nothing above poisoned the cache.
	if _, err := f.svc.Decrypt(ctx, "uid", decryptRequest(good)); err != nil {
		t.Fatalf("Decrypt of the good request after bad ones: %v", err)
	}
}

func TestEncryptRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, nil)
	f.refresh(t)
	for _, tt := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"oversized", make([]byte, MaxPlaintextSize+1)},
		{"64 KiB", make([]byte, 64*1024)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := f.svc.Encrypt(ctx, "uid", tt.in); !errors.Is(err, ErrInvalidInput) {
				t.Fatalf("Encrypt = %v; want ErrInvalidInput", err)
			}
		})
	}
}

func TestCacheBoundedAndCoalesced(t *testing.T) {
	ctx := context.Background()
	writer := newFixture(t, func(c *Config) { c.KEKMaxUses = 1 })
	writer.refresh(t)
	var resps []*kmsservice.EncryptResponse
	for range 10 {
		r, err := writer.svc.Encrypt(ctx, "uid", seed(t))
		if err != nil {
			t.Fatal(err)
		}
		resps = append(resps, r)
	}
	remote := providertest.NewFaulty(writer.local)
	reader, _ := New(Config{Provider: remote, CacheSize: 4})
	for _, r := range resps {
		if _, err := reader.Decrypt(ctx, "uid", decryptRequest(r)); err != nil {
			t.Fatal(err)
		}
	}
	if got := reader.Stats().CacheEntries; got != 4 {
		t.Fatalf("cache holds %d entries; want the bound 4", got)
	}
	// The most recent entries are hits; the oldest was evicted and is a miss.
	unwraps := remote.UnwrapCalls.Load()
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(resps[9])); err != nil {
		t.Fatal(err)
	}
	if remote.UnwrapCalls.Load() != unwraps {
		t.Fatalf("recent entry was not cached")
	}
	if _, err := reader.Decrypt(ctx, "uid", decryptRequest(resps[0])); err != nil {
		t.Fatal(err)
	}
	if remote.UnwrapCalls.Load() != unwraps+1 {
		t.Fatalf("evicted entry did not cause an unwrap")
	}
}

func TestDecryptHonoursCallerDeadline(t *testing.T) {
	f := newFixture(t, nil)
	f.refresh(t)
	r, _ := f.svc.Encrypt(context.Background(), "uid", seed(t))
	remote := providertest.NewFaulty(f.local)
	remote.Delay = 500 * time.Millisecond
	cold, _ := New(Config{Provider: remote})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := cold.Decrypt(ctx, "uid", decryptRequest(r)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Decrypt past its deadline = %v; want DeadlineExceeded", err)
	}
	// The unwrap started for the first caller still completes and is cached.
	deadline := time.Now().Add(5 * time.Second)
	for cold.Stats().CacheEntries == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := cold.Decrypt(context.Background(), "uid", decryptRequest(r)); err != nil {
		t.Fatal(err)
	}
	if got := remote.UnwrapCalls.Load(); got != 1 {
		t.Fatalf("unwraps = %d; want 1", got)
	}
}

func TestRunPollsAndStops(t *testing.T) {
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	svc, _ := New(Config{Provider: lp, PollInterval: 5 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	old := waitKeyID(t, svc, "")
	next, err := lp.Rotate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := waitKeyID(t, svc, old); got != DeriveKeyID("local", next) {
		t.Fatalf("Run picked up key_id %q; want that of %s", got, next)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// waitKeyID waits until the ready key_id differs from old and returns it.
func waitKeyID(t *testing.T, svc *Service, old string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if st, _ := svc.Status(context.Background()); st.Healthz == "ok" && st.KeyID != old {
			return st.KeyID
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("key_id still %q after 10 s", old)
	return ""
}

func TestDeriveKeyID(t *testing.T) {
	a := DeriveKeyID("local", "1")
	if a != DeriveKeyID("local", "1") {
		t.Fatal("DeriveKeyID is not deterministic")
	}
	for _, other := range []string{DeriveKeyID("local", "2"), DeriveKeyID("azurekeyvault", "1"), DeriveKeyID("local1", "")} {
		if other == a {
			t.Fatalf("distinct inputs share key_id %q", a)
		}
	}
	if !strings.HasPrefix(a, "kp1.") || len(a) > 64 {
		t.Fatalf("key_id %q: want kp1. prefix and a short id", a)
	}
}

// gatedProvider holds the first CurrentVersion call made after arm until
// release is closed, then answers it with slow: a key store that answers a
// slow call late. Every call made after arm is signalled on entered.
type gatedProvider struct {
	provider.Provider
	slow    func() (string, error)
	armed   atomic.Bool
	hold    atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (g *gatedProvider) arm() {
	g.hold.Store(true)
	g.armed.Store(true)
}

func (g *gatedProvider) CurrentVersion(ctx context.Context) (string, error) {
	if g.armed.Load() {
		g.entered <- struct{}{}
	}
	if g.hold.CompareAndSwap(true, false) {
		<-g.release
		return g.slow()
	}
	return g.Provider.CurrentVersion(ctx)
}

// TestRefreshSerialized runs a slow Refresh and a later fast one at once (as
// Run and the admin endpoint may): the later call must not reach the key
// store before the slow one finished, and the outcome left is the later one.
func TestRefreshSerialized(t *testing.T) {
	tests := []struct {
		name string
		// slow is the late answer to the first call, given the version
		// that was current before the key store rotated.
		slow func(old string) (string, error)
	}{
		{"late failure", func(string) (string, error) { return "", fmt.Errorf("late: %w", provider.ErrUnavailable) }},
		{"late answer with the previous version", func(old string) (string, error) { return old, nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := &gatedProvider{entered: make(chan struct{}, 8), release: make(chan struct{})}
			f := newFixture(t, func(c *Config) { g.Provider, c.Provider = c.Provider, g })
			f.refresh(t)
			old := mustVersion(t, f.local)
			g.slow = func() (string, error) { return tt.slow(old) }
			next := f.rotateRemote(t)

			ctx := context.Background()
			g.arm()
			first := make(chan error, 1)
			go func() { first <- f.svc.Refresh(ctx) }()
			<-g.entered // the first call is at the key store
			f.clock.Add(time.Second)
			second := make(chan error, 1)
			go func() { second <- f.svc.Refresh(ctx) }()
			select {
			case <-g.entered:
				t.Errorf("second Refresh reached the key store while the first was still running")
			case <-time.After(50 * time.Millisecond):
			}
			close(g.release)
			<-first
			if err := <-second; err != nil {
				t.Fatalf("second Refresh = %v; want nil", err)
			}

			st := f.svc.Stats()
			if want := DeriveKeyID("local", next); st.KeyID != want {
				t.Errorf("key_id = %q; want %q (the later call's version)", st.KeyID, want)
			}
			if st.RemoteVersion != next {
				t.Errorf("RemoteVersion = %q; want %q", st.RemoteVersion, next)
			}
			if now := f.clock.Now(); !st.LastAttempt.Equal(now) || !st.LastSuccess.Equal(now) {
				t.Errorf("LastAttempt, LastSuccess = %v, %v; want both %v (the later call)", st.LastAttempt, st.LastSuccess, now)
			}
			if !st.Ready || st.LastError != "" {
				t.Errorf("Ready, LastError = %v, %q; want true, \"\"", st.Ready, st.LastError)
			}
		})
	}
}

// TestRefreshCallerGaveUp checks that a Refresh whose caller's context ended
// leaves the last outcome alone, while a key store that does not answer
// within RemoteTimeout is still recorded as a failure.
func TestRefreshCallerGaveUp(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name      string
		ctx       func(t *testing.T) context.Context
		delay     time.Duration
		wantErr   error
		wantReady bool
	}{
		{"canceled before the call", func(*testing.T) context.Context { return canceled }, 0, context.Canceled, true},
		{"deadline during the call", func(t *testing.T) context.Context {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			t.Cleanup(cancel)
			return ctx
		}, time.Minute, context.DeadlineExceeded, true},
		{"key store slower than RemoteTimeout", func(*testing.T) context.Context { return context.Background() }, time.Minute, context.DeadlineExceeded, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, func(c *Config) { c.RemoteTimeout = 50 * time.Millisecond })
			f.refresh(t)
			f.remote.Delay = tt.delay
			f.clock.Add(time.Second)
			if err := f.svc.Refresh(tt.ctx(t)); !errors.Is(err, tt.wantErr) {
				t.Fatalf("Refresh = %v; want %v", err, tt.wantErr)
			}
			st := f.svc.Stats()
			if st.Ready != tt.wantReady || (st.LastError == "") != tt.wantReady {
				t.Fatalf("Ready, LastError = %v, %q; want ready %v", st.Ready, st.LastError, tt.wantReady)
			}
		})
	}
}
