package install

import (
	"bytes"
	"fmt"
	"regexp"
)

// maxDiffCells bounds the table of the line diff; beyond it the changed
// middle of the file is shown as removed and added whole (still a correct
// diff, only longer).
const maxDiffCells = 4 << 20

// unifiedDiff returns the unified diff (as diff -u prints it) that turns a
// into b, with ctx lines of context, or nothing when they are equal.
func unifiedDiff(oldName, newName string, a, b []byte, ctx int) []byte {
	if bytes.Equal(a, b) {
		return nil
	}
	x, y := splitLines(a), splitLines(b)
	ops := diffLines(x, y)

	var buf bytes.Buffer
	fmt.Fprintf(&buf, "--- %s\n+++ %s\n", oldName, newName)
	// Group the edit script into hunks: runs of changes with at most 2*ctx
	// equal lines between them.
	for start := 0; start < len(ops); {
		for start < len(ops) && ops[start].kind == ' ' {
			start++
		}
		if start == len(ops) {
			break
		}
		end := start
		for {
			for end < len(ops) && ops[end].kind != ' ' {
				end++
			}
			eq := end
			for eq < len(ops) && ops[eq].kind == ' ' {
				eq++
			}
			if eq < len(ops) && eq-end <= 2*ctx {
				end = eq
				continue
			}
			break
		}
		lo, hi := max(start-ctx, 0), min(end+ctx, len(ops))
		writeHunk(&buf, ops[lo:hi])
		start = hi
	}
	return buf.Bytes()
}

type diffOp struct {
	kind       byte // ' ', '-' or '+'
	line       string
	aLine, bLn int // 1-based line numbers in a and b before this op
}

func writeHunk(buf *bytes.Buffer, ops []diffOp) {
	aStart, bStart := ops[0].aLine, ops[0].bLn
	var aCount, bCount int
	for _, op := range ops {
		if op.kind != '+' {
			aCount++
		}
		if op.kind != '-' {
			bCount++
		}
	}
	// An empty range names the line before it (0 at the start).
	if aCount == 0 {
		aStart--
	}
	if bCount == 0 {
		bStart--
	}
	fmt.Fprintf(buf, "@@ -%d,%d +%d,%d @@\n", aStart, aCount, bStart, bCount)
	for _, op := range ops {
		buf.WriteByte(op.kind)
		buf.WriteString(op.line)
		if len(op.line) == 0 || op.line[len(op.line)-1] != '\n' {
			buf.WriteString("\n\\ No newline at end of file\n")
		}
	}
}

func splitLines(b []byte) []string {
	var lines []string
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			lines = append(lines, string(b))
			break
		}
		lines = append(lines, string(b[:i+1]))
		b = b[i+1:]
	}
	return lines
}

// diffLines computes an edit script with a longest common subsequence over
// the part of x and y between their common prefix and suffix.
func diffLines(x, y []string) []diffOp {
	pre := 0
	for pre < len(x) && pre < len(y) && x[pre] == y[pre] {
		pre++
	}
	suf := 0
	for suf < len(x)-pre && suf < len(y)-pre && x[len(x)-1-suf] == y[len(y)-1-suf] {
		suf++
	}
	mx, my := x[pre:len(x)-suf], y[pre:len(y)-suf]

	var ops []diffOp
	ai, bi := 1, 1
	emit := func(kind byte, line string) {
		ops = append(ops, diffOp{kind: kind, line: line, aLine: ai, bLn: bi})
		if kind != '+' {
			ai++
		}
		if kind != '-' {
			bi++
		}
	}
	for _, l := range x[:pre] {
		emit(' ', l)
	}
	n, m := len(mx), len(my)
	if n*m > maxDiffCells {
		for _, l := range mx {
			emit('-', l)
		}
		for _, l := range my {
			emit('+', l)
		}
	} else {
		// lcs[i][j] = LCS length of mx[i:] and my[j:].
		lcs := make([][]int32, n+1)
		for i := range lcs {
			lcs[i] = make([]int32, m+1)
		}
		for i := n - 1; i >= 0; i-- {
			for j := m - 1; j >= 0; j-- {
				if mx[i] == my[j] {
					lcs[i][j] = lcs[i+1][j+1] + 1
				} else {
					lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
				}
			}
		}
		i, j := 0, 0
		for i < n || j < m {
			switch {
			case i < n && j < m && mx[i] == my[j]:
				emit(' ', mx[i])
				i++
				j++
			case j < m && (i == n || lcs[i][j+1] > lcs[i+1][j]):
				emit('+', my[j])
				j++
			default:
				emit('-', mx[i])
				i++
			}
		}
	}
	for _, l := range x[len(x)-suf:] {
		emit(' ', l)
	}
	return ops
}

// secretField matches a YAML "secret: VALUE" field, in block or flow
// style, as in aescbc, aesgcm and secretbox keys.
var secretField = regexp.MustCompile(`(\bsecret:[ \t]*)("[^"\n]*"|'[^'\n]*'|[^\s,}]+)`)

// redactSecrets hides the values of secret: fields in a diff.
func redactSecrets(d []byte) []byte {
	return secretField.ReplaceAll(d, []byte("${1}<redacted>"))
}
