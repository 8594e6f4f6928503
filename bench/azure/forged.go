package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/plugin"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// forgedResult is one run of the forged-Decrypt flood.
type forgedResult struct {
	forged, legit            int64
	forgedRefused            int64
	vaultUnwraps             int64 // unwrapkey requests the vault answered during the run
	legitUnwraps             int64 // provider unwraps of genuine wrapped KEKs during the run
	logLines                 int64 // lines the plugin logged during the run
	cacheEntries, cacheLimit int
	elapsed                  time.Duration
}

// legitHitRate is the share of the legitimate Decrypts that needed no
// unwrap of their local KEK.
func (r forgedResult) legitHitRate() float64 {
	if r.legit == 0 {
		return math.NaN()
	}
	return 1 - float64(r.legitUnwraps)/float64(r.legit)
}

// genuineCounter counts the provider unwraps of genuine wrapped KEKs (the
// legitimate workload's), whatever version string they arrive with.
type genuineCounter struct {
	provider.Provider
	genuine map[string]bool // wrapped KEK bytes of the legitimate ciphertexts
	n       atomic.Int64
}

func (g *genuineCounter) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if g.genuine[string(w.Ciphertext)] && !bytes.Contains([]byte(w.Version), []byte("#forged")) {
		g.n.Add(1)
	}
	return g.Provider.Unwrap(ctx, w)
}

// ValidVersion passes the store's provider.VersionValidator through, as
// the plugin's own decorators do: a wrapper that hid it would measure a
// plugin that does not ship.
func (g *genuineCounter) ValidVersion(version string) error {
	if vv, ok := g.Provider.(provider.VersionValidator); ok {
		return vv.ValidVersion(version)
	}
	return nil
}

// lineCounter counts the lines written through it.
type lineCounter struct{ n atomic.Int64 }

func (c *lineCounter) Write(p []byte) (int, error) {
	c.n.Add(int64(bytes.Count(p, []byte{'\n'})))
	return len(p), nil
}

// forgedFlood runs the shipped plugin assembly (internal/plugin, gRPC on a
// real socket, info-level JSON logs) on the azurekeyvault provider against
// kvtest, with a legitimate workload decrypting cached objects while
// attackers send n forged Decrypts: the genuine wrapped local KEK of one
// object, replayed under n distinct spellings of its key version (the
// vault ignores everything after '#', and "#forged<i>" is one such
// variant) with the matching key_id, which anyone can compute. It counts
// the vault's unwrapkey requests, the legitimate workload's cache hits and
// the plugin's log lines. n == 0 is the baseline: the legitimate workload
// alone.
func forgedFlood(ctx context.Context, n int) (forgedResult, error) {
	const (
		key         = "kms-kek"
		legitKEKs   = 20
		seedsPerKEK = 10
		cacheSize   = 100
		legitCalls  = 20000
		attackers   = 16
	)
	e, err := newEnv(key)
	if err != nil {
		return forgedResult{}, err
	}
	defer e.close()

	// A writer plugin makes the legitimate objects under 20 local KEKs.
	wp, err := e.provider(key, false)
	if err != nil {
		return forgedResult{}, err
	}
	writer, err := envelope.New(envelope.Config{Provider: wp, KEKMaxUses: seedsPerKEK})
	if err != nil {
		return forgedResult{}, err
	}
	if err := writer.Refresh(ctx); err != nil {
		return forgedResult{}, err
	}
	var legit []*kmsapi.DecryptRequest
	genuine := map[string]bool{}
	for range legitKEKs * seedsPerKEK {
		seed := make([]byte, 32)
		_, _ = rand.Read(seed)
		r, err := writer.Encrypt(ctx, "bench", seed)
		if err != nil {
			return forgedResult{}, err
		}
		legit = append(legit, &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyID, Annotations: r.Annotations, Uid: "legit"})
		_, wrapped, err := splitLocalKEK(r.Annotations[envelope.AnnotationLocalKEK])
		if err != nil {
			return forgedResult{}, err
		}
		genuine[string(wrapped)] = true
	}

	// The reader is the plugin under attack.
	rp, err := e.provider(key, false)
	if err != nil {
		return forgedResult{}, err
	}
	counter := &genuineCounter{Provider: rp, genuine: genuine}
	dir, err := os.MkdirTemp("", "forged-")
	if err != nil {
		return forgedResult{}, err
	}
	defer os.RemoveAll(dir)
	lines := &lineCounter{}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(lines), zap.InfoLevel))
	socket := filepath.Join(dir, "kms.sock")
	p, err := plugin.New(plugin.Config{Provider: counter, Endpoint: "unix://" + socket, KEKCacheSize: cacheSize, Logger: log, Version: "bench"})
	if err != nil {
		return forgedResult{}, err
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- p.Run(runCtx) }()
	defer func() { stop(); <-done }()
	select {
	case <-p.Ready():
	case err := <-done:
		return forgedResult{}, fmt.Errorf("plugin: %w", err)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return forgedResult{}, err
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	call := func(req *kmsapi.DecryptRequest) error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		_, err := client.Decrypt(cctx, req)
		return err
	}
	// Warm the cache as kube-apiserver's start does.
	for _, req := range legit {
		if err := call(req); err != nil {
			return forgedResult{}, fmt.Errorf("warm-up decrypt: %w", err)
		}
	}

	forged, err := forgeVariants(legit[0], n)
	if err != nil {
		return forgedResult{}, err
	}
	e.srv.ResetCalls()
	counter.n.Store(0)
	lines.n.Store(0)
	var res forgedResult
	start := time.Now()
	var wg sync.WaitGroup
	var legitErr atomic.Value
	wg.Go(func() {
		for i := range legitCalls {
			if err := call(legit[i%len(legit)]); err != nil {
				legitErr.CompareAndSwap(nil, err)
			}
		}
	})
	var next atomic.Int64
	var refused atomic.Int64
	for range attackers {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(len(forged)) {
					return
				}
				if call(forged[i]) != nil {
					refused.Add(1)
				}
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	if err, ok := legitErr.Load().(error); ok {
		return res, fmt.Errorf("a legitimate Decrypt failed during the flood: %w", err)
	}
	st := p.Stats()
	res.forged, res.legit, res.forgedRefused = int64(len(forged)), legitCalls, refused.Load()
	res.vaultUnwraps = e.srv.Calls("unwrapkey")
	res.legitUnwraps = counter.n.Load()
	res.logLines = lines.n.Load()
	res.cacheEntries, res.cacheLimit = st.CacheEntries, cacheSize
	return res, nil
}

