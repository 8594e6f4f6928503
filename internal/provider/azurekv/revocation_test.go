package azurekv

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// node is one control-plane node's plugin: an envelope over its own
// provider, on the shared vault.
type node struct {
	t   *testing.T
	p   *Provider
	svc *envelope.Service
}

// negativeTTL is the envelope's negative-cache TTL in these tests.
const negativeTTL = 5 * time.Second

func newNode(t *testing.T, srv *kvtest.Server, keyName string, clock *clocktest.Clock, edit func(*envelope.Config)) *node {
	t.Helper()
	p := newTestProvider(t, srv, keyName, "", func(c *Config) { c.Now = clock.Now })
	cfg := envelope.Config{Provider: p, Now: clock.Now, NegativeCacheTTL: negativeTTL}
	if edit != nil {
		edit(&cfg)
	}
	svc, err := envelope.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &node{t: t, p: p, svc: svc}
}

func (n *node) refresh() {
	n.t.Helper()
	if err := n.svc.Refresh(context.Background()); err != nil {
		n.t.Fatalf("Refresh: %v", err)
	}
}

func (n *node) encrypt() *kmsservice.EncryptResponse {
	n.t.Helper()
	r, err := n.svc.Encrypt(context.Background(), "uid", randomSeed(n.t))
	if err != nil {
		n.t.Fatalf("Encrypt: %v", err)
	}
	return r
}

func (n *node) decrypt(r *kmsservice.EncryptResponse) error {
	_, err := n.svc.Decrypt(context.Background(), "uid", &kmsservice.DecryptRequest{
		Ciphertext: bytes.Clone(r.Ciphertext), KeyID: r.KeyID, Annotations: maps.Clone(r.Annotations),
	})
	return err
}

func randomSeed(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTwoNodesDisabledCurrentVersion disables the current version of a key
// with an older usable version while two nodes hold its local KEKs: after
// one poll of each, neither encrypts under it, neither decrypts its data,
// and what they write meanwhile is readable by a node started afterwards.
// Enabled again, its data is readable after the next poll, within the
// negative-cache TTL.
func TestTwoNodesDisabledCurrentVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	if _, err := srv.CreateKey("shared", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	kid2, err := srv.NewVersion("shared")
	if err != nil {
		t.Fatal(err)
	}
	a, b := newNode(t, srv, "shared", clock, nil), newNode(t, srv, "shared", clock, nil)
	a.refresh()
	b.refresh()
	before := a.encrypt()
	if err := b.decrypt(before); err != nil {
		t.Fatalf("the other node decrypts: %v", err)
	}
	if want := envelope.DeriveKeyID(Name, kid2); before.KeyID != want {
		t.Fatalf("written under key_id %q; want the current version's %q", before.KeyID, want)
	}

	if err := srv.SetEnabled("shared", lastSegment(kid2), false); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute) // the next poll
	var during []*kmsservice.EncryptResponse
	for _, n := range []*node{a, b} {
		n.refresh()
		r := n.encrypt()
		if r.KeyID == before.KeyID {
			t.Fatalf("after a poll a node still encrypts under the disabled version's key_id %q", r.KeyID)
		}
		during = append(during, r)
		if err := n.decrypt(before); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Decrypt of the disabled version's data after a poll = %v; want ErrKeyDisabled", err)
		}
	}
	fresh := newNode(t, srv, "shared", clock, nil) // a node restarted now
	fresh.refresh()
	for _, r := range during {
		for _, n := range []*node{a, b, fresh} {
			if err := n.decrypt(r); err != nil {
				t.Fatalf("Decrypt of data written after the poll: %v", err)
			}
		}
	}

	if err := srv.SetEnabled("shared", lastSegment(kid2), true); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute)
	a.refresh()
	b.refresh()
	clock.Add(negativeTTL)
	for _, n := range []*node{a, b} {
		if err := n.decrypt(before); err != nil {
			t.Fatalf("Decrypt after re-enabling and a poll: %v", err)
		}
	}
}

