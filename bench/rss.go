package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
)

type rssConfig struct {
	Dir     string        // for the binary, keyset and socket
	Binary  string        // a built kms-plugin; built into Dir when empty
	Entries int           // Encrypts, each under a new local KEK, then Decrypts
	Idle    time.Duration // wait before reading an idle or settled RSS
	Clients int           // concurrent Decrypt callers
}

// rssResult holds memory figures of the real binary, in KiB.
type rssResult struct {
	Entries     int
	Binary      string // how it was built, or the path given
	BinaryBytes int64

	IdleKiB         int64 // first start, after Idle
	AfterEncryptKiB int64 // after Entries Encrypts (writer holds Entries local KEKs)
	WriterKEKs      uint64
	WriterEntries   int

	ColdIdleKiB     int64 // after a restart, after Idle
	AfterDecryptKiB int64 // after Entries Decrypts of distinct local KEKs, after Idle
	PeakKiB         int64 // VmHWM of the restarted process
	ReaderEntries   int   // /status cache.entries after the Decrypts
	ReaderUnwraps   uint64

	EncryptWall, DecryptWall     time.Duration
	EncryptErrors, DecryptErrors int

	// The full binary (every command, client-go linked), idle, for
	// comparison; zero when a binary was given.
	FullIdleKiB     int64
	FullBinaryBytes int64
}

// buildPlugin builds ./cmd/kms-plugin of this module into dir as name,
// with the build tags given (serveonly: the serve-only build the image's
// plugin runs).
func buildPlugin(ctx context.Context, dir, name, tags string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the kms-plugin module")
	}
	bin := filepath.Join(dir, name)
	// The release build of the Makefile and Dockerfile: static, stripped.
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-tags", tags, "-ldflags", "-s -w -X main.version=bench", "-o", bin, "./cmd/kms-plugin")
	cmd.Dir = filepath.Dir(gomod)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/kms-plugin: %v\n%s", err, out)
	}
	return bin, nil
}

// idleRSS starts bin, waits idle and returns its VmRSS.
func idleRSS(ctx context.Context, bin, socket, keyset string, idle time.Duration) (int64, error) {
	p, err := startBinary(ctx, bin, socket, keyset, 100)
	if err != nil {
		return 0, err
	}
	defer p.stop()
	sleep(ctx, idle)
	rss, _, err := readRSS(p.cmd.Process.Pid)
	return rss, err
}

// measureRSS runs the real binary with --kek-max-uses 1, so that every
// Encrypt makes a new local KEK, encrypts cfg.Entries seeds, restarts it and
// decrypts them all, so that the restarted plugin holds cfg.Entries unwrapped
// local KEKs in its cache; it reads VmRSS along the way.
func measureRSS(ctx context.Context, cfg rssConfig) (rssResult, error) {
	res := rssResult{Entries: cfg.Entries, Binary: cfg.Binary}
	if cfg.Binary == "" {
		res.Binary = "CGO_ENABLED=0 go build -trimpath -tags serveonly -ldflags '-s -w' ./cmd/kms-plugin (kms-plugin-serve)"
		bin, err := buildPlugin(ctx, cfg.Dir, "kms-plugin-serve", "serveonly")
		if err != nil {
			return res, err
		}
		cfg.Binary = bin
		full, err := buildPlugin(ctx, cfg.Dir, "kms-plugin", "")
		if err != nil {
			return res, err
		}
		if res.FullIdleKiB, err = idleRSS(ctx, full, filepath.Join(cfg.Dir, "full.sock"), filepath.Join(cfg.Dir, "full.keyset.json"), cfg.Idle); err != nil {
			return res, fmt.Errorf("full binary: %w", err)
		}
		if fi, err := os.Stat(full); err == nil {
			res.FullBinaryBytes = fi.Size()
		}
	}
	if fi, err := os.Stat(cfg.Binary); err == nil {
		res.BinaryBytes = fi.Size()
	}
	socket := filepath.Join(cfg.Dir, "rss.sock")
	keyset := filepath.Join(cfg.Dir, "rss.keyset.json")

	// First life: encrypt.
	p, err := startBinary(ctx, cfg.Binary, socket, keyset, cfg.Entries)
	if err != nil {
		return res, err
	}
	defer p.stop()
	sleep(ctx, cfg.Idle)
	if res.IdleKiB, _, err = readRSS(p.cmd.Process.Pid); err != nil {
		return res, err
	}
	seeds := make([][]byte, cfg.Entries)
	resps := make([]*kmsapi.EncryptResponse, cfg.Entries)
	start := time.Now()
	for i := range seeds {
		seeds[i] = []byte(fmt.Sprintf("seed-%026d", i)) // 32 bytes
		r, err := p.c.kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seeds[i], Uid: benchUID})
		if err != nil {
			res.EncryptErrors++
			continue
		}
		resps[i] = r
	}
	res.EncryptWall = time.Since(start)
	if res.AfterEncryptKiB, _, err = readRSS(p.cmd.Process.Pid); err != nil {
		return res, err
	}
	st, err := getStatus(ctx, p.httpAddr)
	if err != nil {
		return res, err
	}
	res.WriterKEKs, res.WriterEntries = st.LocalKEK.CreatedSinceStart, st.Cache.Entries
	if err := p.stop(); err != nil {
		return res, fmt.Errorf("stop plugin: %w", err)
	}

	// Second life: cold, decrypt everything.
	p, err = startBinary(ctx, cfg.Binary, socket, keyset, cfg.Entries)
	if err != nil {
		return res, err
	}
	defer p.stop()
	sleep(ctx, cfg.Idle)
	if res.ColdIdleKiB, _, err = readRSS(p.cmd.Process.Pid); err != nil {
		return res, err
	}
	start = time.Now()
	res.DecryptErrors = parallel(cfg.Entries, cfg.Clients, func(i int) error {
		e := resps[i]
		if e == nil {
			return errMismatch
		}
		r, err := p.c.kms.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: e.GetCiphertext(), KeyId: e.GetKeyId(), Annotations: e.GetAnnotations(), Uid: benchUID})
		if err != nil {
			return err
		}
		if !bytes.Equal(r.GetPlaintext(), seeds[i]) {
			return errMismatch
		}
		return nil
	})
	res.DecryptWall = time.Since(start)
	st, err = getStatus(ctx, p.httpAddr)
	if err != nil {
		return res, err
	}
	res.ReaderEntries, res.ReaderUnwraps = st.Cache.Entries, st.Cache.ProviderUnwraps
	sleep(ctx, cfg.Idle)
	if res.AfterDecryptKiB, res.PeakKiB, err = readRSS(p.cmd.Process.Pid); err != nil {
		return res, err
	}
	if err := p.stop(); err != nil {
		return res, fmt.Errorf("stop plugin: %w", err)
	}
	return res, ctx.Err()
}

