package server

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// scripted is a kmsservice.Service whose answers a test sets.
type scripted struct {
	encryptErr error
	block      chan struct{} // when set, Encrypt waits for it to close
	started    chan struct{} // closed when a blocked Encrypt starts
	panicOn    string
}

func (s *scripted) Status(ctx context.Context) (*kmsservice.StatusResponse, error) {
	if s.panicOn == "Status" {
		panic("boom")
	}
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: "k1"}, nil
}

func (s *scripted) Encrypt(ctx context.Context, uid string, pt []byte) (*kmsservice.EncryptResponse, error) {
	if s.block != nil {
		close(s.started)
		<-s.block
	}
	if s.encryptErr != nil {
		return nil, s.encryptErr
	}
	return &kmsservice.EncryptResponse{Ciphertext: append([]byte("ct:"), pt...), KeyID: "k1"}, nil
}

func (s *scripted) Decrypt(ctx context.Context, uid string, req *kmsservice.DecryptRequest) ([]byte, error) {
	return req.Ciphertext[3:], nil
}

type recordingObserver struct {
	mu    sync.Mutex
	calls []string
}

func (r *recordingObserver) ObserveRPC(method, code string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, method+" "+code)
}

type running struct {
	srv    *Server
	client kmsapi.KeyManagementServiceClient
	path   string
	cancel context.CancelFunc
	done   chan error

	once    sync.Once
	serveEr error
}

// wait returns what Serve returned, waiting up to 15 s for it.
func (r *running) wait(t *testing.T) error {
	t.Helper()
	r.once.Do(func() {
		select {
		case r.serveEr = <-r.done:
		case <-time.After(15 * time.Second):
			r.serveEr = errors.New("Serve did not return within 15 s")
		}
	})
	return r.serveEr
}

func start(t *testing.T, cfg Config) *running {
	t.Helper()
	if cfg.SocketPath == "" {
		cfg.SocketPath = filepath.Join(t.TempDir(), "kms.sock")
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{srv: srv, path: cfg.SocketPath, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(ctx) }()
	conn, err := grpc.NewClient("unix://"+cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); r.stop(t) })
	r.client = kmsapi.NewKeyManagementServiceClient(conn)
	return r
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	if err := r.wait(t); err != nil {
		t.Errorf("Serve = %v", err)
	}
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRoundTripAndSocketMode(t *testing.T) {
	obs := &recordingObserver{}
	r := start(t, Config{Service: &scripted{}, Observer: obs})
	ctx := callCtx(t)
	st, err := r.client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" || st.KeyId != "k1" || st.Version != "v2" {
		t.Fatalf("Status = %v, %v", st, err)
	}
	enc, err := r.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed"), Uid: "u1"})
	if err != nil {
		t.Fatal(err)
	}
	dec, err := r.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "u2"})
	if err != nil || string(dec.Plaintext) != "seed" {
		t.Fatalf("Decrypt = %v, %v", dec, err)
	}
	fi, err := os.Stat(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket mode = %v; want socket 0600", fi.Mode())
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	want := []string{"Status OK", "Encrypt OK", "Decrypt OK"}
	if len(obs.calls) != 3 || obs.calls[0] != want[0] || obs.calls[1] != want[1] || obs.calls[2] != want[2] {
		t.Fatalf("observed %v; want %v", obs.calls, want)
	}
}

func TestSocketGroup(t *testing.T) {
	gid := os.Getgid()
	r := start(t, Config{Service: &scripted{}, SocketGroup: strconv.Itoa(gid)})
	fi, err := os.Stat(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode with a group = %v; want 0660", fi.Mode().Perm())
	}
	srv, _ := New(Config{Service: &scripted{}, SocketPath: filepath.Join(t.TempDir(), "s.sock"), SocketGroup: "no-such-group-kms"})
	if err := srv.Listen(); err == nil {
		t.Fatal("Listen with an unknown group succeeded")
	}
}

func TestErrorCodes(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want codes.Code
	}{
		{envelope.ErrInvalidInput, codes.InvalidArgument},
		{provider.ErrInvalidCiphertext, codes.InvalidArgument},
		{provider.ErrKeyNotFound, codes.FailedPrecondition},
		{provider.ErrKeyDisabled, codes.FailedPrecondition},
		{envelope.ErrNotReady, codes.Unavailable},
		{provider.ErrUnavailable, codes.Unavailable},
		{provider.ErrPermissionDenied, codes.PermissionDenied},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{errors.New("something else"), codes.Internal},
	} {
		t.Run(tt.err.Error(), func(t *testing.T) {
			r := start(t, Config{Service: &scripted{encryptErr: tt.err}})
			_, err := r.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("x")})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("code = %v (%v); want %v", got, err, tt.want)
			}
		})
	}
}

func TestPanicBecomesInternalAndIsLogged(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	r := start(t, Config{Service: &scripted{panicOn: "Status"}, Logger: zap.New(core)})
	_, err := r.client.Status(callCtx(t), &kmsapi.StatusRequest{})
	if status.Code(err) != codes.Internal {
		t.Fatalf("Status after panic = %v; want Internal", err)
	}
	if logs.FilterMessage("panic in handler").Len() != 1 {
		t.Fatalf("panic not logged: %v", logs.All())
	}
	// The server survives.
	if _, err := r.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil {
		t.Fatalf("Encrypt after a panic: %v", err)
	}
}

