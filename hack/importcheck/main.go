// Command importcheck fails when a package of this module imports another
// one that allow.txt does not allow: it keeps the dependencies pointing
// inward (the key stores never import the layers above them, envelope
// depends on the Provider interface only, and so on). make lint runs it
// from the module root:
//
//	go run ./hack/importcheck [-allow FILE] [-packages FILE]
//
// It reads the packages with `go list ./...` (or, for tests, from a file of
// lines "PATH<TAB>IMPORTS<TAB>TEST-IMPORTS", paths as go list prints them)
// and prints one line per forbidden edge, "FROM -> TO: ...", exiting 1.
package main

import (
	"bytes"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
)

//go:embed allow.txt
var defaultAllow string

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("importcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	allowFile := fs.String("allow", "", "allow-list file (default: the allow.txt built in)")
	pkgFile := fs.String("packages", "", "read the packages from this file instead of go list (module path on the first line)")
	goCmd := fs.String("go", "go", "the go command")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	allow := defaultAllow
	if *allowFile != "" {
		b, err := os.ReadFile(*allowFile)
		if err != nil {
			fmt.Fprintf(stderr, "importcheck: %v\n", err)
			return 2
		}
		allow = string(b)
	}
	rules, err := parseRules(allow)
	if err != nil {
		fmt.Fprintf(stderr, "importcheck: allow-list: %v\n", err)
		return 2
	}
	var listing string
	if *pkgFile != "" {
		b, err := os.ReadFile(*pkgFile)
		if err != nil {
			fmt.Fprintf(stderr, "importcheck: %v\n", err)
			return 2
		}
		listing = string(b)
	} else if listing, err = goList(*goCmd); err != nil {
		fmt.Fprintf(stderr, "importcheck: %v\n", err)
		return 2
	}
	pkgs, err := parsePackages(listing)
	if err != nil {
		fmt.Fprintf(stderr, "importcheck: %v\n", err)
		return 2
	}
	problems := check(rules, pkgs)
	for _, p := range problems {
		fmt.Fprintln(stderr, p)
	}
	if len(problems) > 0 {
		fmt.Fprintf(stderr, "importcheck: %d forbidden import(s); fix the import or, if the direction is intended, hack/importcheck/allow.txt\n", len(problems))
		return 1
	}
	fmt.Fprintf(stdout, "importcheck: %d packages, imports point inward\n", len(pkgs))
	return 0
}

// goList lists the module's packages: the module path on the first line,
// then one line per package.
func goList(goCmd string) (string, error) {
	mod, err := output(goCmd, "", "list", "-m", "-f", "{{.Path}}\t{{.Dir}}")
	if err != nil {
		return "", err
	}
	path, dir, ok := strings.Cut(strings.TrimSpace(mod), "\t")
	if !ok {
		return "", fmt.Errorf("go list -m: unexpected output %q", mod)
	}
	pkgs, err := output(goCmd, dir, "list", "-e", "-f",
		"{{.ImportPath}}\t{{join .Imports \" \"}}\t{{join .TestImports \" \"}} {{join .XTestImports \" \"}}", "./...")
	if err != nil {
		return "", err
	}
	return path + "\n" + pkgs, nil
}

