package main

import (
	"context"
	"fmt"
	"sync/atomic"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// directVersionAnnotation carries the remote key version that wrapped a
// direct ciphertext, so Decrypt can ask the provider to unwrap with it.
const directVersionAnnotation = "remote-version.bench.kms-plugin.io"

// direct is the key hierarchy switched off, for comparison only: every
// Encrypt is one provider Wrap of the DEK seed and every Decrypt one provider
// Unwrap, as plugins without a local KEK work. Status answers from the
// version Refresh last saw and never calls the provider.
type direct struct {
	p     provider.Provider
	keyID atomic.Pointer[string]
}

var _ kmsservice.Service = (*direct)(nil)

func newDirect(p provider.Provider) *direct { return &direct{p: p} }

// Refresh asks the provider for its current version (one remote call).
func (d *direct) Refresh(ctx context.Context) error {
	v, err := d.p.CurrentVersion(ctx)
	if err != nil {
		return fmt.Errorf("direct: refresh: %w", err)
	}
	id := directKeyID(d.p, v)
	d.keyID.Store(&id)
	return nil
}

func directKeyID(p provider.Provider, version string) string {
	return envelope.DeriveKeyID("direct-"+p.Name(), version)
}

func (d *direct) Status(context.Context) (*kmsservice.StatusResponse, error) {
	id := d.keyID.Load()
	if id == nil {
		return &kmsservice.StatusResponse{Version: "v2", Healthz: "not ready", KeyID: "pending"}, nil
	}
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: *id}, nil
}

func (d *direct) Encrypt(ctx context.Context, _ string, plaintext []byte) (*kmsservice.EncryptResponse, error) {
	w, err := d.p.Wrap(ctx, plaintext)
	if err != nil {
		return nil, fmt.Errorf("direct: %w", err)
	}
	return &kmsservice.EncryptResponse{
		Ciphertext:  w.Ciphertext,
		KeyID:       directKeyID(d.p, w.Version),
		Annotations: map[string][]byte{directVersionAnnotation: []byte(w.Version)},
	}, nil
}

func (d *direct) Decrypt(ctx context.Context, _ string, req *kmsservice.DecryptRequest) ([]byte, error) {
	v := string(req.Annotations[directVersionAnnotation])
	if v == "" || req.KeyID != directKeyID(d.p, v) {
		return nil, fmt.Errorf("direct: %w: key_id does not match the version annotation", envelope.ErrInvalidInput)
	}
	pt, err := d.p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: req.Ciphertext})
	if err != nil {
		return nil, fmt.Errorf("direct: %w", err)
	}
	return pt, nil
}
