package main

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
)

// TestRun runs the benchmark small and fast, and checks the claims the full
// run reports: Status never reaches the vault, and a cold start with the
// hierarchy unwraps once.
func TestRun(t *testing.T) {
	var out bytes.Buffer
	err := run([]string{"-scale", "20000", "-seeds", "40", "-latency", "1ms", "-clients", "4", "-status-calls", "2000"}, &out)
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
