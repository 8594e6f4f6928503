package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Goals for warm ops, as plugin/floor latency ratios.
const (
	goalWarmOps = 1.3
	goalStatus  = 1.1
)

// env describes the machine and the code measured.
type env struct {
	Date      time.Time
	GoVersion string
	CPU       string
	Cores     int
	MaxProcs  int
	Kernel    string
	Commit    string
	LoadStart string // /proc/loadavg at the start
	LoadEnd   string // and at the end of the run
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func collectEnv() env {
	e := env{
		Date:      time.Now().UTC(),
		GoVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		CPU:       "unknown",
		Cores:     runtime.NumCPU(),
		MaxProcs:  runtime.GOMAXPROCS(0),
		Commit:    "unknown",
		LoadStart: loadavg(),
	}
	if out, err := exec.Command("go", "version").Output(); err == nil {
		e.GoVersion = strings.TrimSpace(string(out))
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				e.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		e.Kernel = "Linux " + strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("git", "rev-parse", "HEAD").Output(); err == nil {
		e.Commit = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			e.Commit += " (with uncommitted changes to tracked files)"
		}
	}
	return e
}

// report is everything one run measured.
type report struct {
	Env     env
	Opts    options
	Args    []string
	Elapsed time.Duration

	Latency                 []latencyRow
	FloorSizes, PluginSizes wireSizes
	Throughput              []throughputRow
	Cold                    []coldResult
	RSS                     *rssResult
}

func us(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Microsecond)) }

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

