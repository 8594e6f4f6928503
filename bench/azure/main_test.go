package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/plugin"
)

// TestRun runs the benchmark small and fast, and checks the claims the full
// run reports: Status never reaches the vault, and a cold start with the
// hierarchy unwraps once.
func TestRun(t *testing.T) {
	var out bytes.Buffer
	err := run([]string{"-scale", "20000", "-seeds", "40", "-latency", "1ms", "-clients", "4", "-status-calls", "2000", "-forged", "0"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	text := out.String()
	if !strings.Contains(text, "2000 Status calls made **0** vault calls") {
		t.Fatalf("Status reached the vault:\n%s", text)
	}
	// Hierarchy on: 1 unwrapkey per local KEK (one here) for 40 seeds.
	on := regexp.MustCompile(`(?m)^\| on \| \d+ \| [^|]+ \| [^|]+ \| \d+ \| (\d+) \|$`).FindAllStringSubmatch(text, -1)
	off := regexp.MustCompile(`(?m)^\| off \| \d+ \| [^|]+ \| [^|]+ \| \d+ \| (\d+) \|$`).FindAllStringSubmatch(text, -1)
	if len(on) != 2 || len(off) != 2 {
		t.Fatalf("cold start rows missing:\n%s", text)
	}
	for _, m := range on {
		if m[1] != "1" {
			t.Fatalf("hierarchy on made %s unwrapkey calls; want 1\n%s", m[1], text)
		}
	}
	for _, m := range off {
		if m[1] != "40" {
			t.Fatalf("hierarchy off made %s unwrapkey calls; want 40\n%s", m[1], text)
		}
	}
}

// TestForgedFlood checks the flood's claims at a smaller size: forged
// version spellings of a genuine wrapped KEK cost the vault nothing, leave
// the legitimate workload's cache hit rate where it was, and are logged
// rate-limited.
func TestForgedFlood(t *testing.T) {
	ctx := context.Background()
	base, err := forgedFlood(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	res, err := forgedFlood(ctx, 2000)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("baseline %+v; flood %+v", base, res)
	if res.vaultUnwraps > 10 {
		t.Errorf("vault unwrapkey requests during 2000 forged Decrypts = %d; want at most 10", res.vaultUnwraps)
	}
	if res.forgedRefused != res.forged {
		t.Errorf("forged Decrypts refused = %d of %d", res.forgedRefused, res.forged)
	}
	if res.legitHitRate() < base.legitHitRate() {
		t.Errorf("legitimate cache hit rate fell from %.4f to %.4f under the flood", base.legitHitRate(), res.legitHitRate())
	}
	if res.logLines > 100 {
		t.Errorf("log lines during the flood = %d; want at most 100", res.logLines)
	}
}

// TestStartupPollsTheVaultOnce starts the shipped assembly on the
// azurekeyvault provider: the first poll before the socket opens counts as
// the poll loop's first, so start-up reads the key exactly as often as one
// poll of a fresh provider does (that poll's GET plus the SDK's
// unauthenticated challenge GET), not twice as often.
func TestStartupPollsTheVaultOnce(t *testing.T) {
	onePoll := func() int64 {
		e, err := newEnv("kms-kek")
		if err != nil {
			t.Fatal(err)
		}
		defer e.close()
		p, err := e.provider("kms-kek", false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.CurrentVersion(context.Background()); err != nil {
			t.Fatal(err)
		}
		return e.srv.Calls("get")
	}()
	e, err := newEnv("kms-kek")
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	p, err := e.provider("kms-kek", false)
	if err != nil {
		t.Fatal(err)
	}
	pl, err := plugin.New(plugin.Config{Provider: p, Endpoint: "unix://" + t.TempDir() + "/kms.sock"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pl.Run(ctx) }()
	<-pl.Ready()
	time.Sleep(300 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := e.srv.Calls("get"); got != onePoll {
		t.Fatalf("key GETs at start-up = %d (all calls %v); want %d, one poll's worth", got, e.srv.AllCalls(), onePoll)
	}
}
