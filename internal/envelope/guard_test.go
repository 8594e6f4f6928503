package envelope

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

// forgedRequests returns n Decrypt requests that each carry a distinct,
// well-formed wrapped local KEK under version (random bytes: the store
// cannot authenticate them) with the key_id an attacker can compute.
func forgedRequests(t *testing.T, template *kmsservice.EncryptResponse, providerName, version string, n int) []*kmsservice.DecryptRequest {
	t.Helper()
	out := make([]*kmsservice.DecryptRequest, n)
	for i := range out {
		wrapped := make([]byte, 60)
		if _, err := rand.Read(wrapped); err != nil {
			t.Fatal(err)
		}
		req := decryptRequest(template)
		req.Annotations[AnnotationLocalKEK] = encodeLocalKEK(version, wrapped)
		req.KeyID = DeriveKeyID(providerName, version)
		out[i] = req
	}
	return out
}

// writtenObject returns a writer plugin on its own keyset and one object
// it encrypted, for tests of another plugin reading it.
func writtenObject(t *testing.T) (*fixture, *kmsservice.EncryptResponse) {
	t.Helper()
	writer := newFixture(t, nil)
	writer.refresh(t)
	resp, err := writer.svc.Encrypt(context.Background(), "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	return writer, resp
}

// refusingProvider answers every Unwrap with err, counting calls and the
// most calls in flight at once.
type refusingProvider struct {
	provider.Provider
	err              error
	delay            time.Duration
	calls, inFlight  atomic.Int64
	mu               sync.Mutex
	maxInFlightCalls int64
}

func (p *refusingProvider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	p.calls.Add(1)
	n := p.inFlight.Add(1)
	defer p.inFlight.Add(-1)
	p.mu.Lock()
	p.maxInFlightCalls = max(p.maxInFlightCalls, n)
	p.mu.Unlock()
	if p.delay > 0 {
		select {
		case <-time.After(p.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return nil, p.err
}

// TestReplayedRefusedUnwrapCostsOneCall replays one wrapped local KEK that
// the store refuses: only the first Decrypt reaches the store until the
// negative cache entry expires, whatever the refusal.
func TestReplayedRefusedUnwrapCostsOneCall(t *testing.T) {
	for _, refusal := range []error{provider.ErrKeyDisabled, provider.ErrKeyNotFound, provider.ErrPermissionDenied, provider.ErrInvalidCiphertext} {
		t.Run(refusal.Error(), func(t *testing.T) {
			ctx := context.Background()
			writer := newFixture(t, nil)
			writer.refresh(t)
			resp, err := writer.svc.Encrypt(ctx, "uid", seed(t))
			if err != nil {
				t.Fatal(err)
			}
			remote := &refusingProvider{Provider: writer.local, err: fmt.Errorf("store says: %w", refusal)}
			reader := newFixture(t, func(c *Config) { c.Provider = remote; c.NegativeCacheTTL = time.Minute })
			for i := range 1000 {
				_, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp))
				if !errors.Is(err, refusal) {
					t.Fatalf("Decrypt %d = %v; want %v", i, err, refusal)
				}
			}
			if got := remote.calls.Load(); got != 1 {
				t.Fatalf("store unwraps for 1000 replays = %d; want 1", got)
			}
			st := reader.svc.Stats()
			if st.NegativeHits != 999 || st.UnwrapFailures != 1 || st.CacheEntries != 0 {
				t.Fatalf("stats = negative hits %d, failures %d, cache entries %d; want 999, 1, 0 (a refusal is never cached as a key)", st.NegativeHits, st.UnwrapFailures, st.CacheEntries)
			}
			// After the TTL the store is asked again: a re-enabled version
			// comes back.
			reader.clock.Add(time.Minute)
			remote.err = nil
			reader.svc.provider = writer.local
			if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); err != nil {
				t.Fatalf("Decrypt after the negative TTL with the store answering: %v", err)
			}
		})
	}
}

// TestUnreachableStoreIsNotRemembered checks that an outage is never
// negatively cached: reads recover as soon as the store does.
func TestUnreachableStoreIsNotRemembered(t *testing.T) {
	ctx := context.Background()
	writer, resp := writtenObject(t)
	remote := providertest.NewFaulty(writer.local)
	reader := newFixture(t, func(c *Config) { c.Provider = remote })
	remote.SetError(provider.ErrUnavailable)
	for range 3 {
		if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); !errors.Is(err, provider.ErrUnavailable) {
			t.Fatalf("Decrypt during outage = %v; want ErrUnavailable", err)
		}
	}
	if got := remote.UnwrapCalls.Load(); got != 3 {
		t.Fatalf("unwraps during outage = %d; want 3 (outages are not remembered)", got)
	}
	remote.SetError(nil)
	if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); err != nil {
		t.Fatalf("Decrypt after the outage: %v", err)
	}
}

