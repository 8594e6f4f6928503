package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

// Cold-start modes.
const (
	modeHierarchy = "hierarchy"
	modeDirect    = "direct"
)

type coldConfig struct {
	Dir     string        // for keysets and sockets
	Seeds   int           // distinct DEK seeds
	Clients int           // concurrent callers on one connection
	Delay   time.Duration // added to every provider call
}

// coldResult is one cold-start run. Remote calls are the Faulty provider's
// Wrap+Unwrap counts; CurrentVersion polls are reported apart.
type coldResult struct {
	Mode           string
	Seeds, Clients int
	Delay          time.Duration

	// Writer: a plugin that encrypts every seed over the socket.
	WriterStartupRemote int64 // Wrap+Unwrap made by its first Refresh
	EncryptWall         time.Duration
	EncryptRemote       int64

	// Reader: a fresh plugin on the same key store that decrypts every
	// ciphertext over the socket, Clients at a time.
	StartupWall    time.Duration // its Refresh, before the socket opens
	StartupRemote  int64         // Wrap+Unwrap made by that Refresh
	StartupPolls   int64         // CurrentVersion calls made by that Refresh
	DecryptWall    time.Duration
	DecryptRemote  int64 // Wrap+Unwrap made while decrypting
	DecryptUnwraps int64

	EncryptErrors, DecryptErrors int
}

// service is what both modes serve: the envelope hierarchy or direct.
type service interface {
	kmsservice.Service
	Refresh(context.Context) error
}

func newColdService(mode string, p provider.Provider) (service, error) {
	switch mode {
	case modeHierarchy:
		return envelope.New(envelope.Config{Provider: p})
	case modeDirect:
		return newDirect(p), nil
	default:
		return nil, fmt.Errorf("unknown mode %q", mode)
	}
}

func wrapUnwrap(f *providertest.Faulty) int64 { return f.WrapCalls.Load() + f.UnwrapCalls.Load() }

// measureColdStart encrypts cfg.Seeds seeds through a writer plugin, then
// starts a cold reader plugin whose key store answers after cfg.Delay and
// decrypts them all with cfg.Clients concurrent callers, as a restarting
// kube-apiserver does. Both servers run in this process behind
// internal/server on their own sockets, so the provider's call counters can
// be read directly.
func measureColdStart(ctx context.Context, mode string, cfg coldConfig) (coldResult, error) {
	res := coldResult{Mode: mode, Seeds: cfg.Seeds, Clients: cfg.Clients, Delay: cfg.Delay}
	keyset := filepath.Join(cfg.Dir, "cold-"+mode+".keyset.json")

	// Writer.
	wp, err := local.New(local.Config{Path: keyset, Create: true})
	if err != nil {
		return res, err
	}
	wf := providertest.NewFaulty(wp)
	wf.Delay = cfg.Delay
	writer, err := newColdService(mode, wf)
	if err != nil {
		return res, err
	}
	if err := writer.Refresh(ctx); err != nil {
		return res, fmt.Errorf("writer: %w", err)
	}
	res.WriterStartupRemote = wrapUnwrap(wf)
	seeds := make([][]byte, cfg.Seeds)
	for i := range seeds {
		seeds[i] = make([]byte, 32)
		if _, err := rand.Read(seeds[i]); err != nil {
			return res, err
		}
	}
	cts := make([]*kmsapi.EncryptResponse, cfg.Seeds)
	err = withServed(ctx, filepath.Join(cfg.Dir, "cold-"+mode+"-writer.sock"), writer, func(c *client) {
		before := wrapUnwrap(wf)
		start := time.Now()
		res.EncryptErrors = parallel(cfg.Seeds, cfg.Clients, func(i int) error {
			r, err := c.kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seeds[i], Uid: benchUID})
			cts[i] = r
			return err
		})
		res.EncryptWall = time.Since(start)
		res.EncryptRemote = wrapUnwrap(wf) - before
	})
	if err != nil {
		return res, fmt.Errorf("writer: %w", err)
	}

	// Cold reader: a new provider instance on the same keyset file.
	rp, err := local.New(local.Config{Path: keyset})
	if err != nil {
		return res, err
	}
	rf := providertest.NewFaulty(rp)
	rf.Delay = cfg.Delay
	reader, err := newColdService(mode, rf)
	if err != nil {
		return res, err
	}
	start := time.Now()
	if err := reader.Refresh(ctx); err != nil {
		return res, fmt.Errorf("reader: %w", err)
	}
	res.StartupWall = time.Since(start)
	res.StartupRemote = wrapUnwrap(rf)
	res.StartupPolls = rf.CurrentVersionCalls.Load()
	err = withServed(ctx, filepath.Join(cfg.Dir, "cold-"+mode+"-reader.sock"), reader, func(c *client) {
		before, unwraps := wrapUnwrap(rf), rf.UnwrapCalls.Load()
		start := time.Now()
		res.DecryptErrors = parallel(cfg.Seeds, cfg.Clients, func(i int) error {
			e := cts[i]
			if e == nil {
				return errMismatch
			}
			r, err := c.kms.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: e.GetCiphertext(), KeyId: e.GetKeyId(), Annotations: e.GetAnnotations(), Uid: benchUID})
			if err != nil {
				return err
			}
			if !bytes.Equal(r.GetPlaintext(), seeds[i]) {
				return errMismatch
			}
			return nil
		})
		res.DecryptWall = time.Since(start)
		res.DecryptRemote = wrapUnwrap(rf) - before
		res.DecryptUnwraps = rf.UnwrapCalls.Load() - unwraps
	})
	if err != nil {
		return res, fmt.Errorf("reader: %w", err)
	}
	return res, ctx.Err()
}

// withServed serves svc on socket, connects one client (and has it call
// Status once, as kube-apiserver does first), runs f and stops the server.
func withServed(ctx context.Context, socket string, svc kmsservice.Service, f func(*client)) error {
	stop, err := serveService(socket, svc, nil, nil)
	if err != nil {
		return err
	}
	c, err := dialReady(ctx, socket)
	if err != nil {
		_ = stop()
		return err
	}
	f(c)
	c.Close()
	return stop()
}

// parallel calls f(i) for every i < n from clients goroutines and returns
// how many calls failed.
func parallel(n, clients int, f func(i int) error) int {
	var (
		next, failed atomic.Int64
		wg           sync.WaitGroup
	)
	for range max(1, clients) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if f(i) != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return int(failed.Load())
}