func output(goCmd, dir string, args ...string) (string, error) {
	cmd := exec.Command(goCmd, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %v: %s", goCmd, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// pkg is one package of the module, its paths relative to the module root
// ("." for the root); imports outside the module keep their full path.
type pkg struct {
	path        string
	imports     []string
	testImports []string
}

// parsePackages reads goList's output.
func parsePackages(s string) ([]pkg, error) {
	modPath, rest, _ := strings.Cut(s, "\n")
	modPath = strings.TrimSpace(modPath)
	if modPath == "" {
		return nil, errors.New("packages: no module path on the first line")
	}
	rel := func(p string) string {
		if p == modPath {
			return "."
		}
		if r, ok := strings.CutPrefix(p, modPath+"/"); ok {
			return r
		}
		return p
	}
	var pkgs []pkg
	for line := range strings.Lines(rest) {
		line = strings.TrimRight(line, "\r\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) > 3 {
			return nil, fmt.Errorf("packages: bad line %q", line)
		}
		for len(f) < 3 {
			f = append(f, "")
		}
		p := pkg{path: rel(f[0])}
		for _, i := range strings.Fields(f[1]) {
			p.imports = append(p.imports, rel(i))
		}
		for _, i := range strings.Fields(f[2]) {
			if i := rel(i); i != p.path && !slices.Contains(p.testImports, i) {
				p.testImports = append(p.testImports, i)
			}
		}
		pkgs = append(pkgs, p)
	}
	return pkgs, nil
}

// rule is one line of the allow-list.
type rule struct {
	line    int
	from    string // pattern
	test    bool   // adds to what test files may import
	stdOnly bool
	to      []string // patterns
}

func parseRules(s string) ([]rule, error) {
	var rules []rule
	n := 0
	for line := range strings.Lines(s) {
		n++
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		from, to, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("line %d: want PACKAGE: IMPORT ...", n)
		}
		r := rule{line: n, from: strings.TrimSpace(from)}
		if f, ok := strings.CutSuffix(r.from, "[test]"); ok {
			r.from, r.test = strings.TrimSpace(f), true
		}
		if r.from == "" || strings.ContainsAny(r.from, " \t") {
			return nil, fmt.Errorf("line %d: bad package %q", n, from)
		}
		for _, t := range strings.Fields(to) {
			if t == "std" {
				if r.test {
					return nil, fmt.Errorf("line %d: std in a [test] rule", n)
				}
				r.stdOnly = true
				continue
			}
			r.to = append(r.to, t)
		}
		if r.stdOnly && len(r.to) > 0 {
			return nil, fmt.Errorf("line %d: std with other imports", n)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// match reports whether path matches pattern, and how specifically: 0 for
// no match, higher for a more specific one (an exact path beats a /...
// pattern, a longer /... pattern a shorter one, and * is the least).
func match(pattern, path string) int {
	switch {
	case pattern == "*":
		return 1
	case pattern == path:
		return 1 << 20
	}
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		if path == base || strings.HasPrefix(path, base+"/") {
			return 2 + len(base)
		}
	}
	return 0
}

func matchesAny(patterns []string, path string) bool {
	return slices.ContainsFunc(patterns, func(p string) bool { return match(p, path) > 0 })
}

// isStd reports whether path is in the standard library: its first element
// has no dot (as goimports decides).
func isStd(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".")
}

// check returns one line per forbidden edge, per package without a rule
// and per rule that names no package.
func check(rules []rule, pkgs []pkg) []string {
	known := map[string]bool{}
	for _, p := range pkgs {
		known[p.path] = true
	}
	var problems []string
	used := make([]bool, len(rules))
	for _, p := range pkgs {
		best, bestScore := -1, 0
		var testTo []string
		for i, r := range rules {
			s := match(r.from, p.path)
			if s == 0 {
				continue
			}
			used[i] = true
			if r.test {
				testTo = append(testTo, r.to...)
			} else if s > bestScore {
				best, bestScore = i, s
			}
		}
		if best < 0 {
			problems = append(problems, fmt.Sprintf("%s: no rule in the allow-list; add a line naming what it may import", p.path))
			continue
		}
		r := rules[best]
		allowed := func(imp string, test bool) bool {
			return imp == p.path || matchesAny(r.to, imp) || (test && matchesAny(testTo, imp))
		}
		for _, imp := range p.imports {
			switch {
			case r.stdOnly && (known[imp] || !isStd(imp)):
				problems = append(problems, fmt.Sprintf("%s -> %s: %s imports only the standard library (allow-list line %d)", p.path, imp, p.path, r.line))
			case known[imp] && !allowed(imp, false):
				problems = append(problems, fmt.Sprintf("%s -> %s: not allowed; %s may import %s (allow-list line %d)", p.path, imp, p.path, describe(r), r.line))
			}
		}
		for _, imp := range p.testImports {
			if known[imp] && !allowed(imp, true) && !slices.Contains(p.imports, imp) {
				problems = append(problems, fmt.Sprintf("%s -> %s: not allowed in tests; %s may import %s, its tests also %s", p.path, imp, p.path, describe(r), orNone(testTo)))
			}
		}
	}
	for i, r := range rules {
		if !used[i] {
			problems = append(problems, fmt.Sprintf("allow-list line %d: %s matches no package; remove or fix the line", r.line, r.from))
		}
	}
	return problems
}

func describe(r rule) string {
	if r.stdOnly {
		return "only the standard library"
	}
	return orNone(r.to)
}

func orNone(ps []string) string {
	if len(ps) == 0 {
		return "no package of this module"
	}
	return strings.Join(ps, " ")
}
