// Package server serves a k8s.io/kms service.Service to kube-apiserver over
// a Unix socket with gRPC (KMS v2). It owns the socket (permissions, stale
// socket removal, symlink refusal), the interceptors (panic recovery, metrics,
// request logging), the mapping of errors to gRPC codes, and the graceful
// drain on shutdown. The protobuf types stay in this package.
package server

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/logthrottle"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// maxRecvMsgSize bounds requests. A valid Decrypt request is at most 1 KiB
// of ciphertext, 1 KiB of key_id and 32 KiB of annotations; the limit is
// well above that so that oversized fields reach the service's validation
// and get InvalidArgument with a message naming the field. Anything larger
// is refused by gRPC itself with ResourceExhausted.
const maxRecvMsgSize = 1 << 20

// RPCObserver records finished requests; *metrics.Metrics implements it.
type RPCObserver interface {
	ObserveRPC(method, code string, d time.Duration)
}

// Config configures a Server.
type Config struct {
	// SocketPath is the absolute path of the Unix socket. Required.
	SocketPath string
	// SocketGroup, when set, is a group name or numeric gid: the socket gets
	// that group and mode 0660. Otherwise it is 0600.
	SocketGroup string
	// Service answers the requests. Required.
	Service kmsservice.Service
	// Observer records every request. Optional.
	Observer RPCObserver
	// Logger receives request logs. Default: no logging.
	Logger *zap.Logger
	// ShutdownTimeout bounds the drain of in-flight calls. Default 10 s.
	ShutdownTimeout time.Duration
	// FailureLogInterval is how often failed requests of one cause (method
	// and code) are logged at most; the next line carries the count of
	// those held back. Default 10 s. Metrics count every request.
	FailureLogInterval time.Duration
	// Now is the clock of the failure log. Default time.Now.
	Now func() time.Time
}

// DefaultFailureLogInterval is how often one cause of failed requests is
// logged at most.
const DefaultFailureLogInterval = 10 * time.Second

// Server is the KMS v2 gRPC server on a Unix socket.
type Server struct {
	cfg      Config
	log      *zap.Logger
	failures *logthrottle.Throttle
	grpc     *grpc.Server
	lis      net.Listener
}

// New returns a Server. It opens nothing: call Listen, then Serve.
func New(cfg Config) (*Server, error) {
	if cfg.SocketPath == "" || !filepath.IsAbs(cfg.SocketPath) {
		return nil, fmt.Errorf("server: socket path %q must be absolute", cfg.SocketPath)
	}
	if cfg.Service == nil {
		return nil, errors.New("server: no service")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.FailureLogInterval <= 0 {
		cfg.FailureLogInterval = DefaultFailureLogInterval
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, log: cfg.Logger, failures: logthrottle.New(cfg.FailureLogInterval, cfg.Now)}
	s.grpc = grpc.NewServer(
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.ChainUnaryInterceptor(s.observe, s.recover),
	)
	kmsapi.RegisterKeyManagementServiceServer(s.grpc, &kmsServer{svc: cfg.Service})
	return s, nil
}

// Listen creates the socket. It refuses a symlinked path and anything that
// is not a socket, removes a stale socket only when nothing answers on it,
// and sets the socket's mode (0600, or 0660 with SocketGroup).
func (s *Server) Listen() error {
	path := s.cfg.SocketPath
	gid := -1
	if s.cfg.SocketGroup != "" {
		g, err := lookupGroup(s.cfg.SocketGroup)
		if err != nil {
			return err
		}
		gid = g
	}
	if err := removeStaleSocket(path); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("server: create socket directory: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("server: listen on %s: %w", path, err)
	}
	mode := fs.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Chown(path, -1, gid); err != nil {
			lis.Close()
			return fmt.Errorf("server: set socket group %s: %w", s.cfg.SocketGroup, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		lis.Close()
		return fmt.Errorf("server: set socket mode: %w", err)
	}
	s.lis = lis
	return nil
}

// Serve answers requests until ctx ends, then stops accepting, drains
// in-flight calls for up to ShutdownTimeout and removes the socket.
func (s *Server) Serve(ctx context.Context) error {
	if s.lis == nil {
		return errors.New("server: Serve before Listen")
	}
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(s.lis) }()
	s.log.Info("serving KMS v2", zap.String("socket", s.cfg.SocketPath))
	var serveErr error
	select {
	case serveErr = <-errc:
	case <-ctx.Done():
		s.log.Info("draining in-flight requests", zap.Duration("timeout", s.cfg.ShutdownTimeout))
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(s.cfg.ShutdownTimeout):
			s.log.Warn("drain timed out; closing remaining connections")
			s.grpc.Stop()
			<-done
		}
		serveErr = <-errc
	}
	if err := os.Remove(s.cfg.SocketPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("could not remove socket", zap.Error(err))
	}
	if errors.Is(serveErr, grpc.ErrServerStopped) {
		serveErr = nil
	}
	if serveErr != nil {
		return fmt.Errorf("server: %w", serveErr)
	}
	return nil
}

