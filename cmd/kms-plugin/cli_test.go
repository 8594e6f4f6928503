//go:build !serveonly

package main

import (
	"strings"
	"testing"
)

// commands are every command and subcommand, as typed after kms-plugin.
var commands = [][]string{
	{"serve"},
	{"keyset"},
	{"keyset", "rotate"},
	{"keyset", "list"},
	{"keyset", "retire"},
	{"doctor"},
	{"install"},
	{"uninstall"},
	{"rotate"},
	{"reencrypt"},
	{"verify"},
	{"status"},
	{"version"},
}

// TestHelp checks that COMMAND -h, COMMAND --help and help COMMAND print
// the command's usage to stdout and exit 0, without doing anything else.
func TestHelp(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", t.TempDir())
	for _, cmd := range commands {
		name := "kms-plugin " + strings.Join(cmd, " ")
		// The usage names the command (keyset's subcommands share keyset's).
		want := "Usage: kms-plugin " + cmd[0]
		for _, args := range [][]string{
			append(append([]string{}, cmd...), "-h"),
			append(append([]string{}, cmd...), "--help"),
			append([]string{"help"}, cmd...),
		} {
			t.Run(strings.Join(args, " "), func(t *testing.T) {
				out, errOut, err := runCmd(t, args...)
				if code := codeOf(err); code != 0 {
					t.Fatalf("exit code %d (%v), stderr %q; want 0", code, err, errOut)
				}
				if !strings.Contains(out, want) {
					t.Fatalf("stdout %q; want the usage of %s (%q)", out, name, want)
				}
				if errOut != "" {
					t.Errorf("stderr %q; want nothing", errOut)
				}
			})
		}
	}
}

// TestUsageErrors checks that an unknown flag exits 2 with one line that
// names the flag and points at -h, without the whole usage.
func TestUsageErrors(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", t.TempDir())
	for _, cmd := range commands {
		args := append(append([]string{}, cmd...), "--no-such-flag")
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			out, errOut, err := runCmd(t, args...)
			if code := codeOf(err); code != 2 {
				t.Fatalf("exit code %d (%v), stderr %q; want 2", code, err, errOut)
			}
			if out != "" {
				t.Errorf("stdout %q; want nothing", out)
			}
			if !strings.Contains(errOut, "no-such-flag") || !strings.Contains(errOut, "-h") {
				t.Errorf("stderr %q; want the flag named and a hint to run -h", errOut)
			}
			if n := strings.Count(strings.TrimSpace(errOut), "\n"); n != 0 || strings.Contains(errOut, "Usage") {
				t.Errorf("stderr %q; want one line, no usage", errOut)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", t.TempDir())
	for _, tt := range []struct {
		args   []string
		code   int
		stdout string // contained in stdout
		stderr string // contained in stderr
	}{
		{nil, 2, "", "Usage: kms-plugin COMMAND"},
		{[]string{"help"}, 0, "Usage: kms-plugin COMMAND", ""},
		{[]string{"-h"}, 0, "Usage: kms-plugin COMMAND", ""},
		{[]string{"--help"}, 0, "Usage: kms-plugin COMMAND", ""},
		{[]string{"--version"}, 0, "kms-plugin dev", ""},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"keyset"}, 2, "", "Subcommands"},
		{[]string{"keyset", "melt"}, 2, "", `unknown subcommand "melt"`},
		{[]string{"keyset", "retire"}, 2, "", "missing VERSION"},
		{[]string{"version", "extra"}, 2, "", `unexpected arguments: ["extra"]`},
		{[]string{"status", "--timeout", "soon"}, 2, "", `invalid value "soon" for flag -timeout`},
		{[]string{"serve", "--provider", "gcp"}, 1, "", ""},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, errOut, err := runCmd(t, tt.args...)
			if code := codeOf(err); code != tt.code {
				t.Fatalf("exit code %d (%v), stderr %q; want %d", code, err, errOut, tt.code)
			}
			if !strings.Contains(out, tt.stdout) || !strings.Contains(errOut, tt.stderr) {
				t.Fatalf("stdout %q, stderr %q; want %q and %q in them", out, errOut, tt.stdout, tt.stderr)
			}
		})
	}
}

// codeOf is the process exit code main makes of run's error.
func codeOf(err error) int {
	if err == nil {
		return 0
	}
	return exitCode(err)
}
