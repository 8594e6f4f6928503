package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
)

// Operations, in report order.
const (
	opEncrypt = "Encrypt"
	opDecrypt = "Decrypt"
	opStatus  = "Status"
)

var allOps = []string{opEncrypt, opDecrypt, opStatus}

// workload holds the requests sent to one target: Encrypt of a 32-byte seed
// and Decrypt of a warm ciphertext that target produced, with its key_id and
// annotations.
type workload struct {
	enc   *kmsapi.EncryptRequest
	dec   *kmsapi.DecryptRequest
	sizes wireSizes
}

// wireSizes describes an Encrypt response, to show that the floor answers
// with messages the size of the plugin's.
type wireSizes struct {
	Ciphertext, KeyID, Annotations int
}

// prepare warms a target up with one Encrypt and one Decrypt and returns the
// requests to repeat. With roundTrip the Decrypt must return the seed.
func prepare(ctx context.Context, c *client, roundTrip bool) (*workload, error) {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return nil, err
	}
	enc := &kmsapi.EncryptRequest{Plaintext: seed, Uid: benchUID}
	r, err := c.kms.Encrypt(ctx, enc)
	if err != nil {
		return nil, fmt.Errorf("warm-up Encrypt: %w", err)
	}
	dec := &kmsapi.DecryptRequest{Ciphertext: r.GetCiphertext(), KeyId: r.GetKeyId(), Annotations: r.GetAnnotations(), Uid: benchUID}
	d, err := c.kms.Decrypt(ctx, dec)
	if err != nil {
		return nil, fmt.Errorf("warm-up Decrypt: %w", err)
	}
	if roundTrip && !bytes.Equal(d.GetPlaintext(), seed) {
		return nil, fmt.Errorf("warm-up Decrypt: %w: plaintext differs from the seed", errMismatch)
	}
	sz := wireSizes{Ciphertext: len(r.GetCiphertext()), KeyID: len(r.GetKeyId())}
	for k, v := range r.GetAnnotations() {
		sz.Annotations += len(k) + len(v)
	}
	return &workload{enc: enc, dec: dec, sizes: sz}, nil
}

// call makes one op on c and checks the answer's shape.
func (w *workload) call(ctx context.Context, c *client, op string) error {
	switch op {
	case opEncrypt:
		r, err := c.kms.Encrypt(ctx, w.enc)
		if err != nil {
			return err
		}
		if len(r.GetCiphertext()) == 0 || r.GetKeyId() == "" {
			return errMismatch
		}
	case opDecrypt:
		r, err := c.kms.Decrypt(ctx, w.dec)
		if err != nil {
			return err
		}
		if len(r.GetPlaintext()) != 32 {
			return errMismatch
		}
	case opStatus:
		r, err := c.kms.Status(ctx, &kmsapi.StatusRequest{})
		if err != nil {
			return err
		}
		if r.GetHealthz() != "ok" {
			return errMismatch
		}
	default:
		return fmt.Errorf("unknown op %q", op)
	}
	return nil
}

// dist summarizes latency samples.
type dist struct {
	N              int
	P50, P90, P99  time.Duration
	Mean, Min, Max time.Duration
}

func summarize(samples []time.Duration) dist {
	if len(samples) == 0 {
		return dist{}
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return dist{
		N:    len(s),
		P50:  percentile(s, 0.50),
		P90:  percentile(s, 0.90),
		P99:  percentile(s, 0.99),
		Mean: sum / time.Duration(len(s)),
		Min:  s[0],
		Max:  s[len(s)-1],
	}
}

// percentile is the nearest-rank percentile of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

type latencyConfig struct {
	N      int // measured calls per op and target
	Warmup int // unmeasured calls per op and target first
	Round  int // calls per target before switching to the other one
	// FloorPID and PluginPID, when set, are the servers' processes: their
	// CPU time per call is reported too.
	FloorPID, PluginPID int
}

// latencyRow is one op measured against both targets.
type latencyRow struct {
	Op                         string
	Floor, Plugin              dist
	FloorErrors, PluginErrors  int
	FloorSamples, PluginSample []time.Duration
	// FloorCPU and PluginCPU are the server processes' CPU time per call
	// (all threads), or 0 when unknown.
	FloorCPU, PluginCPU time.Duration
}

// measureLatency makes cfg.N sequential calls of each op against each
// target from one client connection per target, alternating between the
// targets every cfg.Round calls (and which one goes first every round) so
// that drift in the machine's state hits both alike.
func measureLatency(ctx context.Context, floor, plugin *client, cfg latencyConfig) ([]latencyRow, *workload, *workload, error) {
	if cfg.Round <= 0 {
		cfg.Round = 500
	}
	fw, err := prepare(ctx, floor, false)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("floor: %w", err)
	}
	pw, err := prepare(ctx, plugin, true)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("plugin: %w", err)
	}
	var rows []latencyRow
	for _, op := range allOps {
		row := latencyRow{Op: op}
		for range cfg.Warmup {
			if fw.call(ctx, floor, op) != nil {
				row.FloorErrors++
			}
			if pw.call(ctx, plugin, op) != nil {
				row.PluginErrors++
			}
		}
		fs := make([]time.Duration, 0, cfg.N)
		ps := make([]time.Duration, 0, cfg.N)
		fcpu0, fok := procCPU(cfg.FloorPID)
		pcpu0, pok := procCPU(cfg.PluginPID)
		for round := 0; len(fs) < cfg.N && ctx.Err() == nil; round++ {
			k := min(cfg.Round, cfg.N-len(fs))
			runFloor := func() { fs = timeCalls(ctx, fs, k, &row.FloorErrors, func() error { return fw.call(ctx, floor, op) }) }
			runPlugin := func() {
				ps = timeCalls(ctx, ps, k, &row.PluginErrors, func() error { return pw.call(ctx, plugin, op) })
			}
			if round%2 == 0 {
				runFloor()
				runPlugin()
			} else {
				runPlugin()
				runFloor()
			}
		}
		if c, ok := procCPU(cfg.FloorPID); ok && fok && len(fs) > 0 {
			row.FloorCPU = (c - fcpu0) / time.Duration(len(fs))
		}
		if c, ok := procCPU(cfg.PluginPID); ok && pok && len(ps) > 0 {
			row.PluginCPU = (c - pcpu0) / time.Duration(len(ps))
		}
		row.Floor, row.Plugin = summarize(fs), summarize(ps)
		row.FloorSamples, row.PluginSample = fs, ps
		rows = append(rows, row)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, nil, err
	}
	return rows, fw, pw, nil
}

// timeCalls makes k calls of f, appending each one's duration to samples.
func timeCalls(ctx context.Context, samples []time.Duration, k int, errs *int, f func() error) []time.Duration {
	for range k {
		if ctx.Err() != nil {
			return samples
		}
		start := time.Now()
		err := f()
		samples = append(samples, time.Since(start))
		if err != nil {
			*errs++
		}
	}
	return samples
}

// procCPU returns the CPU time pid's threads have used so far, from
// /proc/PID/task/*/schedstat (nanoseconds on CPU).
func procCPU(pid int) (time.Duration, bool) {
	if pid <= 0 {
		return 0, false
	}
	files, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(files) == 0 {
		return 0, false
	}
	var total int64
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread exited
		}
		first, _, _ := strings.Cut(string(b), " ")
		n, err := strconv.ParseInt(first, 10, 64)
		if err != nil {
			return 0, false
		}
		total += n
	}
	return time.Duration(total), true
}