// TestTwoNodesDisabledOnlyVersion disables the only version of the key:
// after one poll both nodes refuse Encrypt (FailedPrecondition) and the
// data under it; enabled again, one poll brings both back at once (the
// envelope clears its negative cache when the store answers again).
func TestTwoNodesDisabledOnlyVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	kid, err := srv.CreateKey("only", kvtest.KeyTypeRSA, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := newNode(t, srv, "only", clock, nil), newNode(t, srv, "only", clock, nil)
	a.refresh()
	b.refresh()
	before := a.encrypt()
	if err := b.decrypt(before); err != nil {
		t.Fatal(err)
	}
	if err := srv.SetEnabled("only", lastSegment(kid), false); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute)
	for _, n := range []*node{a, b} {
		if err := n.svc.Refresh(context.Background()); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("poll of a key with its only version disabled = %v; want ErrKeyDisabled", err)
		}
		if _, err := n.svc.Encrypt(context.Background(), "uid", randomSeed(t)); !errors.Is(err, envelope.ErrRevoked) {
			t.Fatalf("Encrypt with no usable version = %v; want ErrRevoked (FailedPrecondition)", err)
		}
		if _, err := n.p.Wrap(context.Background(), randomSeed(t)); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Wrap with no usable version = %v; want ErrKeyDisabled", err)
		}
		if err := n.decrypt(before); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Decrypt of the disabled version's data = %v; want ErrKeyDisabled", err)
		}
	}
	if err := srv.SetEnabled("only", lastSegment(kid), true); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute)
	for _, n := range []*node{a, b} {
		n.refresh()
		if err := n.decrypt(before); err != nil {
			t.Fatalf("Decrypt right after the poll that saw the version enabled again: %v", err)
		}
		n.encrypt()
	}
}

// TestWrapRechecksTheVersion disables the current version after the last
// poll: a Wrap made later (a local KEK at its age or usage limit) must not
// use it, in local and in-vault wrapping, and with or without an older
// usable version.
func TestWrapRechecksTheVersion(t *testing.T) {
	for _, tt := range []struct {
		name        string
		wrapInVault bool
		versions    int
		wait        time.Duration // after the poll
	}{
		{"local, fallback", false, 2, time.Minute},
		{"local, only version", false, 1, time.Minute},
		{"in vault, fallback", true, 2, time.Minute},
		{"in vault, right after the poll", true, 2, 0},
		{"in vault, only version", true, 1, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, kvtest.Options{})
			clock := clocktest.New(time.Now())
			kid1, _ := srv.CreateKey("k", kvtest.KeyTypeRSA, 0)
			cur := kid1
			if tt.versions == 2 {
				cur, _ = srv.NewVersion("k")
			}
			p := newTestProvider(t, srv, "k", "", func(c *Config) { c.Now, c.WrapInVault = clock.Now, tt.wrapInVault })
			ctx := context.Background()
			if v, err := p.CurrentVersion(ctx); err != nil || v != cur {
				t.Fatalf("CurrentVersion = %q, %v", v, err)
			}
			if err := srv.SetEnabled("k", lastSegment(cur), false); err != nil {
				t.Fatal(err)
			}
			clock.Add(tt.wait)
			w, err := p.Wrap(ctx, randomSeed(t))
			if tt.versions == 1 {
				if !errors.Is(err, provider.ErrKeyDisabled) {
					t.Fatalf("Wrap with the only version disabled = %q, %v; want ErrKeyDisabled", w.Version, err)
				}
				return
			}
			if want := kid1 + "#after=" + lastSegment(cur); err != nil || w.Version != want {
				t.Fatalf("Wrap after the current version was disabled = %q, %v; want %q", w.Version, err, want)
			}
			// Another node unwraps it.
			other := newTestProvider(t, srv, "k", "", nil)
			if _, err := other.Unwrap(ctx, w); err != nil {
				t.Fatalf("Unwrap on another node: %v", err)
			}
		})
	}
}

