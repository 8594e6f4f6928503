//go:build !serveonly

package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestServeOnlyBuild builds the serve-only binary (kms-plugin-serve, the
// image's plugin) and checks that it links neither client-go nor the
// Kubernetes API types, that serve, keyset, doctor and version are in it,
// and that the cluster commands say which binary to use instead.
func TestServeOnlyBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("no go command: %v", err)
	}
	deps, err := exec.Command(goBin, "list", "-tags", "serveonly", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -tags serveonly -deps: %v", err)
	}
	for _, heavy := range []string{"k8s.io/client-go/", "k8s.io/api/", "go.etcd.io/etcd/client"} {
		if strings.Contains(string(deps), heavy) {
			t.Errorf("the serve-only build links %s", heavy)
		}
	}
	bin := filepath.Join(t.TempDir(), "kms-plugin-serve")
	build := exec.Command(goBin, "build", "-tags", "serveonly", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags serveonly: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		args     []string
		wantCode int
		want     string
	}{
		{[]string{"version"}, 0, "KMS API v2"},
		{[]string{"serve", "-h"}, 0, "Usage: kms-plugin serve"},
		{[]string{"keyset", "-h"}, 0, "keyset"},
		{[]string{"doctor", "-h"}, 0, "doctor"},
		{[]string{"rotate"}, 1, "run 'kms-plugin rotate' with the full kms-plugin binary"},
		{[]string{"reencrypt"}, 1, "run 'kms-plugin reencrypt' with the full kms-plugin binary"},
		{[]string{"install", "--dry-run"}, 1, "serve-only build"},
		{[]string{"status"}, 1, "serve-only build"},
	} {
		out, err := exec.Command(bin, tc.args...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.wantCode || !strings.Contains(string(out), tc.want) {
			t.Errorf("kms-plugin-serve %s = exit %d, %q; want exit %d and %q", strings.Join(tc.args, " "), code, out, tc.wantCode, tc.want)
		}
	}
}
