package rotationbench

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// Env describes where the benchmark ran, for the report.
type Env struct {
	Date                                 time.Time
	CPUs                                 int
	GoVersion, Kernel                    string
	Plugin, KubeAPIServer, Etcd, Kubectl string // versions
}

// WriteMarkdown writes the report of results (one per size).
func WriteMarkdown(w io.Writer, env Env, results []*Result) error {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# Key rotation: `kms-plugin rotate` vs `kubectl get | kubectl replace`\n\n")
	p("Recorded %s on %d CPUs (%s, %s). kube-apiserver %s, etcd %s (TLS), kubectl %s, %s.\n",
		env.Date.Format("2006-01-02"), env.CPUs, env.Kernel, env.GoVersion, env.KubeAPIServer, env.Etcd, env.Kubectl, env.Plugin)
	p("Regenerate: `cd e2e && go run ./cmd/rotationbench -sizes 1000,10000 -out ../bench/results/rotation.md` (see e2e/README.md).\n\n")
	p("One control-plane node on loopback: etcd, one kube-apiserver, one `kms-plugin serve` on the Azure Key Vault test server\n")
	p("(kvtestd, RSA-3072 key, plugin polls the vault every second). N Secrets of 1 KiB random data in namespaces of 1,000.\n")
	p("On the same cluster, in this order:\n\n")
	p("1. **kubectl path** (the documented runbook): a new key version in the vault; wait until kube-apiserver writes with\n")
	p("   the new key_id (\"key switch\"); then `kubectl get secrets -A -o json | kubectl replace -f -` (\"pipe\").\n")
	p("2. **`kms-plugin rotate --migration update`**, with its other defaults (workers 32, QPS 1000) and then with the flags\n")
	p("   in the \"rotate flags\" column, each a full rotation after the previous one: preflight, new key version,\n")
	p("   converge (canary read back from etcd), re-encrypt, verify, retire. \"Total\" is the process's wall time; stage times\n")
	p("   come from its state ConfigMap (each stage from the previous one's finish to its own). `--migration update` because\n")
	p("   the harness runs no kube-controller-manager: with the default `auto` rotate would wait `--svm-start-timeout` (2 min)\n")
	p("   for a StorageVersionMigration controller before falling back to the same updates.\n\n")
	p("Both paths end with `kms-plugin verify --expect-key-id` over etcd; a row is only written when both show stale = 0.\n")
	p("Peak RSS is each process's `ru_maxrss` (wait4). kube-apiserver /readyz is probed every 3 s (as a kubelet would),\n")
	p("so it picks up a new key_id within ~20 s instead of its one-minute Status poll.\n\n")

	if len(results) > 0 {
		p("## Summary\n\n")
		small, large := results[0], results[len(results)-1]
		for _, x := range large.Rotates {
			p("- N = %d, rotate %s: re-encryption %s the kubectl pipe's speed (%.0f vs %.0f objects/s), end to end %s (goal: ≥ 3×).\n",
				large.Secrets, flags(x.Args), ratio(large.Kubectl.Pipe, x.Stages["reencrypt"]), x.ReencryptRate(), large.KubectlRate(), ratio(large.Kubectl.KeySwitch+large.Kubectl.Pipe, x.Total))
		}
		if len(results) > 1 && len(small.Rotates) > 0 && len(large.Rotates) > 0 {
			p("- Peak RSS from N = %d to N = %d: kms-plugin rotate (defaults) %.0f → %.0f MiB; kubectl get %.0f → %.0f MiB, kubectl replace %.0f → %.0f MiB (goal: flat).\n",
				small.Secrets, large.Secrets, mib(small.Rotates[0].Process.MaxRSS), mib(large.Rotates[0].Process.MaxRSS),
				mib(small.Kubectl.Get.MaxRSS), mib(large.Kubectl.Get.MaxRSS), mib(small.Kubectl.Replace.MaxRSS), mib(large.Kubectl.Replace.MaxRSS))
		}
		p("- Both paths are limited by this machine: kube-apiserver, etcd, the plugin and the client share %d CPUs. kubectl\n", env.CPUs)
		p("  replace sends one request at a time, and, as measured, no client-side rate limit holds it back; rotate\n")
		p("  rewrites in parallel up to its `--qps` cap (default 1000; the `--qps 200 --workers 8` row shows a conservative pace).\n\n")
	}
	p("## Results\n\n")
	p("| N | kubectl pipe | kubectl obj/s | rotate flags | rotate re-encrypt | rotate obj/s | speed-up (re-encrypt) | kubectl key switch + pipe | rotate total | speed-up (end to end) |\n")
	p("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		manual := r.Kubectl.KeySwitch + r.Kubectl.Pipe
		for _, x := range r.Rotates {
			re := x.Stages["reencrypt"]
			p("| %d | %s | %.0f | %s | %s | %.0f | %s | %s | %s | %s |\n", r.Secrets, dur(r.Kubectl.Pipe), r.KubectlRate(), flags(x.Args), dur(re), x.ReencryptRate(),
				ratio(r.Kubectl.Pipe, re), dur(manual), dur(x.Total), ratio(manual, x.Total))
		}
	}
	p("\n### Peak memory (RSS)\n\n")
	p("| N | kubectl get | kubectl replace | kubectl get -o json size | rotate flags | kms-plugin rotate |\n|---:|---:|---:|---:|---|---:|\n")
	for _, r := range results {
		for _, x := range r.Rotates {
			p("| %d | %.0f MiB | %.0f MiB | %.1f MiB | %s | %.0f MiB |\n", r.Secrets, mib(r.Kubectl.Get.MaxRSS), mib(r.Kubectl.Replace.MaxRSS), mib(r.Kubectl.JSONBytes), flags(x.Args), mib(x.Process.MaxRSS))
		}
	}
	p("\n### kms-plugin rotate stages\n\n")
	stages := []string{"preflight", "rotate", "converge", "reencrypt", "verify", "retire"}
	p("| N | rotate flags | %s | rewritten |\n|---:|---|%s---:|\n", strings.Join(stages, " | "), strings.Repeat("---:|", len(stages)))
	for _, r := range results {
		for _, x := range r.Rotates {
			var cells []string
			for _, s := range stages {
				cells = append(cells, dur(x.Stages[s]))
			}
			p("| %d | %s | %s | %d |\n", r.Secrets, flags(x.Args), strings.Join(cells, " | "), x.Rewritten)
		}
	}
	p("\n### Key-store calls (kvtestd counters)\n\n")
	p("Counted from just before the pipe (kubectl path) or the rotate process started until it ended; both include the\n")
	p("plugin's own version poll (\"get\", about one per second) and its token requests.\n\n")
	p("| N | path | calls by operation |\n|---:|---|---|\n")
	for _, r := range results {
		p("| %d | kubectl | %s |\n", r.Secrets, callsString(r.Kubectl.Calls))
		for _, x := range r.Rotates {
			p("| %d | rotate %s | %s |\n", r.Secrets, flags(x.Args), callsString(x.Calls))
		}
	}
	p("\n### Verify after each path\n\n| N | path | key_id | objects | stale | unencrypted |\n|---:|---|---|---:|---:|---:|\n")
	type row struct {
		path, keyID string
		report      cluster.VerifyReport
	}
	for _, r := range results {
		rows := []row{{"kubectl", r.KubectlID, r.Kubectl.Verify}}
		for _, x := range r.Rotates {
			rows = append(rows, row{"rotate " + flags(x.Args), x.KeyID, x.Verify})
		}
		for _, x := range rows {
			total, unencrypted := 0, 0
			for _, res := range x.report.Resources {
				total += res.Total
				unencrypted += res.Unencrypted
			}
			p("| %d | %s | `%s` | %d | %d | %d |\n", r.Secrets, x.path, x.keyID, total, x.report.Stale, unencrypted)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func flags(args []string) string {
	if len(args) == 0 {
		return "(defaults)"
	}
	return "`" + strings.Join(args, " ") + "`"
}

func callsString(calls map[string]int64) string {
	keys := slices.Sorted(maps.Keys(calls))
	var parts []string
	for _, k := range keys {
		if k == "vault" || calls[k] == 0 {
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %d", k, calls[k]))
	}
	return fmt.Sprintf("**%d vault requests**: %s", calls["vault"], strings.Join(parts, ", "))
}

func dur(d time.Duration) string {
	if d == 0 {
		return "–"
	}
	if d < 10*time.Second {
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

func ratio(a, b time.Duration) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f×", a.Seconds()/b.Seconds())
}
