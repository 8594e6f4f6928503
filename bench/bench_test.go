package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMain lets the test binary serve as the child servers too, like the
// bench binary: startTarget re-executes os.Executable().
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "serve-" + kindFloor, "serve-" + kindPlugin:
			if err := runChild(strings.TrimPrefix(os.Args[1], "serve-"), os.Args[2:]); err != nil {
				os.Stderr.WriteString("bench child: " + err.Error() + "\n")
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
	code := m.Run()
	shared.close()
	os.Exit(code)
}

// startPair starts the floor and the plugin in child processes in dir.
func startPair(dir string) (floor, plugin *target, err error) {
	floor, err = startTarget(kindFloor, filepath.Join(dir, "floor.sock"), "", true, "")
	if err != nil {
		return nil, nil, err
	}
	plugin, err = startTarget(kindPlugin, filepath.Join(dir, "plugin.sock"), filepath.Join(dir, "plugin.keyset.json"), true, "")
	if err != nil {
		floor.Close()
		return nil, nil, err
	}
	return floor, plugin, nil
}

// sharedPair is the floor and the plugin the benchmarks share, started on
// first use and stopped by TestMain.
type sharedPair struct {
	once          sync.Once
	err           error
	dir           string
	floor, plugin *target
	clients       map[string]*client
	work          map[string]*workload
}

var shared sharedPair

func (s *sharedPair) get(b *testing.B) *sharedPair {
	b.Helper()
	s.once.Do(func() {
		ctx := context.Background()
		if s.dir, s.err = os.MkdirTemp("", "kms-bench-"); s.err != nil {
			return
		}
		if s.floor, s.plugin, s.err = startPair(s.dir); s.err != nil {
			return
		}
		s.clients, s.work = map[string]*client{}, map[string]*workload{}
		for _, t := range []*target{s.floor, s.plugin} {
			c, err := dialReady(ctx, t.Socket)
			if err != nil {
				s.err = err
				return
			}
			s.clients[t.Kind] = c
			if s.work[t.Kind], s.err = prepare(ctx, c, t.Kind == kindPlugin); s.err != nil {
				return
			}
		}
	})
	if s.err != nil {
		b.Fatal(s.err)
	}
	return s
}

