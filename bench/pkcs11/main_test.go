//go:build pkcs11

package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestQuickRun runs every section small and checks the figures the report
// promises: one HSM unwrap for the cold start, none on the warm path, one
// listing per poll at idle.
func TestQuickRun(t *testing.T) {
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("SoftHSM2 is missing: bash hack/apt-install.sh softhsm2 opensc")
		}
		t.Skip("SoftHSM2 is not installed (bash hack/apt-install.sh softhsm2 opensc)")
	}
	if s, ok := os.LookupEnv("SOFTHSM2_CONF"); ok {
		t.Cleanup(func() { os.Setenv("SOFTHSM2_CONF", s) })
	} else {
		t.Cleanup(func() { os.Unsetenv("SOFTHSM2_CONF") })
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"-seeds", "50", "-calls", "200", "-idle", "3s", "-poll", "1s"}, &out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	report := out.String()
	if i := strings.Index(report, "## 3."); i < 0 || strings.Contains(report[i:], "C_Decrypt") || strings.Contains(report[i:], "C_Login") {
		t.Errorf("the idle section is missing or counts unwraps or logins:\n%s", report)
	}
	for _, want := range []string{
		"| **1** |", // cold start: one HSM unwrap
		"| every seed unwrapped in the HSM | | ",
		"warm Decrypts: **0** (none)",
		"calls into the module in the window (C_FindObjects ",
		"calls per node-hour",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
}
