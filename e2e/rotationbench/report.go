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
	p("2. **`kms-plugin rotate`**, with its defaults (updates, workers 32, QPS 1000) and then with the flags\n")
	p("   in the \"rotate flags\" column, each a full rotation after the previous one: preflight, new key version,\n")
	p("   converge (canary read back from etcd), re-encrypt, verify, retire. \"Total\" is the process's wall time; stage times\n")
	p("   come from its state ConfigMap (each stage from the previous one's finish to its own).\n\n")
	p("Both paths end with `kms-plugin verify --expect-key-id` over etcd; a row is only written when both show stale = 0.\n")
	p("Peak RSS is each process's `ru_maxrss` (wait4). kube-apiserver /readyz is probed every 3 s (as a kubelet would),\n")
	p("so it picks up a new key_id within ~20 s instead of its one-minute Status poll.\n\n")

	p("Each size runs both paths %s, alternating, on the same cluster; tables give medians over the runs, and the last\n", times(results))
	p("table every run. **Pickup** is the time from the plugin reporting the new key_id to kube-apiserver writing with it,\n")
	p("seen the same way for both paths by a watcher that polls the plugin's /status and writes a probe Secret read back\n")
	p("from etcd every 200 ms. kube-apiserver learns a new key_id only when it next asks the plugin for its Status: its\n")
	p("cached health answer lives 20 s (`kmsPluginHealthzPositiveTTL`), so pickup is anywhere from 0 to ~20 s whatever\n")
	p("the client does. **Work** is the total without the pickup: everything a rotation tool can make faster.\n\n")

	if len(results) > 0 {
		p("## Summary\n\n")
		for _, r := range results {
			k := r.kubectlMedian()
			for _, v := range r.variants() {
				x := r.rotateMedian(v)
				p("- N = %d, rotate %s: work %s faster than the kubectl path (%s vs %s); re-encryption %s (%.0f vs %.0f objects/s); end to end, pickup included, %s (%s vs %s).\n",
					r.Secrets, v, ratio(k.work, x.work), dur(x.work), dur(k.work), ratio(k.rewrite, x.rewrite), x.rate, k.rate, ratio(k.total, x.total), dur(x.total), dur(k.total))
			}
		}
		if len(results) > 1 {
			small, large := results[0], results[len(results)-1]
			d := flags(nil)
			p("- Peak RSS from N = %d to N = %d: kms-plugin rotate (defaults) %.0f → %.0f MiB; kubectl get %.0f → %.0f MiB, kubectl replace %.0f → %.0f MiB (goal: flat).\n",
				small.Secrets, large.Secrets, small.rotateMedian(d).rss, large.rotateMedian(d).rss,
				small.kubectlMedian().getRSS, large.kubectlMedian().getRSS, small.kubectlMedian().rss, large.kubectlMedian().rss)
		}
		p("- Both paths are limited by this machine: kube-apiserver, etcd, the plugin and the client share %d CPUs. kubectl\n", env.CPUs)
		p("  replace sends one request at a time; rotate rewrites in parallel up to its `--qps` cap (default 1000) until\n")
		p("  kube-apiserver and etcd use both CPUs (see the CPU columns).\n\n")
	}
	p("## Results (medians)\n\n")
	p("| N | path | total | pickup | work | speed-up (work) | rewrite | obj/s | speed-up (rewrite) | speed-up (end to end) | peak RSS | client CPU | control-plane CPU per object |\n")
	p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		k := r.kubectlMedian()
		p("| %d | kubectl get \\| replace | %s | %s | %s | | %s | %.0f | | | %.0f + %.0f MiB | %s | %s |\n", r.Secrets, dur(k.total), dur(k.pickup), dur(k.work), dur(k.rewrite), k.rate, k.getRSS, k.rss, dur(k.cpu), usPer(k.serverCPU, k.objects))
		for _, v := range r.variants() {
			x := r.rotateMedian(v)
			p("| %d | rotate %s | %s | %s | %s | %s | %s | %.0f | %s | %s | %.0f MiB | %s | %s |\n", r.Secrets, v, dur(x.total), dur(x.pickup), dur(x.work), ratio(k.work, x.work),
				dur(x.rewrite), x.rate, ratio(k.rewrite, x.rewrite), ratio(k.total, x.total), x.rss, dur(x.cpu), usPer(x.serverCPU, x.objects))
		}
	}
	p("\n\"rewrite\" is the kubectl pipe or rotate's re-encrypt stage. Client CPU is user + system time of kubectl get and\n")
	p("replace, or of the rotate process; control-plane CPU is kube-apiserver + etcd + plugin + vault during the pipe, or\n")
	p("from kube-apiserver's switch to the end of rotate (re-encrypt, verify, retire), per object rewritten.\n")

	p("\n### kms-plugin rotate stages (medians)\n\n")
	stages := []string{"preflight", "rotate", "converge", "reencrypt", "verify", "retire"}
	p("| N | rotate flags | %s | rewritten |\n|---:|---|%s---:|\n", strings.Join(stages, " | "), strings.Repeat("---:|", len(stages)))
	for _, r := range results {
		for _, v := range r.variants() {
			xs := r.rotatesOf(v)
			var cells []string
			for _, st := range stages {
				cells = append(cells, dur(median(xs, func(x Rotate) time.Duration { return x.Stages[st] })))
			}
			p("| %d | %s | %s | %d |\n", r.Secrets, v, strings.Join(cells, " | "), xs[len(xs)-1].Rewritten)
		}
	}
	p("\nconverge = the plugin's pickup (rotate asks it to refresh at once) + kube-apiserver's pickup + the canary's read-back.\n")

	p("\n### Every run\n\n| N | run | path | total | plugin pickup | kube-apiserver pickup | work | rewrite | peak RSS |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		per := len(r.Rotates) / max(1, len(r.Kubectls))
		for i, k := range r.Kubectls {
			p("| %d | %d | kubectl | %s | %s | %s | %s | %s | %.0f MiB |\n", r.Secrets, i+1, dur(k.Total()), dur(k.Switch.Plugin), dur(k.Switch.Pickup()), dur(k.Total()-k.Switch.Pickup()), dur(k.Pipe), mib(k.Replace.MaxRSS))
			for j := i * per; j < (i+1)*per && j < len(r.Rotates); j++ {
				x := r.Rotates[j]
				p("| %d | %d | rotate %s | %s | %s | %s | %s | %s | %.0f MiB |\n", r.Secrets, i+1, flags(x.Args), dur(x.Total), dur(x.Switch.Plugin), dur(x.Switch.Pickup()), dur(x.Total-x.Switch.Pickup()), dur(x.Stages["reencrypt"]), mib(x.Process.MaxRSS))
			}
		}
	}
	p("\n### Key-store calls (kvtestd counters)\n\n")
	p("Counted from just before the pipe (kubectl path) or the rotate process started until it ended (last run of each);\n")
	p("both include the plugin's own version poll (\"get\", about one per second) and its token requests.\n\n")
	p("| N | path | calls by operation |\n|---:|---|---|\n")
	for _, r := range results {
		p("| %d | kubectl | %s |\n", r.Secrets, callsString(r.Kubectls[len(r.Kubectls)-1].Calls))
		for _, v := range r.variants() {
			xs := r.rotatesOf(v)
			p("| %d | rotate %s | %s |\n", r.Secrets, v, callsString(xs[len(xs)-1].Calls))
		}
	}
	p("\n### Verify after each path\n\n| N | path | key_id | objects | stale | unencrypted |\n|---:|---|---|---:|---:|---:|\n")
	type row struct {
		path, keyID string
		report      cluster.VerifyReport
	}
	for _, r := range results {
		var rows []row
		for _, k := range r.Kubectls {
			rows = append(rows, row{"kubectl", k.KeyID, k.Verify})
		}
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

// summary is the medians of one path's runs.
type summary struct {
	total, pickup, work, rewrite, cpu time.Duration
	serverCPU                         time.Duration
	objects                           int64
	rate, rss, getRSS                 float64
}

func (r *Result) kubectlMedian() summary {
	ks := r.Kubectls
	if len(ks) == 0 {
		return summary{}
	}
	return summary{
		total:     median(ks, func(k Kubectl) time.Duration { return k.Total() }),
		pickup:    median(ks, func(k Kubectl) time.Duration { return k.Switch.Pickup() }),
		work:      median(ks, func(k Kubectl) time.Duration { return k.Total() - k.Switch.Pickup() }),
		rewrite:   median(ks, func(k Kubectl) time.Duration { return k.Pipe }),
		cpu:       median(ks, func(k Kubectl) time.Duration { return k.Get.CPU + k.Replace.CPU }),
		serverCPU: median(ks, func(k Kubectl) time.Duration { return k.ServerCPU.Total() }),
		objects:   int64(ks[len(ks)-1].Replaced),
		rate:      medianF(ks, func(k Kubectl) float64 { return k.Rate() }),
		rss:       medianF(ks, func(k Kubectl) float64 { return mib(k.Replace.MaxRSS) }),
		getRSS:    medianF(ks, func(k Kubectl) float64 { return mib(k.Get.MaxRSS) }),
	}
}

// variants lists the rotate flag sets in the order they ran.
func (r *Result) variants() []string {
	var out []string
	for _, x := range r.Rotates {
		if f := flags(x.Args); !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

func (r *Result) rotatesOf(variant string) []Rotate {
	var out []Rotate
	for _, x := range r.Rotates {
		if flags(x.Args) == variant {
			out = append(out, x)
		}
	}
	return out
}

func (r *Result) rotateMedian(variant string) summary {
	xs := r.rotatesOf(variant)
	if len(xs) == 0 {
		return summary{}
	}
	return summary{
		total:     median(xs, func(x Rotate) time.Duration { return x.Total }),
		pickup:    median(xs, func(x Rotate) time.Duration { return x.Switch.Pickup() }),
		work:      median(xs, func(x Rotate) time.Duration { return x.Total - x.Switch.Pickup() }),
		rewrite:   median(xs, func(x Rotate) time.Duration { return x.Stages["reencrypt"] }),
		cpu:       median(xs, func(x Rotate) time.Duration { return x.Process.CPU }),
		serverCPU: median(xs, func(x Rotate) time.Duration { return x.ServerCPU.Total() }),
		objects:   xs[len(xs)-1].Rewritten,
		rate:      medianF(xs, func(x Rotate) float64 { return x.ReencryptRate() }),
		rss:       medianF(xs, func(x Rotate) float64 { return mib(x.Process.MaxRSS) }),
	}
}

// median is the median of f over xs (the mean of the middle two for an
// even count).
func median[T any](xs []T, f func(T) time.Duration) time.Duration {
	return time.Duration(medianF(xs, func(x T) float64 { return float64(f(x)) }))
}

func medianF[T any](xs []T, f func(T) float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func times(results []*Result) string {
	if len(results) == 0 || len(results[0].Kubectls) <= 1 {
		return "once"
	}
	return fmt.Sprintf("%d times", len(results[0].Kubectls))
}

func usPer(d time.Duration, n int64) string {
	if n == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f µs", float64(d.Microseconds())/float64(n))
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
