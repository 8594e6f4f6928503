// Command bench is kms-plugin's socket load driver. In one run it measures,
// side by side, the plugin against a no-op KMS v2 server (the transport
// floor) over real Unix sockets with the real gRPC client, the cold start of
// a plugin whose key store is slow with and without the key hierarchy,
// throughput under 64 concurrent callers, and the resident memory of the
// real binary with 10,000 cached local KEKs. It writes a Markdown report.
//
//	go run ./bench                 # full run, about 1.5 minutes on 2 cores
//	go run ./bench -quick          # smoke run, under a minute
//	go run ./bench -only latency   # one section
//
// The hidden subcommands "serve-noop" and "serve-plugin" are the servers:
// the driver re-executes itself to run them in child processes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "serve-" + kindFloor, "serve-" + kindPlugin:
			if err := runChild(strings.TrimPrefix(os.Args[1], "serve-"), os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "bench %s: %v\n", os.Args[1], err)
				os.Exit(1)
			}
			return
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		}
		os.Exit(1)
	}
}

func newFlagSet(name string) *flag.FlagSet {
	return flag.NewFlagSet(name, flag.ContinueOnError)
}

// Sections, in run order.
const (
	secLatency    = "latency"
	secThroughput = "throughput"
	secCold       = "cold"
	secRSS        = "rss"
)

var allSections = []string{secLatency, secThroughput, secCold, secRSS}

// options are the command-line settings.
type options struct {
	Out         string
	N, Warmup   int
	Round       int
	Quick       bool
	Duration    time.Duration
	Clients     int
	Seeds       int
	ColdClients int
	Delay       time.Duration
	RSSEntries  int
	RSSIdle     time.Duration
	InProcess   bool
	PluginBin   string
	ProfileDir  string
	Only        []string
}

func parseOptions(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := newFlagSet("bench")
	fs.SetOutput(stderr)
	fs.StringVar(&o.Out, "out", filepath.Join("bench", "results", "latest.md"), "write the Markdown report here (and to stdout); empty: stdout only")
	fs.IntVar(&o.N, "n", 20000, "measured calls per op and target in each latency series")
	fs.IntVar(&o.Warmup, "warmup", 1000, "unmeasured calls per op and target before each latency series")
	fs.IntVar(&o.Round, "round", 100, "latency calls per target before switching to the other target")
	fs.BoolVar(&o.Quick, "quick", false, "smoke run under a minute: -n 2000 -warmup 200 -duration 2s -rss-entries 2000 -rss-idle 1s unless set")
	fs.DurationVar(&o.Duration, "duration", 5*time.Second, "measured time of each throughput run")
	fs.IntVar(&o.Clients, "clients", 64, "concurrent callers in the throughput runs")
	fs.IntVar(&o.Seeds, "seeds", 1000, "distinct DEK seeds in the cold-start runs")
	fs.IntVar(&o.ColdClients, "cold-clients", 8, "concurrent Decrypt callers in the cold-start runs")
	fs.DurationVar(&o.Delay, "delay", 20*time.Millisecond, "latency of the slow key store in the cold-start runs")
	fs.IntVar(&o.RSSEntries, "rss-entries", 10000, "local KEKs made and then cached in the RSS run")
	fs.DurationVar(&o.RSSIdle, "rss-idle", 2*time.Second, "wait before reading an idle or settled RSS")
	fs.BoolVar(&o.InProcess, "inproc", false, "serve the floor and the plugin in the driver's own process instead of child processes")
	fs.StringVar(&o.PluginBin, "plugin-bin", "", "kms-plugin binary for the RSS run (default: go build ./cmd/kms-plugin into a temp dir)")
	fs.StringVar(&o.ProfileDir, "server-cpuprofile", "", "directory where the floor and plugin child processes write noop.pprof and plugin.pprof (CPU profiles of the servers)")
	only := fs.String("only", strings.Join(allSections, ","), "comma-separated sections to run: "+strings.Join(allSections, ", "))
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.Quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]func(){
			"n":           func() { o.N = 2000 },
			"warmup":      func() { o.Warmup = 200 },
			"duration":    func() { o.Duration = 2 * time.Second },
			"rss-entries": func() { o.RSSEntries = 2000 },
			"rss-idle":    func() { o.RSSIdle = time.Second },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	for _, s := range strings.Split(*only, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(allSections, s) {
			return o, fmt.Errorf("-only: unknown section %q (want %s)", s, strings.Join(allSections, ", "))
		}
		o.Only = append(o.Only, s)
	}
	switch {
	case o.N <= 0 || o.Warmup < 0 || o.Round <= 0:
		return o, errors.New("-n and -round must be positive, -warmup not negative")
	case o.Clients <= 0 || o.ColdClients <= 0 || o.Seeds <= 0 || o.RSSEntries <= 0:
		return o, errors.New("-clients, -cold-clients, -seeds and -rss-entries must be positive")
	case o.Duration <= 0:
		return o, errors.New("-duration must be positive")
	}
	return o, nil
}