func TestRequestLogCarriesUIDNotData(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	r := start(t, Config{Service: &scripted{}, Logger: zap.New(core)})
	if _, err := r.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("TOPSECRETSEED"), Uid: "req-42"}); err != nil {
		t.Fatal(err)
	}
	entries := logs.FilterMessage("request").All()
	if len(entries) != 1 || entries[0].ContextMap()["uid"] != "req-42" {
		t.Fatalf("request log = %v; want one entry with uid req-42", entries)
	}
	for _, e := range logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && (s == "TOPSECRETSEED" || s == "ct:TOPSECRETSEED") {
				t.Fatalf("log field %s carries request data", k)
			}
		}
	}
}

func TestOversizedRequest(t *testing.T) {
	r := start(t, Config{Service: &scripted{}})
	_, err := r.client.Decrypt(callCtx(t), &kmsapi.DecryptRequest{Ciphertext: make([]byte, 2<<20), KeyId: "k"})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("2 MiB Decrypt = %v; want ResourceExhausted", err)
	}
}

func TestSocketPathSafety(t *testing.T) {
	dir := t.TempDir()
	svc := &scripted{}

	// A regular file is never removed.
	file := filepath.Join(dir, "file.sock")
	os.WriteFile(file, []byte("keep me"), 0o600)
	// A symlink is refused.
	link := filepath.Join(dir, "link.sock")
	os.Symlink(file, link)
	// A stale socket (nothing listening) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	// A live socket is refused.
	live := filepath.Join(dir, "live.sock")
	ll, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()

	for _, tt := range []struct {
		name, path string
		wantOK     bool
	}{
		{"regular file", file, false},
		{"symlink", link, false},
		{"stale socket", stale, true},
		{"live socket", live, false},
		{"missing directory", filepath.Join(dir, "new", "kms.sock"), true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv, err := New(Config{Service: svc, SocketPath: tt.path})
			if err != nil {
				t.Fatal(err)
			}
			err = srv.Listen()
			if (err == nil) != tt.wantOK {
				t.Fatalf("Listen = %v; want ok=%v", err, tt.wantOK)
			}
			if err == nil {
				srv.lis.Close()
			}
		})
	}
	if data, _ := os.ReadFile(file); string(data) != "keep me" {
		t.Fatal("the regular file was changed")
	}
}

func TestGracefulShutdownDrainsAndRemovesSocket(t *testing.T) {
	svc := &scripted{block: make(chan struct{}), started: make(chan struct{})}
	r := start(t, Config{Service: svc})
	result := make(chan error, 1)
	go func() {
		_, err := r.client.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: []byte("x")})
		result <- err
	}()
	<-svc.started
	r.cancel() // SIGTERM
	time.Sleep(100 * time.Millisecond)
	// New connections are refused while the in-flight call drains.
	if c, err := net.DialTimeout("unix", r.path, time.Second); err == nil {
		c.Close()
		t.Fatal("socket still accepts connections during drain")
	}
	close(svc.block)
	if err := <-result; err != nil {
		t.Fatalf("in-flight Encrypt during shutdown = %v; want success", err)
	}
	if err := r.wait(t); err != nil {
		t.Fatalf("Serve = %v", err)
	}
	if _, err := os.Lstat(r.path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind after shutdown: %v", err)
	}
}

// TestWithEnvelope runs the real envelope behind the server: bad input comes
// back as InvalidArgument or FailedPrecondition over the socket.
func TestWithEnvelope(t *testing.T) {
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	svc, _ := envelope.New(envelope.Config{Provider: lp})
	r := start(t, Config{Service: svc})
	ctx := callCtx(t)
	if _, err := r.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")}); status.Code(err) != codes.Unavailable {
		t.Fatalf("Encrypt before the first poll = %v; want Unavailable", err)
	}
	if err := svc.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	enc, err := r.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32)})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		req  *kmsapi.DecryptRequest
		want codes.Code
	}{
		{"garbage", &kmsapi.DecryptRequest{Ciphertext: []byte("garbage"), KeyId: enc.KeyId, Annotations: enc.Annotations}, codes.InvalidArgument},
		{"no annotations", &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId}, codes.InvalidArgument},
		{"unknown version", &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: envelope.DeriveKeyID("local", "99"),
			Annotations: map[string][]byte{envelope.AnnotationVersion: []byte("1"), envelope.AnnotationLocalKEK: append([]byte{1, 2, '9', '9'}, wrappedPart(enc.Annotations[envelope.AnnotationLocalKEK])...)}}, codes.FailedPrecondition},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := r.client.Decrypt(ctx, tt.req)
			if status.Code(err) != tt.want {
				t.Fatalf("Decrypt = %v; want %v", err, tt.want)
			}
		})
	}
}

// wrappedPart returns the wrapped key inside an lkek annotation whose version
// is shorter than 128 bytes (one uvarint byte).
func wrappedPart(a []byte) []byte { return a[2+int(a[1]):] }
