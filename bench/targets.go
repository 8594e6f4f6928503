package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/logging"
	"github.com/kms-plugin/kms-plugin/internal/plugin"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/server"
)

// Target kinds served by the hidden subcommands "serve-noop" and
// "serve-plugin".
const (
	kindFloor  = "noop"
	kindPlugin = "plugin"
)

// callTimeout is the per-call deadline kube-apiserver puts on every KMS call
// (its default for KMS v2 providers).
const callTimeout = 3 * time.Second

// benchUID stands for the per-request UUID kube-apiserver sends.
const benchUID = "0f5c6f2a-3b5e-4a59-9d1f-6b1c2b7e9a41"

// target is a KMS v2 gRPC server under test on a Unix socket.
type target struct {
	Kind   string
	Socket string
	PID    int // of the child process, 0 when in-process
	stop   func() error
}

// Close stops the server.
func (t *target) Close() error {
	if t == nil || t.stop == nil {
		return nil
	}
	stop := t.stop
	t.stop = nil
	return stop()
}

// startTarget starts a server of kind ("noop" or "plugin") on socket. With
// child set it runs in a child process (this binary re-executed with a hidden
// subcommand), so that client and server do not share a heap, a GC or a
// scheduler; otherwise in this process. keyset is the plugin's local keyset.
// A non-empty cpuProfile makes the child write a CPU profile of itself there
// until it stops.
func startTarget(kind, socket, keyset string, child bool, cpuProfile string) (*target, error) {
	if !child {
		stop, err := serveKind(kind, socket, keyset, os.Stderr)
		if err != nil {
			return nil, err
		}
		return &target{Kind: kind, Socket: socket, stop: stop}, nil
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	args := []string{"serve-" + kind, "--socket", socket}
	if kind == kindPlugin {
		args = append(args, "--keyset", keyset)
	}
	if cpuProfile != "" {
		args = append(args, "--cpuprofile", cpuProfile)
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s server: %w", kind, err)
	}
	waitc := make(chan error, 1)
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected line %q", line)
		}
		ready <- err
		_, _ = io.Copy(io.Discard, stdout)
		waitc <- cmd.Wait()
	}()
	stop := func() error {
		stdin.Close() // the child stops when its stdin closes
		select {
		case err := <-waitc:
			return err
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			return fmt.Errorf("%s server did not stop within 15 s; killed", kind)
		}
	}
	select {
	case err := <-ready:
		if err != nil {
			_ = cmd.Process.Kill()
			return nil, fmt.Errorf("%s server did not start: %v", kind, err)
		}
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("%s server did not start within 60 s", kind)
	}
	return &target{Kind: kind, Socket: socket, PID: cmd.Process.Pid, stop: stop}, nil
}

// serveKind starts a server of kind in this process and returns its stop
// function once the socket accepts connections.
func serveKind(kind, socket, keyset string, logTo io.Writer) (func() error, error) {
	switch kind {
	case kindFloor:
		return serveNoop(socket)
	case kindPlugin:
		return servePlugin(socket, keyset, logTo)
	default:
		return nil, fmt.Errorf("unknown server kind %q", kind)
	}
}

// runChild is the hidden subcommand "serve-noop" or "serve-plugin": it serves
// until its stdin closes, after writing "ready" to stdout.
func runChild(kind string, args []string) error {
	fs := newFlagSet("serve-" + kind)
	socket := fs.String("socket", "", "Unix socket path")
	keyset := fs.String("keyset", "", "local keyset file (plugin)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of this server here")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	stop, err := serveKind(kind, *socket, *keyset, os.Stderr)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stdout, "ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return stop()
}

// servePlugin serves the plugin as `kms-plugin serve` assembles it
// (internal/plugin: the local provider behind the metrics decorator,
// envelope.Service, internal/server with its metrics observer, the poll
// loop, a first Refresh before the socket opens) with a warn-level JSON
// logger and no admin HTTP server, and returns once the socket is open.
func servePlugin(socket, keyset string, logTo io.Writer) (func() error, error) {
	store, err := local.New(local.Config{Path: keyset, Create: true})
	if err != nil {
		return nil, err
	}
	log, err := logging.New(logTo, "json", "warn")
	if err != nil {
		return nil, err
	}
	p, err := plugin.New(plugin.Config{
		Provider:        store,
		Endpoint:        "unix://" + socket,
		ShutdownTimeout: 5 * time.Second,
		Version:         "bench",
		Logger:          log,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-done:
		cancel()
		if err == nil {
			err = errors.New("plugin stopped before its socket opened")
		}
		return nil, err
	}
	return func() error {
		cancel()
		return <-done
	}, nil
}

// serveService serves svc behind internal/server on socket.
func serveService(socket string, svc kmsservice.Service, obs server.RPCObserver, log *zap.Logger) (func() error, error) {
	srv, err := server.New(server.Config{SocketPath: socket, Service: svc, Observer: obs, Logger: log, ShutdownTimeout: 5 * time.Second})
	if err != nil {
		return nil, err
	}
	if err := srv.Listen(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	return func() error {
		cancel()
		return <-done
	}, nil
}

// client is one gRPC connection dialed as kube-apiserver dials its KMS v2
// plugin: unix:// target, authority "localhost", insecure credentials,
// WaitForReady, and a 3 s deadline on every call.
type client struct {
	conn *grpc.ClientConn
	kms  kmsapi.KeyManagementServiceClient
}

func dial(socket string) (*client, error) {
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithChainUnaryInterceptor(deadlineInterceptor),
	)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	return &client{conn: conn, kms: kmsapi.NewKeyManagementServiceClient(conn)}, nil
}

// dialReady dials socket and waits for a healthy Status answer.
func dialReady(ctx context.Context, socket string) (*client, error) {
	c, err := dial(socket)
	if err != nil {
		return nil, err
	}
	r, err := c.kms.Status(ctx, &kmsapi.StatusRequest{})
	if err == nil && r.GetHealthz() != "ok" {
		err = fmt.Errorf("healthz %q", r.GetHealthz())
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("status of %s: %w", socket, err)
	}
	return c, nil
}

func (c *client) Close() error { return c.conn.Close() }

func deadlineInterceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	return invoker(ctx, method, req, reply, cc, opts...)
}

// dialMany dials n connections to socket, each connected and healthy.
func dialMany(ctx context.Context, socket string, n int) ([]*client, error) {
	cs := make([]*client, 0, n)
	for range n {
		c, err := dialReady(ctx, socket)
		if err != nil {
			closeAll(cs)
			return nil, err
		}
		cs = append(cs, c)
	}
	return cs, nil
}

func closeAll(cs []*client) {
	for _, c := range cs {
		c.Close()
	}
}

// errMismatch marks a response that came back without an error but with the
// wrong content.
var errMismatch = errors.New("unexpected response")