func (o options) runs(section string) bool { return slices.Contains(o.Only, section) }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseOptions(args, stderr)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "kms-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	logf := func(format string, a ...any) {
		fmt.Fprintf(stderr, "%s bench: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
	}
	began := time.Now()
	rep := &report{Env: collectEnv(), Opts: o, Args: args}

	if o.runs(secLatency) || o.runs(secThroughput) {
		if err := runSideBySide(ctx, o, dir, rep, logf); err != nil {
			return err
		}
	}
	if o.runs(secCold) {
		cfg := coldConfig{Dir: dir, Seeds: o.Seeds, Clients: o.ColdClients, Delay: o.Delay}
		for _, mode := range []string{modeHierarchy, modeDirect} {
			logf("cold start, %s: %d seeds, %d callers, key store delay %v", mode, o.Seeds, o.ColdClients, o.Delay)
			r, err := measureColdStart(ctx, mode, cfg)
			if err != nil {
				return fmt.Errorf("cold start %s: %w", mode, err)
			}
			rep.Cold = append(rep.Cold, r)
		}
	}
	if o.runs(secRSS) {
		logf("RSS: kms-plugin binary, %d Encrypts, a restart and %d Decrypts", o.RSSEntries, o.RSSEntries)
		r, err := measureRSS(ctx, rssConfig{Dir: dir, Binary: o.PluginBin, Entries: o.RSSEntries, Idle: o.RSSIdle, Clients: o.ColdClients})
		if err != nil {
			return fmt.Errorf("rss: %w", err)
		}
		rep.RSS = &r
	}
	rep.Elapsed = time.Since(began)
	rep.Env.LoadEnd = loadavg()
	logf("done in %v", rep.Elapsed.Round(time.Second))

	md := rep.markdown()
	if o.Out != "" {
		if err := os.MkdirAll(filepath.Dir(o.Out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(o.Out, []byte(md), 0o644); err != nil {
			return err
		}
		logf("report written to %s", o.Out)
	}
	_, err = io.WriteString(stdout, md)
	return err
}

// runSideBySide starts the floor and the plugin and runs the latency and
// throughput sections against both.
func runSideBySide(ctx context.Context, o options, dir string, rep *report, logf func(string, ...any)) error {
	child := !o.InProcess
	profile := func(kind string) string {
		if o.ProfileDir == "" || !child {
			return ""
		}
		p, _ := filepath.Abs(filepath.Join(o.ProfileDir, kind+".pprof"))
		return p
	}
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return err
		}
	}
	floor, err := startTarget(kindFloor, filepath.Join(dir, "floor.sock"), "", child, profile(kindFloor))
	if err != nil {
		return err
	}
	defer floor.Close()
	plugin, err := startTarget(kindPlugin, filepath.Join(dir, "plugin.sock"), filepath.Join(dir, "plugin.keyset.json"), child, profile(kindPlugin))
	if err != nil {
		return err
	}
	defer plugin.Close()

	if o.runs(secLatency) {
		fc, err := dialReady(ctx, floor.Socket)
		if err != nil {
			return err
		}
		defer fc.Close()
		pc, err := dialReady(ctx, plugin.Socket)
		if err != nil {
			return err
		}
		defer pc.Close()
		logf("warm latency: %d calls per op and target after %d warm-up", o.N, o.Warmup)
		rows, fw, pw, err := measureLatency(ctx, fc, pc, latencyConfig{N: o.N, Warmup: o.Warmup, Round: o.Round, FloorPID: floor.PID, PluginPID: plugin.PID})
		if err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		rep.Latency, rep.FloorSizes, rep.PluginSizes = rows, fw.sizes, pw.sizes
	}
	if o.runs(secThroughput) {
		conns := []int{1}
		if o.Clients > 1 {
			conns = append(conns, o.Clients)
		}
		logf("throughput: %d callers, %v per run, connections %v", o.Clients, o.Duration, conns)
		rows, err := measureThroughput(ctx, floor.Socket, plugin.Socket, throughputConfig{
			Clients: o.Clients, Conns: conns, Duration: o.Duration, Warmup: min(o.Duration/5, 500*time.Millisecond),
		})
		if err != nil {
			return err
		}
		rep.Throughput = rows
	}
	if err := plugin.Close(); err != nil {
		return fmt.Errorf("plugin server: %w", err)
	}
	if err := floor.Close(); err != nil {
		return fmt.Errorf("floor server: %w", err)
	}
	return nil
}