// pluginProc is a running kms-plugin binary and a client connected to it.
type pluginProc struct {
	cmd      *exec.Cmd
	c        *client
	httpAddr string
	waitc    chan error
	stopped  bool
}

func startBinary(ctx context.Context, bin, socket, keyset string, cacheSize int) (*pluginProc, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "serve",
		"--endpoint", "unix://"+socket,
		"--local-keyset", keyset,
		"--http-addr", addr,
		"--kek-max-uses", "1",
		"--kek-cache-size", strconv.Itoa(max(20000, 2*cacheSize)),
		// This run measures memory with every Decrypt a distinct local KEK;
		// lift the unwrap rate limit out of its way.
		"--kek-unwrap-rate", "100000", "--kek-unwrap-burst", "100000",
		"--log-level", "warn",
	)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &pluginProc{cmd: cmd, httpAddr: addr, waitc: make(chan error, 1)}
	go func() { p.waitc <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := dialReady(ctx, socket)
		if err == nil {
			p.c = c
			return p, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			p.stop()
			return nil, fmt.Errorf("kms-plugin did not become ready within 30 s: %w", err)
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the process to exit.
func (p *pluginProc) stop() error {
	if p.stopped {
		return nil
	}
	p.stopped = true
	if p.c != nil {
		p.c.Close()
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.waitc:
		return err
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.waitc
		return fmt.Errorf("kms-plugin did not stop within 15 s; killed")
	}
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	l.Close()
	return addr, nil
}

// pluginStatus is the part of GET /status the benchmark reads.
type pluginStatus struct {
	LocalKEK struct {
		CreatedSinceStart uint64 `json:"createdSinceStart"`
	} `json:"localKEK"`
	Cache struct {
		Entries         int    `json:"entries"`
		ProviderUnwraps uint64 `json:"providerUnwraps"`
	} `json:"cache"`
}

func getStatus(ctx context.Context, addr string) (pluginStatus, error) {
	var st pluginStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/status", nil)
	if err != nil {
		return st, err
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return st, fmt.Errorf("GET /status: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET /status: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("GET /status: %w", err)
	}
	return st, nil
}

// readRSS returns VmRSS and VmHWM of pid in KiB.
func readRSS(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("parse %s of pid %d: %w", k, pid, err)
		}
		if k == "VmRSS" {
			rss = n
		} else {
			hwm = n
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return rss, hwm, sc.Err()
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
