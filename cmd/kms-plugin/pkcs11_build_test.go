//go:build !pkcs11

package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// TestServePKCS11WithoutTheBuild: the default (static) binary knows the
// pkcs11 provider's flags, and serve with it fails with one line that
// names the build to use.
func TestServePKCS11WithoutTheBuild(t *testing.T) {
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"serve", "--provider", "pkcs11",
		"--endpoint", "unix://" + filepath.Join(dir, "kms.sock"), "--http-addr", "",
		"--pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "--pkcs11-token-label", "kms",
		"--pkcs11-pin-file", filepath.Join(dir, "pin"), "--pkcs11-key-label", "kek"}, &stdout, &stderr)
	if err == nil {
		t.Fatal("serve --provider pkcs11 succeeded in a build without PKCS#11")
	}
	if exitCode(err) == 0 {
		t.Fatalf("exit code 0 for %v", err)
	}
	msg := err.Error()
	if stderr.Len() != 0 || strings.Contains(msg, "\n") || !strings.Contains(msg, "built without PKCS#11 support") || !strings.Contains(msg, "CGO_ENABLED=1 go build -tags pkcs11 ./cmd/kms-plugin") {
		t.Fatalf("serve error = %q (stderr %q); want one line naming the pkcs11 build", msg, stderr.String())
	}
	t.Logf("kms-plugin: %s (stderr %q)", msg, stderr.String())
}