// removeStaleSocket makes path free for a new socket, or says why it is not.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("server: stat socket path: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("server: socket path %s is a symlink; refusing to use it", path)
	case fi.Mode()&fs.ModeSocket == 0:
		return fmt.Errorf("server: %s exists and is not a socket; refusing to remove it", path)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("server: another process is serving on %s", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("server: remove stale socket: %w", err)
	}
	return nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("server: socket group: %w", err)
	}
	return strconv.Atoi(g.Gid)
}

// recover turns a panic in a handler into codes.Internal and logs it.
func (s *Server) recover(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in handler", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			resp, err = nil, status.Error(codes.Internal, "internal error")
		}
	}()
	return handler(ctx, req)
}

// observe records metrics and logs requests with their uid. Successful
// requests log at debug level, failures at warn (client errors) or error,
// rate-limited per cause (see logthrottle).
func (s *Server) observe(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	d := time.Since(start)
	code := status.Code(err)
	method := filepath.Base(info.FullMethod)
	if s.cfg.Observer != nil {
		s.cfg.Observer.ObserveRPC(method, code.String(), d)
	}
	var ce *zapcore.CheckedEntry
	switch code {
	case codes.OK:
		ce = s.log.Check(zap.DebugLevel, "request")
	case codes.InvalidArgument, codes.FailedPrecondition, codes.Canceled:
		ce = s.log.Check(zap.WarnLevel, "request rejected")
	default:
		ce = s.log.Check(zap.ErrorLevel, "request failed")
	}
	if ce == nil {
		return resp, err
	}
	var suppressed uint64
	if code != codes.OK {
		var ok bool
		if ok, suppressed = s.failures.Admit(method + "/" + code.String()); !ok {
			return resp, err
		}
	}
	fields := make([]zap.Field, 0, 6)
	fields = append(fields, zap.String("method", method), zap.String("code", code.String()), zap.Duration("duration", d))
	if r, ok := req.(interface{ GetUid() string }); ok && r.GetUid() != "" {
		fields = append(fields, zap.String("uid", r.GetUid()))
	}
	if err != nil {
		fields = append(fields, zap.String("error", status.Convert(err).Message()))
	}
	if suppressed > 0 {
		fields = append(fields, zap.Uint64("similarSinceLastLine", suppressed))
	}
	ce.Write(fields...)
	return resp, err
}

// kmsServer adapts a kmsservice.Service to the generated gRPC interface.
type kmsServer struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	svc kmsservice.Service
}

func (k *kmsServer) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	r, err := k.svc.Status(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &kmsapi.StatusResponse{Version: r.Version, Healthz: r.Healthz, KeyId: r.KeyID}, nil
}

func (k *kmsServer) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	r, err := k.svc.Encrypt(ctx, req.GetUid(), req.GetPlaintext())
	if err != nil {
		return nil, toStatus(err)
	}
	return &kmsapi.EncryptResponse{Ciphertext: r.Ciphertext, KeyId: r.KeyID, Annotations: r.Annotations}, nil
}

func (k *kmsServer) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	pt, err := k.svc.Decrypt(ctx, req.GetUid(), &kmsservice.DecryptRequest{
		Ciphertext:  req.GetCiphertext(),
		KeyID:       req.GetKeyId(),
		Annotations: req.GetAnnotations(),
	})
	if err != nil {
		return nil, toStatus(err)
	}
	return &kmsapi.DecryptResponse{Plaintext: pt}, nil
}

// toStatus maps service errors to gRPC codes: bad requests are
// InvalidArgument, keys the store does not know or has disabled are
// FailedPrecondition, an unreachable store is Unavailable.
func toStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, envelope.ErrInvalidInput), errors.Is(err, provider.ErrInvalidCiphertext):
		code = codes.InvalidArgument
	case errors.Is(err, provider.ErrKeyNotFound):
		code = codes.FailedPrecondition
		err = fmt.Errorf("unknown key: %w", err)
	case errors.Is(err, provider.ErrKeyDisabled):
		code = codes.FailedPrecondition
	case errors.Is(err, envelope.ErrNotReady), errors.Is(err, provider.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, provider.ErrPermissionDenied):
		code = codes.PermissionDenied
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}