// TestAgeLimitAfterDisable replaces a local KEK at its age limit after the
// current version was disabled, before the next poll: the new local KEK is
// wrapped with a usable version, so a node started later reads what it
// encrypted.
func TestAgeLimitAfterDisable(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	if _, err := srv.CreateKey("aging", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	kid2, _ := srv.NewVersion("aging")
	a := newNode(t, srv, "aging", clock, func(c *envelope.Config) { c.KEKMaxAge = time.Hour })
	a.refresh()
	first := a.encrypt()
	if err := srv.SetEnabled("aging", lastSegment(kid2), false); err != nil {
		t.Fatal(err)
	}
	clock.Add(2 * time.Hour) // past the age limit; no poll yet
	r := a.encrypt()
	if r.KeyID == first.KeyID {
		t.Fatalf("the local KEK made at its age limit is under the disabled version (key_id %q)", r.KeyID)
	}
	later := newNode(t, srv, "aging", clock, nil)
	later.refresh()
	if err := later.decrypt(r); err != nil {
		t.Fatalf("a node started later cannot read what was written: %v", err)
	}
}

// TestRevokedVersions checks the answer of RevokedVersions for every state
// of a version, and that it costs one listing per key name.
func TestRevokedVersions(t *testing.T) {
	srv := startServer(t, kvtest.Options{PageSize: 2})
	kid1, _ := srv.CreateKey("k", kvtest.KeyTypeRSA, 0) // enabled
	kid2, _ := srv.NewVersion("k")                      // disabled
	kid3, _ := srv.NewVersion("k")                      // expired
	kid4, _ := srv.NewVersion("k")                      // not yet valid
	kid5, _ := srv.NewVersion("k")                      // current
	other, _ := srv.CreateKey("other", kvtest.KeyTypeRSA, 0)
	goneKID, _ := srv.CreateKey("gone", kvtest.KeyTypeRSA, 0)
	past, future := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	if err := errors.Join(
		srv.SetEnabled("k", lastSegment(kid2), false),
		srv.SetValidity("k", lastSegment(kid3), nil, &past),
		srv.SetValidity("k", lastSegment(kid4), &future, nil),
		srv.DeleteKey("gone"),
	); err != nil {
		t.Fatal(err)
	}
	p := newTestProvider(t, srv, "k", "", nil)
	ctx := context.Background()
	if v, err := p.CurrentVersion(ctx); err != nil || v != kid5 {
		t.Fatalf("CurrentVersion = %q, %v", v, err)
	}
	unknown := strings.TrimSuffix(kid1, lastSegment(kid1)) + "0123456789abcdef0123456789abcdef"
	versions := []string{
		kid1, kid2, kid3, kid4, kid5,
		kid1 + "#after=" + lastSegment(kid5), kid2 + "#after=" + lastSegment(kid5),
		unknown, other, goneKID,
		strings.Replace(kid1, srv.VaultHost(), "other.vault.azure.net", 1), "not a version", strings.ToUpper(kid2),
	}
	want := []string{kid2, kid3, kid4, kid2 + "#after=" + lastSegment(kid5), unknown, goneKID}
	check := func(t *testing.T) {
		t.Helper()
		got, err := p.RevokedVersions(ctx, versions)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(got)
		w := slices.Clone(want)
		slices.Sort(w)
		if !slices.Equal(got, w) {
			t.Fatalf("RevokedVersions = %q\nwant %q", got, w)
		}
	}
	t.Run("listing", func(t *testing.T) {
		srv.ResetCalls()
		check(t)
		if got := srv.AllCalls(); got["list"] != 5 || srv.VaultCalls() != 5 { // k takes 3 pages
			t.Fatalf("RevokedVersions made %v calls; want one listing of each of k (3 pages), other, gone", got)
		}
	})
	t.Run("only the version just polled", func(t *testing.T) {
		if _, err := p.CurrentVersion(ctx); err != nil {
			t.Fatal(err)
		}
		srv.ResetCalls()
		if got, err := p.RevokedVersions(ctx, []string{kid5}); err != nil || len(got) != 0 {
			t.Fatalf("RevokedVersions(current) = %q, %v", got, err)
		}
		if got := srv.VaultCalls(); got != 0 {
			t.Fatalf("checking the version the poll just saw made %d vault calls", got)
		}
	})
	t.Run("without the list permission", func(t *testing.T) {
		q := newTestProvider(t, srv, "k", "", nil)
		if _, err := q.CurrentVersion(ctx); err != nil {
			t.Fatal(err)
		}
		app := srv.LastPrincipal()
		srv.SetPermissions(app, kvtest.PermGet, kvtest.PermUnwrapKey)
		got, err := q.RevokedVersions(ctx, []string{kid1, kid2, kid2 + "#after=" + lastSegment(kid5), kid3})
		if err != nil {
			t.Fatal(err)
		}
		if w := []string{kid2, kid2 + "#after=" + lastSegment(kid5), kid3}; !slices.Equal(got, w) {
			t.Fatalf("RevokedVersions by GET = %q; want %q", got, w)
		}
	})
}

// TestBackwardsPollListsOnce polls a key whose newest version is disabled
// while a local KEK of an older version is cached: the poll lists the
// versions once, for the fallback and the check of the cached versions.
func TestBackwardsPollListsOnce(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	if _, err := srv.CreateKey("back", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	a := newNode(t, srv, "back", clock, nil)
	a.refresh()
	old := a.encrypt() // under v1, cached
	if _, err := srv.NewVersion("back"); err != nil {
		t.Fatal(err)
	}
	kid3, _ := srv.NewVersion("back")
	clock.Add(time.Minute)
	a.refresh()
	if err := srv.SetEnabled("back", lastSegment(kid3), false); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute)
	a.refresh() // falls back to v2
	for range 3 {
		clock.Add(time.Minute)
		srv.ResetCalls()
		a.refresh()
		if got := srv.AllCalls(); got["get"] != 1 || got["list"] != 1 || srv.VaultCalls() != 2 {
			t.Fatalf("a backwards poll with an older version cached made %v calls; want 1 get and 1 list", got)
		}
	}
	if err := a.decrypt(old); err != nil {
		t.Fatalf("Decrypt under the older, enabled version: %v", err)
	}
}
