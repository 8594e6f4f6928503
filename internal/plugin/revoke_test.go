package plugin

import (
	"context"
	"encoding/binary"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// TestAssemblyRevokesAndRefusesForgedVersions drives the shipped assembly,
// whose key store sits behind the metrics decorator: a retired version
// stops decrypting at the next poll (the decorator must pass the store's
// VersionChecker through), and a forged spelling of a genuine version is
// refused without a provider unwrap (VersionValidator likewise).
func TestAssemblyRevokesAndRefusesForgedVersions(t *testing.T) {
	dir := t.TempDir()
	keyset := filepath.Join(dir, "keyset.json")
	store, err := local.New(local.Config{Path: keyset, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "kms.sock")
	p, err := New(Config{Provider: store, Endpoint: "unix://" + sock, HTTPAddr: "127.0.0.1:0", PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := start(t, ctx, p)
	defer func() { cancel(); _ = wait(t, done) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()

	old, err := client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "t"})
	if err != nil {
		t.Fatal(err)
	}
	oldVersion, _ := store.CurrentVersion(ctx)

	// A forged spelling: leading zero, with the key_id it derives.
	forged := &kmsapi.DecryptRequest{Ciphertext: old.Ciphertext, KeyId: envelope.DeriveKeyID(local.Name, "0"+oldVersion), Annotations: map[string][]byte{}, Uid: "t"}
	for k, v := range old.Annotations {
		forged.Annotations[k] = v
	}
	forged.Annotations[envelope.AnnotationLocalKEK] = respell(old.Annotations[envelope.AnnotationLocalKEK], "0"+oldVersion)
	unwrapsBefore := p.Stats().ProviderUnwrap
	if _, err := client.Decrypt(cctx, forged); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Decrypt with a forged version spelling = %v; want InvalidArgument", err)
	}
	if st := p.Stats(); st.ProviderUnwrap != unwrapsBefore || st.VersionsRefused != 1 {
		t.Fatalf("forged spelling: provider unwraps %d -> %d, versions refused %d; want no unwrap and 1 refused", unwrapsBefore, st.ProviderUnwrap, st.VersionsRefused)
	}

	// Rotate, let the plugin move on, then retire the old version.
	if _, err := store.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	refresh := func() {
		t.Helper()
		resp, err := http.Post("http://"+p.HTTPAddr()+"/refresh", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST /refresh = %d", resp.StatusCode)
		}
	}
	refresh()
	if _, err := client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: old.Ciphertext, KeyId: old.KeyId, Annotations: old.Annotations, Uid: "t"}); err != nil {
		t.Fatalf("Decrypt of old data before retire: %v", err)
	}
	if err := store.Retire(ctx, oldVersion); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // /refresh allows one store call a second
	refresh()
	_, err = client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: old.Ciphertext, KeyId: old.KeyId, Annotations: old.Annotations, Uid: "t"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "disabled") {
		t.Fatalf("Decrypt of data under the retired version after one poll = %v; want FailedPrecondition (disabled)", err)
	}
}

// respell rewrites an lkek annotation's version, keeping its wrapped key.
func respell(a []byte, version string) []byte {
	l, n := binary.Uvarint(a[1:])
	wrapped := a[1+n+int(l):]
	out := []byte{a[0]}
	out = binary.AppendUvarint(out, uint64(len(version)))
	out = append(out, version...)
	return append(out, wrapped...)
}