func (s *sharedPair) close() {
	for _, c := range s.clients {
		c.Close()
	}
	s.plugin.Close()
	s.floor.Close()
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

func BenchmarkEncrypt(b *testing.B) { benchOp(b, opEncrypt) }
func BenchmarkDecrypt(b *testing.B) { benchOp(b, opDecrypt) }
func BenchmarkStatus(b *testing.B)  { benchOp(b, opStatus) }

// benchOp measures op sequentially over the real socket against the floor
// (a no-op KMS v2 server) and the plugin, each in its own child process.
func benchOp(b *testing.B, op string) {
	s := shared.get(b)
	for _, kind := range []string{kindFloor, kindPlugin} {
		b.Run(kind, func(b *testing.B) {
			ctx := context.Background()
			c, w := s.clients[kind], s.work[kind]
			samples := make([]time.Duration, 0, 1<<16)
			for b.Loop() {
				start := time.Now()
				err := w.call(ctx, c, op)
				samples = append(samples, time.Since(start))
				if err != nil {
					b.Fatal(err)
				}
			}
			d := summarize(samples)
			b.ReportMetric(float64(d.P50.Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(d.P99.Nanoseconds()), "p99-ns")
		})
	}
}

// TestQuickRun runs every measurement at a tiny size and checks what can be
// checked without timing: every op succeeded, the key hierarchy made one
// remote call for a whole cold start while direct made one per op, and the
// restarted binary cached every local KEK.
func TestQuickRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	rep := &report{Env: collectEnv(), Opts: options{N: 50, Warmup: 5, Round: 10, Duration: 100 * time.Millisecond, Clients: 4, RSSIdle: 0}}

	t.Run("latency and throughput", func(t *testing.T) {
		floor, plugin, err := startPair(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer floor.Close()
		defer plugin.Close()
		fc, err := dialReady(ctx, floor.Socket)
		if err != nil {
			t.Fatal(err)
		}
		defer fc.Close()
		pc, err := dialReady(ctx, plugin.Socket)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()

		rows, fw, pw, err := measureLatency(ctx, fc, pc, latencyConfig{N: 50, Warmup: 5, Round: 10})
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != len(allOps) {
			t.Fatalf("got %d latency rows, want %d", len(rows), len(allOps))
		}
		for _, r := range rows {
			if r.Floor.N != 50 || r.Plugin.N != 50 {
				t.Errorf("%s: got %d floor and %d plugin samples, want 50 each", r.Op, r.Floor.N, r.Plugin.N)
			}
			if r.FloorErrors != 0 || r.PluginErrors != 0 {
				t.Errorf("%s: got %d floor and %d plugin errors, want none", r.Op, r.FloorErrors, r.PluginErrors)
			}
		}
		if fw.sizes.Ciphertext != pw.sizes.Ciphertext || fw.sizes.KeyID != pw.sizes.KeyID {
			t.Errorf("floor answers %+v, plugin %+v: want the same ciphertext and key_id sizes", fw.sizes, pw.sizes)
		}
		rep.Latency, rep.FloorSizes, rep.PluginSizes = rows, fw.sizes, pw.sizes

		tp, err := measureThroughput(ctx, floor.Socket, plugin.Socket, throughputConfig{Clients: 4, Conns: []int{1, 4}, Duration: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if len(tp) != 4 {
			t.Fatalf("got %d throughput rows, want 4", len(tp))
		}
		for _, r := range tp {
			for name, x := range map[string]rate{"floor": r.Floor, "plugin": r.Plugin} {
				if x.Ops == 0 || x.Errors != 0 {
					t.Errorf("%s %s over %d connections: %d ops, %d errors; want some ops and no errors", name, r.Op, r.Conns, x.Ops, x.Errors)
				}
			}
		}
		rep.Throughput = tp
		if err := plugin.Close(); err != nil {
			t.Errorf("plugin server: %v", err)
		}
		if err := floor.Close(); err != nil {
			t.Errorf("floor server: %v", err)
		}
	})

	t.Run("cold start", func(t *testing.T) {
		const seeds = 100
		cfg := coldConfig{Dir: dir, Seeds: seeds, Clients: 8, Delay: 20 * time.Millisecond}
		tests := []struct {
			mode                         string
			wantEncRemote, wantDecRemote int64
		}{
			{modeHierarchy, 0, 1},
			{modeDirect, seeds, seeds},
		}
		for _, tt := range tests {
			got, err := measureColdStart(ctx, tt.mode, cfg)
			if err != nil {
				t.Fatalf("%s: %v", tt.mode, err)
			}
			if got.EncryptErrors != 0 || got.DecryptErrors != 0 {
				t.Errorf("%s: %d Encrypt and %d Decrypt errors, want none", tt.mode, got.EncryptErrors, got.DecryptErrors)
			}
			if got.EncryptRemote != tt.wantEncRemote {
				t.Errorf("%s: %d remote calls for %d Encrypts, want %d", tt.mode, got.EncryptRemote, seeds, tt.wantEncRemote)
			}
			if got.DecryptRemote != tt.wantDecRemote {
				t.Errorf("%s: %d remote calls for %d cold Decrypts, want %d", tt.mode, got.DecryptRemote, seeds, tt.wantDecRemote)
			}
			if got.DecryptUnwraps != tt.wantDecRemote {
				t.Errorf("%s: %d Unwraps for %d cold Decrypts, want %d", tt.mode, got.DecryptUnwraps, seeds, tt.wantDecRemote)
			}
			rep.Cold = append(rep.Cold, got)
		}
	})

	t.Run("rss", func(t *testing.T) {
		if testing.Short() {
			t.Skip("builds cmd/kms-plugin")
		}
		if _, err := exec.LookPath("go"); err != nil {
			t.Skip("no go command to build cmd/kms-plugin")
		}
		const entries = 200
		got, err := measureRSS(ctx, rssConfig{Dir: dir, Entries: entries, Clients: 8})
		if err != nil {
			t.Fatal(err)
		}
		if got.EncryptErrors != 0 || got.DecryptErrors != 0 {
			t.Errorf("%d Encrypt and %d Decrypt errors, want none", got.EncryptErrors, got.DecryptErrors)
		}
		if got.WriterKEKs < entries {
			t.Errorf("writer made %d local KEKs for %d Encrypts with --kek-max-uses 1, want at least %d", got.WriterKEKs, entries, entries)
		}
		if got.ReaderEntries < entries {
			t.Errorf("restarted plugin caches %d local KEKs after %d Decrypts, want at least %d", got.ReaderEntries, entries, entries)
		}
		if got.ReaderUnwraps != entries {
			t.Errorf("restarted plugin made %d provider unwraps for %d distinct local KEKs, want %d", got.ReaderUnwraps, entries, entries)
		}
		if got.FullIdleKiB <= 0 {
			t.Errorf("full binary idle RSS %d KiB: want it read for the comparison", got.FullIdleKiB)
		}
		if got.IdleKiB <= 0 || got.AfterDecryptKiB <= 0 {
			t.Errorf("RSS idle %d KiB, with cache %d KiB: want both read", got.IdleKiB, got.AfterDecryptKiB)
		}
		rep.RSS = &got
	})

	md := rep.markdown()
	for _, want := range []string{"## 1. Warm ops", "## 2. Throughput", "## 3. Cold start", "| hierarchy |", "| direct |"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}
