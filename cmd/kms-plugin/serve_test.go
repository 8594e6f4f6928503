//go:build !serveonly

package main

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/admin"
)

// TestServeRefresh checks that POST /refresh makes a running plugin pick up a
// rotated keyset at once, long before its next poll.
func TestServeRefresh(t *testing.T) {
	dir := t.TempDir()
	keyset := filepath.Join(dir, "keyset.json")
	httpAddr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := startServe(t, ctx, dir, "--local-keyset", keyset, "--http-addr", httpAddr, "--provider-poll-interval", "1h")

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "kms.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	before, err := client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCmd(t, "keyset", "rotate", "--local-keyset", keyset); err != nil {
		t.Fatal(err)
	}

	base := "http://" + httpAddr
	resp, err := http.Post(base+"/refresh", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var doc admin.Status
	err = json.NewDecoder(resp.Body).Decode(&doc)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("POST /refresh = %s, %v; want 200 and a status document", resp.Status, err)
	}
	after, err := client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if after.KeyId == before.KeyId || doc.KeyID != after.KeyId {
		t.Fatalf("key_id before %q, after %q, /refresh answered %q; want a new key_id, answered by /refresh", before.KeyId, after.KeyId, doc.KeyID)
	}

	for _, tt := range []struct {
		method string
		want   int
	}{
		{http.MethodPost, http.StatusTooManyRequests}, // within the default 1 s
		{http.MethodGet, http.StatusMethodNotAllowed},
	} {
		req, _ := http.NewRequestWithContext(ctx, tt.method, base+"/refresh", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s /refresh = %s; want %d", tt.method, resp.Status, tt.want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve = %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop")
	}
}