func mib(kib int64) string { return fmt.Sprintf("%.1f", float64(kib)/1024) }

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// thousands formats n with thin separators: 12,345.
func thousands(n int64) string {
	s := fmt.Sprint(n)
	if n < 0 {
		return "-" + thousands(-n)
	}
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func (r *report) markdown() string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	e := r.Env
	servers := "child processes: the driver re-executes itself as `serve-noop` and `serve-plugin`, so client and server do not share a heap, GC or scheduler"
	if r.Opts.InProcess {
		servers = "in the driver's process (-inproc): client and servers share one heap and GC"
	}
	p("# kms-plugin benchmark\n\n")
	p("| | |\n|---|---|\n")
	p("| date | %s |\n", e.Date.Format("2006-01-02 15:04:05 MST"))
	p("| go | %s |\n", e.GoVersion)
	p("| CPU | %s, %d cores (GOMAXPROCS %d) |\n", e.CPU, e.Cores, e.MaxProcs)
	if e.Kernel != "" {
		p("| OS | %s |\n", e.Kernel)
	}
	p("| commit | %s |\n", e.Commit)
	p("| command | `%s` |\n", strings.TrimSpace("go run ./bench "+strings.Join(r.Args, " ")))
	p("| floor and plugin servers | %s |\n", servers)
	p("| client | `grpc.NewClient(\"unix://PATH\")` with authority `localhost`, insecure credentials, WaitForReady and a 3 s deadline per call, as kube-apiserver dials KMS v2 |\n")
	if e.LoadStart != "" {
		p("| load average (1, 5, 15 min) | %s at start, %s at end; other work on the machine inflates latency |\n", e.LoadStart, e.LoadEnd)
	}
	p("| total run time | %v |\n\n", r.Elapsed.Round(time.Second))

	if len(r.Latency) > 0 {
		o := r.Opts
		p("## 1. Warm ops: transport floor vs plugin\n\n")
		p("Sequential calls from one client connection per target: %s per op and target after %s warm-up, switching target every %d calls (and which goes first every round) to cancel drift. ", thousands(int64(o.N)), thousands(int64(o.Warmup)), o.Round)
		p("Floor: a no-op KMS v2 service on a plain `grpc.Server` with fixed answers. Plugin: `envelope.Service` over the local provider behind `internal/server`, assembled by `internal/plugin` as `kms-plugin serve` runs it (metrics observer and provider decorator, warn-level logger, poll loop; no admin HTTP), warm after Refresh and one Encrypt/Decrypt.\n\n")
		p("Encrypt response sizes: floor ciphertext %d B, key_id %d B, annotations %d B; plugin %d B, %d B, %d B. Encrypt sends a 32-byte seed; Decrypt sends that target's own warm ciphertext, key_id and annotations.\n\n",
			r.FloorSizes.Ciphertext, r.FloorSizes.KeyID, r.FloorSizes.Annotations, r.PluginSizes.Ciphertext, r.PluginSizes.KeyID, r.PluginSizes.Annotations)
		p("| op | floor p50 µs | floor p90 µs | floor p99 µs | plugin p50 µs | plugin p90 µs | plugin p99 µs | ratio p50 | ratio p99 | goal | result | errors |\n")
		p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|\n")
		for _, row := range r.Latency {
			goal := goalWarmOps
			if row.Op == opStatus {
				goal = goalStatus
			}
			r50, r99 := ratio(row.Plugin.P50, row.Floor.P50), ratio(row.Plugin.P99, row.Floor.P99)
			p("| %s | %s | %s | %s | %s | %s | %s | %.2f× | %.2f× | ≤ %.1f× | %s | %d |\n", row.Op,
				us(row.Floor.P50), us(row.Floor.P90), us(row.Floor.P99),
				us(row.Plugin.P50), us(row.Plugin.P90), us(row.Plugin.P99),
				r50, r99, goal, verdict(r50, r99, goal), row.FloorErrors+row.PluginErrors)
		}
		p("\nResult: the goal is judged on both the p50 and the p99 ratio.\n\n")
		if r.Latency[0].FloorCPU > 0 && r.Latency[0].PluginCPU > 0 {
			p("Server CPU time per call (all threads of the server process, from /proc/PID/task/*/schedstat over the measured calls; less sensitive to other load on the machine than latency):\n\n")
			p("| op | floor CPU µs/call | plugin CPU µs/call | plugin − floor µs | ratio |\n|---|---:|---:|---:|---:|\n")
			for _, row := range r.Latency {
				p("| %s | %s | %s | %s | %.2f× |\n", row.Op, us(row.FloorCPU), us(row.PluginCPU), us(row.PluginCPU-row.FloorCPU), ratio(row.PluginCPU, row.FloorCPU))
			}
			p("\n")
		}
	}

	if len(r.Throughput) > 0 {
		o := r.Opts
		p("## 2. Throughput, %d concurrent callers\n\n", o.Clients)
		p("%d goroutines call one op as fast as they can for %v per target (after %v unmeasured), over 1 shared connection (as kube-apiserver) or one connection each. The time is cut into slices of about 1 s that alternate between floor and plugin.\n\n",
			o.Clients, o.Duration, min(o.Duration/5, 500*time.Millisecond))
		p("| op | connections | floor ops/s | floor slices min–max | plugin ops/s | plugin slices min–max | plugin/floor | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, row := range r.Throughput {
			f, pl := row.Floor.PerSec(), row.Plugin.PerSec()
			rel := 0.0
			if f > 0 {
				rel = pl / f
			}
			flo, fhi := row.Floor.spread()
			plo, phi := row.Plugin.spread()
			p("| %s | %d | %s | %s–%s | %s | %s–%s | %.2f | %d |\n", row.Op, row.Conns,
				thousands(int64(f)), thousands(int64(flo)), thousands(int64(fhi)),
				thousands(int64(pl)), thousands(int64(plo)), thousands(int64(phi)),
				rel, row.Floor.Errors+row.Plugin.Errors)
		}
		p("\nBoth the load generator and the server run on the same %d cores, so these figures are the whole system's; with one shared connection gRPC batches many answers per write, which makes the rate swing from slice to slice.\n", r.Env.Cores)
		p("\n")
	}

	if len(r.Cold) > 0 {
		c0 := r.Cold[0]
		p("## 3. Cold start with a slow key store\n\n")
		p("A writer plugin encrypts %s distinct 32-byte DEK seeds over its socket (%d callers); then a fresh plugin on the same keyset, its provider wrapped by `providertest.Faulty` with Delay = %v on every call, starts (one Refresh) and decrypts all %s over its socket with %d concurrent callers on one connection, as kube-apiserver does at its start. ",
			thousands(int64(c0.Seeds)), c0.Clients, c0.Delay, thousands(int64(c0.Seeds)), c0.Clients)
		p("*hierarchy* is `envelope.Service`; *direct* is the hierarchy switched off (bench/direct.go: one provider Wrap per Encrypt, one Unwrap per Decrypt). Both servers run in the driver's process behind `internal/server` so the provider's call counters can be read. Remote calls = Faulty Wrap + Unwrap calls.\n\n")
		p("| mode | decrypt wall time | remote calls during the decrypts | reader start (Refresh) | remote calls at reader start | encrypt wall time | remote calls during the encrypts | errors |\n")
		p("|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, c := range r.Cold {
			p("| %s | %s | %s | %s | %d (+%d version poll) | %s | %s | %d |\n", c.Mode, ms(c.DecryptWall), thousands(c.DecryptRemote),
				ms(c.StartupWall), c.StartupRemote, c.StartupPolls, ms(c.EncryptWall), thousands(c.EncryptRemote), c.EncryptErrors+c.DecryptErrors)
		}
		var h, d *coldResult
		for i := range r.Cold {
			switch r.Cold[i].Mode {
			case modeHierarchy:
				h = &r.Cold[i]
			case modeDirect:
				d = &r.Cold[i]
			}
		}
		if h != nil && d != nil && h.DecryptWall > 0 {
			p("\nExpected: hierarchy 1 remote call for all the decrypts, direct one per decrypt (%s). Measured: %s vs %s. Decrypt burst speedup: **%.1f×** (%s vs %s); including the reader's start: %.1f×.\n\n",
				thousands(int64(d.Seeds)), thousands(h.DecryptRemote), thousands(d.DecryptRemote),
				ratio(d.DecryptWall, h.DecryptWall), ms(h.DecryptWall), ms(d.DecryptWall),
				ratio(d.DecryptWall+d.StartupWall, h.DecryptWall+h.StartupWall))
		}
	}

	if s := r.RSS; s != nil {
		p("## 4. Resident memory of the real binary\n\n")
		p("The binary (`%s`, %.1f MiB) runs as `serve --kek-max-uses 1 --kek-cache-size %d --log-level warn` on a temp keyset with `--http-addr` on loopback. VmRSS from /proc/PID/status.\n\n",
			s.Binary, float64(s.BinaryBytes)/(1<<20), max(20000, 2*s.Entries))
		p("| state | VmRSS MiB | notes |\n|---|---:|---|\n")
		p("| idle, %v after start | %s | goal ≤ 25 MiB: %s |\n", r.Opts.RSSIdle, mib(s.IdleKiB), okWord(s.IdleKiB <= 25<<10))
		p("| after %s Encrypts | %s | %s local KEKs made; /status cache.entries = %s; took %s |\n", thousands(int64(s.Entries)), mib(s.AfterEncryptKiB), thousands(int64(s.WriterKEKs)), thousands(int64(s.WriterEntries)), ms(s.EncryptWall))
		p("| restarted, idle | %s | |\n", mib(s.ColdIdleKiB))
		p("| restarted, after %s Decrypts, %v later | %s | /status cache.entries = %s, provider unwraps = %s; Decrypts took %s |\n", thousands(int64(s.Entries)), r.Opts.RSSIdle, mib(s.AfterDecryptKiB), thousands(int64(s.ReaderEntries)), thousands(int64(s.ReaderUnwraps)), ms(s.DecryptWall))
		p("| restarted, peak (VmHWM) | %s | |\n", mib(s.PeakKiB))
		if s.FullIdleKiB > 0 {
			p("| the full kms-plugin binary (every command, client-go linked; %.1f MiB), idle, same flags | %s | for comparison: the image runs kms-plugin-serve for the plugin |\n", float64(s.FullBinaryBytes)/(1<<20), mib(s.FullIdleKiB))
		}
		if s.Entries > 0 {
			p("\nCached entries: %s (want ≥ %s: %s). Memory per cached local KEK: about %.2f KiB ((after Decrypts − restarted idle) / entries). Errors: %d.\n\n",
				thousands(int64(s.ReaderEntries)), thousands(int64(s.Entries)), okWord(s.ReaderEntries >= s.Entries),
				float64(s.AfterDecryptKiB-s.ColdIdleKiB)/float64(s.Entries), s.EncryptErrors+s.DecryptErrors)
		}
	}
	return b.String()
}

func verdict(r50, r99, goal float64) string {
	switch {
	case r50 <= goal && r99 <= goal:
		return "met"
	case r50 <= goal:
		return "p50 met, p99 missed"
	case r99 <= goal:
		return "p50 missed, p99 met"
	default:
		return "**missed**"
	}
}

func okWord(ok bool) string {
	if ok {
		return "ok"
	}
	return "**NOT MET**"
}
