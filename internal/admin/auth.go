package admin

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/logthrottle"
)

// DefaultAuthFailureLogInterval is AuthFailureLogInterval when left zero.
const DefaultAuthFailureLogInterval = 10 * time.Second

// AuthObserver counts failed authentications; Config.Observer may
// implement it.
type AuthObserver interface {
	// ObserveAuthFailure records one request refused (401, 403) or not
	// checked (500) by Config.Authenticate, by endpoint: "status",
	// "refresh" or "metrics".
	ObserveAuthFailure(endpoint string)
}

// Endpoints passed to AuthObserver.ObserveAuthFailure.
const (
	endpointStatus  = "status"
	endpointRefresh = "refresh"
	endpointMetrics = "metrics"
)

// checkExposure reports whether cfg.Addr is a loopback address, and
// returns an error if it is not while TLS or Authenticate is missing, or
// if the settings contradict each other.
func checkExposure(cfg Config) (loopback bool, err error) {
	loopback, err = adminauth.IsLoopback(cfg.Addr)
	if err != nil {
		return false, fmt.Errorf("admin: %w", err)
	}
	if cfg.ProtectMetrics && cfg.Authenticate == nil {
		return false, errors.New("admin: protecting /metrics needs an authenticator: set httpTLS.clientCAFile or httpAuth.tokenFile")
	}
	if cfg.TLS != nil && cfg.TLS.Certificates == nil && cfg.TLS.GetCertificate == nil && cfg.TLS.GetConfigForClient == nil {
		return false, errors.New("admin: the TLS configuration has no certificate: set httpTLS.certFile and httpTLS.keyFile")
	}
	if !loopback && (cfg.TLS == nil || cfg.Authenticate == nil) {
		return false, fmt.Errorf("admin: %s is not a loopback address, so /status and /refresh would answer anyone who reaches it: %s", cfg.Addr, exposureFix(cfg))
	}
	return loopback, nil
}

// exposureFix says what to set to serve on a non-loopback address.
func exposureFix(cfg Config) string {
	var missing []string
	if cfg.TLS == nil {
		missing = append(missing, "httpTLS.certFile and httpTLS.keyFile")
	}
	if cfg.Authenticate == nil {
		missing = append(missing, "httpTLS.clientCAFile or httpAuth.tokenFile")
	}
	if len(missing) == 0 {
		return "listen on 127.0.0.1 or ::1"
	}
	return "set " + strings.Join(missing, ", and ") + " (or listen on 127.0.0.1)"
}

// guard returns h behind Config.Authenticate, or h itself without one.
func (s *Server) guard(endpoint string, h http.Handler) http.Handler {
	if s.cfg.Authenticate == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := s.cfg.Authenticate(r)
		if err == nil {
			h.ServeHTTP(w, r)
			return
		}
		code := http.StatusUnauthorized
		switch {
		case errors.Is(err, adminauth.ErrForbidden):
			code = http.StatusForbidden
		case errors.Is(err, adminauth.ErrNoCredential), errors.Is(err, adminauth.ErrBadCredential):
		default:
			code = http.StatusInternalServerError
		}
		s.authFailed(endpoint, code, r, err)
		switch code {
		case http.StatusUnauthorized:
			w.Header().Set("WWW-Authenticate", `Bearer realm="kms-plugin"`)
			plainText(w, code, "unauthorized: present a client certificate of the admin CA or an Authorization: Bearer token")
		case http.StatusForbidden:
			plainText(w, code, "forbidden: this client certificate's identity is not allowed")
		default:
			plainText(w, code, "cannot check credentials now; the plugin's log tells why")
		}
	})
}

// authFailed counts a refused request and logs it, at most once per
// endpoint per AuthFailureLogInterval.
func (s *Server) authFailed(endpoint string, code int, r *http.Request, err error) {
	if s.authObserver != nil {
		s.authObserver.ObserveAuthFailure(endpoint)
	}
	level, msg := zap.WarnLevel, "request refused: authentication failed"
	if code == http.StatusInternalServerError {
		level, msg = zap.ErrorLevel, "request refused: credentials could not be checked"
	}
	ce := s.log.Check(level, msg)
	if ce == nil {
		return
	}
	ok, suppressed := s.authFailures.Admit(endpoint)
	if !ok {
		return
	}
	fields := []zap.Field{zap.String("endpoint", endpoint), zap.Int("code", code), zap.String("remote", r.RemoteAddr), zap.Error(err)}
	if suppressed > 0 {
		fields = append(fields, zap.Uint64("similarSinceLastLine", suppressed))
	}
	ce.Write(fields...)
}

// errorLogWriter takes the http.Server's error log: TLS handshake
// failures (scanners, plain HTTP, certificates of another CA, TCP probes)
// are logged at most once per interval with a count; other lines as they
// come.
type errorLogWriter struct {
	log      *zap.Logger
	failures *logthrottle.Throttle
}

const handshakeCause = "tls handshake"

func (e *errorLogWriter) Write(p []byte) (int, error) {
	msg := string(bytes.TrimSpace(p))
	if !strings.HasPrefix(msg, "http: TLS handshake error") {
		e.log.Warn(msg)
		return len(p), nil
	}
	ce := e.log.Check(zap.WarnLevel, "TLS handshake failed")
	if ce == nil {
		return len(p), nil
	}
	ok, suppressed := e.failures.Admit(handshakeCause)
	if !ok {
		return len(p), nil
	}
	fields := []zap.Field{zap.String("error", strings.TrimPrefix(msg, "http: TLS handshake error "))}
	if suppressed > 0 {
		fields = append(fields, zap.Uint64("similarSinceLastLine", suppressed))
	}
	ce.Write(fields...)
	return len(p), nil
}
