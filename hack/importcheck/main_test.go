package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const mod = "example.com/m"

// listing builds goList output for the module example.com/m from lines
// "PATH<TAB>IMPORTS<TAB>TEST-IMPORTS" with paths relative to the module.
func listing(lines ...string) string {
	var b strings.Builder
	b.WriteString(mod + "\n")
	for _, l := range lines {
		f := strings.Split(l, "\t")
		for i := range f {
			var abs []string
			for _, p := range strings.Fields(f[i]) {
				if strings.HasPrefix(p, "internal/") || p == "internal" {
					p = mod + "/" + p
				}
				abs = append(abs, p)
			}
			f[i] = strings.Join(abs, " ")
		}
		b.WriteString(strings.Join(f, "\t") + "\n")
	}
	return b.String()
}

const testAllow = `
internal/provider: std
internal/provider/local: internal/provider
internal/envelope: internal/provider
internal/server: internal/envelope internal/provider
* [test]: internal/provider/local
`

// ok is a module whose imports all point inward.
var ok = []string{
	"internal/provider\tcontext errors",
	"internal/provider/local\tinternal/provider os\tinternal/provider/local",
	"internal/envelope\tinternal/provider crypto/aes\tinternal/provider/local",
	"internal/server\tinternal/envelope internal/provider google.golang.org/grpc",
}

func TestCheck(t *testing.T) {
	rules, err := parseRules(testAllow)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		pkgs []string
		want []string // substrings, one per problem
	}{
		{"inward", ok, nil},
		{"store imports envelope", replace(ok, 1, "internal/provider/local\tinternal/provider internal/envelope"),
			[]string{"internal/provider/local -> internal/envelope: not allowed"}},
		{"provider imports a store", replace(ok, 0, "internal/provider\tcontext internal/provider/local"),
			[]string{"internal/provider -> internal/provider/local: internal/provider imports only the standard library"}},
		{"provider imports a module", replace(ok, 0, "internal/provider\tcontext go.uber.org/zap"),
			[]string{"internal/provider -> go.uber.org/zap: internal/provider imports only the standard library"}},
		{"envelope imports server", replace(ok, 2, "internal/envelope\tinternal/provider internal/server"),
			[]string{"internal/envelope -> internal/server: not allowed; internal/envelope may import internal/provider"}},
		{"test imports upward", replace(ok, 2, "internal/envelope\tinternal/provider\tinternal/server"),
			[]string{"internal/envelope -> internal/server: not allowed in tests"}},
		{"package without a rule", append(ok, "internal/extra\t"),
			[]string{"internal/extra: no rule"}},
		{"rule without a package", ok[1:],
			[]string{"allow-list line 2: internal/provider matches no package"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pkgs, err := parsePackages(listing(tt.pkgs...))
			if err != nil {
				t.Fatal(err)
			}
			got := check(rules, pkgs)
			if len(got) != len(tt.want) {
				t.Fatalf("check = %q; want %d problems like %q", got, len(tt.want), tt.want)
			}
			for i, w := range tt.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("problem %d = %q; want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}

func replace(lines []string, i int, line string) []string {
	out := append([]string(nil), lines...)
	out[i] = line
	return out
}

func TestMatch(t *testing.T) {
	for _, tt := range []struct {
		pattern, path string
		match         bool
	}{
		{"internal/provider", "internal/provider", true},
		{"internal/provider", "internal/provider/local", false},
		{"internal/provider/...", "internal/provider", true},
		{"internal/provider/...", "internal/provider/local", true},
		{"internal/provider/...", "internal/providers", false},
		{"*", "bench", true},
	} {
		if got := match(tt.pattern, tt.path) > 0; got != tt.match {
			t.Errorf("match(%q, %q) = %v; want %v", tt.pattern, tt.path, got, tt.match)
		}
	}
	if match("internal/provider/local", "internal/provider/local") <= match("internal/provider/...", "internal/provider/local") {
		t.Error("an exact rule is not more specific than a /... rule")
	}
	if match("internal/provider/...", "internal/provider/local") <= match("internal/...", "internal/provider/local") {
		t.Error("a longer /... rule is not more specific than a shorter one")
	}
}

func TestParseRulesErrors(t *testing.T) {
	for _, s := range []string{"internal/x internal/y", "a: std b", "a [test]: std", ": b"} {
		if _, err := parseRules(s); err == nil {
			t.Errorf("parseRules(%q) succeeded; want an error", s)
		}
	}
}

// TestRunFails runs the command on a forbidden edge and checks the exit
// code and that the edge is named.
func TestRunFails(t *testing.T) {
	dir := t.TempDir()
	allow := filepath.Join(dir, "allow.txt")
	pkgs := filepath.Join(dir, "packages.txt")
	os.WriteFile(allow, []byte(testAllow), 0o600)
	os.WriteFile(pkgs, []byte(listing(replace(ok, 1, "internal/provider/local\tinternal/provider internal/envelope")...)), 0o600)
	var out, errOut bytes.Buffer
	code := run([]string{"-allow", allow, "-packages", pkgs}, &out, &errOut)
	if code != 1 || !strings.Contains(errOut.String(), "internal/provider/local -> internal/envelope") {
		t.Fatalf("run = %d, stderr %q; want 1 naming internal/provider/local -> internal/envelope", code, errOut.String())
	}

	os.WriteFile(pkgs, []byte(listing(ok...)), 0o600)
	out.Reset()
	errOut.Reset()
	if code := run([]string{"-allow", allow, "-packages", pkgs}, &out, &errOut); code != 0 {
		t.Fatalf("run on inward imports = %d, stderr %q; want 0", code, errOut.String())
	}
}

// TestModule checks this module against the built-in allow-list, as make
// lint does.
func TestModule(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	var out, errOut bytes.Buffer
	if code := run(nil, &out, &errOut); code != 0 {
		t.Fatalf("importcheck on this module = %d:\n%s", code, errOut.String())
	}
}