// TestForgedFloodIsRateLimited sends distinct forged wrapped KEKs, each a
// cache miss the negative cache cannot know: the store sees no more than the
// unwrap burst plus the rate over the flood, the rest fail fast as
// throttled, and a warm legitimate Decrypt keeps working throughout.
func TestForgedFloodIsRateLimited(t *testing.T) {
	ctx := context.Background()
	writer, resp := writtenObject(t)
	remote := &refusingProvider{Provider: writer.local, err: provider.ErrInvalidCiphertext}
	const burst = 10
	reader := newFixture(t, func(c *Config) {
		c.Provider = remote
		c.UnwrapRate = 1 // per second
		c.UnwrapBurst = burst
	})
	reader.refresh(t)
	version := mustVersion(t, writer.local)
	forged := forgedRequests(t, resp, reader.svc.provider.Name(), version, 2000)

	start := time.Now()
	var throttled, refused atomic.Int64
	var wg sync.WaitGroup
	for _, req := range forged {
		wg.Go(func() {
			dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			defer cancel()
			_, err := reader.svc.Decrypt(dctx, "uid", req)
			switch {
			case errors.Is(err, ErrUnwrapThrottled):
				throttled.Add(1)
			case errors.Is(err, provider.ErrInvalidCiphertext):
				refused.Add(1)
			default:
				t.Errorf("forged Decrypt = %v; want throttled or refused", err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	limit := int64(burst) + int64(elapsed.Seconds()+1)
	if got := remote.calls.Load(); got > limit {
		t.Fatalf("store unwraps for 2000 forged misses = %d; want at most burst+rate*elapsed = %d", got, limit)
	}
	if throttled.Load() == 0 || refused.Load()+throttled.Load() != 2000 {
		t.Fatalf("throttled %d, refused %d; want most of 2000 throttled", throttled.Load(), refused.Load())
	}
	if reader.svc.Stats().UnwrapsThrottled != uint64(throttled.Load()) {
		t.Fatalf("UnwrapsThrottled = %d; want %d", reader.svc.Stats().UnwrapsThrottled, throttled.Load())
	}
	// The reader's own writes stay readable: its active local KEK is a
	// cache hit, which the limit never touches.
	own, err := reader.svc.Encrypt(ctx, "uid", seed(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(own)); err != nil {
		t.Fatalf("warm Decrypt under the flood: %v", err)
	}
}

// TestUnwrapConcurrencyBounded checks that slow remote unwraps never exceed
// MaxConcurrentUnwraps in flight, however many distinct misses arrive.
func TestUnwrapConcurrencyBounded(t *testing.T) {
	ctx := context.Background()
	writer, resp := writtenObject(t)
	remote := &refusingProvider{Provider: writer.local, err: provider.ErrInvalidCiphertext, delay: 20 * time.Millisecond}
	reader := newFixture(t, func(c *Config) {
		c.Provider = remote
		c.MaxConcurrentUnwraps = 3
		c.UnwrapRate, c.UnwrapBurst = 10000, 10000
	})
	forged := forgedRequests(t, resp, reader.svc.provider.Name(), mustVersion(t, writer.local), 60)
	var wg sync.WaitGroup
	for _, req := range forged {
		wg.Go(func() { _, _ = reader.svc.Decrypt(ctx, "uid", req) })
	}
	wg.Wait()
	if remote.maxInFlightCalls > 3 || remote.maxInFlightCalls == 0 {
		t.Fatalf("most unwraps in flight = %d; want 1..3", remote.maxInFlightCalls)
	}
	if got := remote.calls.Load(); got != 60 {
		t.Fatalf("unwraps = %d; want 60 (each distinct miss, none dropped with a generous deadline)", got)
	}
}

func TestNegativeCacheBounded(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := newNegativeCache(3, time.Minute)
	for i := range 5 {
		c.add([32]byte{byte(i)}, provider.ErrKeyNotFound, now)
	}
	if c.len() != 3 {
		t.Fatalf("len = %d; want the bound 3", c.len())
	}
	if _, ok := c.get([32]byte{0}, now); ok {
		t.Fatal("oldest entry survived eviction")
	}
	if _, ok := c.get([32]byte{4}, now); !ok {
		t.Fatal("newest entry was evicted")
	}
	if _, ok := c.get([32]byte{4}, now.Add(time.Minute)); ok {
		t.Fatal("entry outlived its TTL")
	}
}

// TestRespelledLengthIsRefused re-encodes a genuine lkek annotation's length
// varint in longer, non-minimal forms: each decodes to the same version and
// wrapped key but would be a new cache key, so each must be refused before
// it costs an unwrap or takes a cache slot.
func TestRespelledLengthIsRefused(t *testing.T) {
	ctx := context.Background()
	writer, resp := writtenObject(t)
	remote := providertest.NewFaulty(writer.local)
	reader := newFixture(t, func(c *Config) { c.Provider = remote })
	genuine := resp.Annotations[AnnotationLocalKEK]
	version, wrapped, err := decodeLocalKEK(genuine)
	if err != nil {
		t.Fatal(err)
	}
	for extra := 1; extra <= 8; extra++ {
		// len(version) with continuation bytes of zero value appended.
		length := binary.AppendUvarint(nil, uint64(len(version)))
		length[len(length)-1] |= 0x80
		for range extra - 1 {
			length = append(length, 0x80)
		}
		length = append(length, 0x00)
		ann := append(append(append([]byte{genuine[0]}, length...), version...), wrapped...)
		req := decryptRequest(resp)
		req.Annotations[AnnotationLocalKEK] = ann
		if _, err := reader.svc.Decrypt(ctx, "uid", req); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("Decrypt with a %d-byte longer length = %v; want ErrInvalidInput", extra, err)
		}
	}
	if n := remote.UnwrapCalls.Load(); n != 0 {
		t.Fatalf("unwraps for respelled lengths = %d; want 0", n)
	}
	if _, err := reader.svc.Decrypt(ctx, "uid", decryptRequest(resp)); err != nil {
		t.Fatalf("the genuine annotation: %v", err)
	}
}
