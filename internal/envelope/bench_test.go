package envelope

import (
	"context"
	"testing"
)

func BenchmarkEncrypt(b *testing.B) {
	f := newFixture(b, nil)
	if err := f.svc.Refresh(context.Background()); err != nil {
		b.Fatal(err)
	}
	pt := seed(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.svc.Encrypt(context.Background(), "", pt); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecryptWarm(b *testing.B) {
	f := newFixture(b, nil)
	if err := f.svc.Refresh(context.Background()); err != nil {
		b.Fatal(err)
	}
	r, err := f.svc.Encrypt(context.Background(), "", seed(b))
	if err != nil {
		b.Fatal(err)
	}
	req := decryptRequest(r)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.svc.Decrypt(context.Background(), "", req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStatus(b *testing.B) {
	f := newFixture(b, nil)
	if err := f.svc.Refresh(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.svc.Status(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}