// forgeVariants returns n Decrypt requests replaying legit's ciphertext and
// wrapped local KEK under n distinct spellings of its key version, each
// with the key_id that spelling derives.
func forgeVariants(legit *kmsapi.DecryptRequest, n int) ([]*kmsapi.DecryptRequest, error) {
	version, wrapped, err := splitLocalKEK(legit.Annotations[envelope.AnnotationLocalKEK])
	if err != nil {
		return nil, err
	}
	out := make([]*kmsapi.DecryptRequest, n)
	for i := range out {
		v := fmt.Sprintf("%s#forged%d", version, i)
		ann := map[string][]byte{}
		for k, val := range legit.Annotations {
			ann[k] = val
		}
		ann[envelope.AnnotationLocalKEK] = joinLocalKEK(legit.Annotations[envelope.AnnotationLocalKEK][0], v, wrapped)
		out[i] = &kmsapi.DecryptRequest{Ciphertext: legit.Ciphertext, KeyId: envelope.DeriveKeyID("azurekeyvault", v), Annotations: ann, Uid: "forged"}
	}
	return out, nil
}

// splitLocalKEK parses the lkek annotation as an attacker would, from its
// documented layout: format byte, uvarint version length, version,
// wrapped key.
func splitLocalKEK(a []byte) (string, []byte, error) {
	if len(a) < 2 {
		return "", nil, errors.New("lkek annotation too short")
	}
	r := bufio.NewReader(bytes.NewReader(a[1:]))
	l, err := binary.ReadUvarint(r)
	if err != nil {
		return "", nil, err
	}
	rest, _ := io.ReadAll(r)
	if uint64(len(rest)) < l {
		return "", nil, errors.New("lkek annotation truncated")
	}
	return string(rest[:l]), rest[l:], nil
}

func joinLocalKEK(format byte, version string, wrapped []byte) []byte {
	out := []byte{format}
	out = binary.AppendUvarint(out, uint64(len(version)))
	out = append(out, version...)
	return append(out, wrapped...)
}

// forgedReport runs the baseline and the flood and writes the section.
func forgedReport(ctx context.Context, w io.Writer, n int) error {
	base, err := forgedFlood(ctx, 0)
	if err != nil {
		return fmt.Errorf("forged baseline: %w", err)
	}
	flood, err := forgedFlood(ctx, n)
	if err != nil {
		return fmt.Errorf("forged flood: %w", err)
	}
	fmt.Fprintf(w, "## Forged Decrypts\n\n")
	fmt.Fprintf(w, "The shipped assembly (internal/plugin, gRPC socket, info-level JSON logs, cache of %d local KEKs) on azurekeyvault against kvtest. A legitimate workload decrypts %d times across %d cached objects under 20 local KEKs while 16 attackers send %d forged Decrypts: one genuine wrapped local KEK replayed under %d distinct spellings of its key version (`<kid>#forged<i>`; the vault ignores the fragment) with the key_id each spelling derives.\n\n",
		flood.cacheLimit, flood.legit, 200, flood.forged, flood.forged)
	fmt.Fprintf(w, "| | legitimate workload alone | with %d forged Decrypts | goal |\n|---|---|---|---|\n", flood.forged)
	fmt.Fprintf(w, "| vault unwrapkey requests | %d | %d | ≤ 10 |\n", base.vaultUnwraps, flood.vaultUnwraps)
	fmt.Fprintf(w, "| legitimate cache hit rate | %.4f | %.4f | unchanged |\n", base.legitHitRate(), flood.legitHitRate())
	fmt.Fprintf(w, "| plugin log lines | %d | %d | ≤ 100 |\n", base.logLines, flood.logLines)
	fmt.Fprintf(w, "| forged Decrypts refused | - | %d of %d | all |\n", flood.forgedRefused, flood.forged)
	fmt.Fprintf(w, "| cache entries after | %d | %d | |\n", base.cacheEntries, flood.cacheEntries)
	fmt.Fprintf(w, "| wall time | %s | %s | |\n\n", base.elapsed.Round(time.Millisecond), flood.elapsed.Round(time.Millisecond))
	return nil
}
