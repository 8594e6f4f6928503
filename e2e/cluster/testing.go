package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"
)

// TempDir makes a directory for one test's processes under the system
// temporary directory (not t.TempDir: Unix socket paths under it must stay
// short). It is removed when t ends, unless t failed: then it is kept and
// its path logged.
func TempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("state and logs kept in %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// WaitFor calls f every interval until it returns nil. When timeout passes
// or ctx ends first, it fails t with f's last error.
func WaitFor(ctx context.Context, t testing.TB, timeout, interval time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("waiting for %s: gave up after %v: %v", what, timeout, err)
		}
		time.Sleep(interval)
	}
}

// RandomHex returns n random bytes as 2n hex digits.
func RandomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return hex.EncodeToString(b)
}
