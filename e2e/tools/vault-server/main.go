// Command vault-server runs a real HashiCorp Vault core (v1.21.4, built from
// the module proxy) behind a real HTTP listener on loopback, for the vault
// provider's tests. It is test tooling, never a product binary.
//
// Unlike Vault's in-memory test cores, it keeps its storage in a directory
// (Vault's file physical backend) and its unseal key and root token in a 0600
// state file beside it, so a test can SIGKILL it and start it again on the
// same -data and -addr: the restarted core unseals itself with the saved key
// and serves the same keys, tokens and mounts.
//
// Once the core is unsealed and serving, it prints exactly one JSON line on
// stdout:
//
//	{"address":"http://127.0.0.1:PORT","root_token":"hvs...","unseal_keys":["base64"],"ca_file":"","pid":N,"restarted":false}
//
// Mounts, policies and auth methods are left to the tests (sys/mounts,
// sys/auth over HTTP); the transit secrets engine and the approle, cert and
// jwt auth methods are registered and can be enabled.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-kms-wrapping/wrappers/aead/v2"
	jwtauth "github.com/hashicorp/vault-plugin-auth-jwt"
	"github.com/hashicorp/vault/builtin/credential/approle"
	"github.com/hashicorp/vault/builtin/credential/cert"
	"github.com/hashicorp/vault/builtin/logical/transit"
	"github.com/hashicorp/vault/helper/testhelpers/corehelpers"
	vaulthttp "github.com/hashicorp/vault/http"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/physical/file"
	"github.com/hashicorp/vault/vault"
	"github.com/hashicorp/vault/vault/seal"
)

// state is what survives a restart besides the storage directory.
type state struct {
	UnsealKeys []string `json:"unseal_keys"` // base64
	RootToken  string   `json:"root_token"`
}

// ready is the single JSON line printed on stdout.
type ready struct {
	Address    string   `json:"address"`
	RootToken  string   `json:"root_token"`
	UnsealKeys []string `json:"unseal_keys"`
	CAFile     string   `json:"ca_file"`
	PID        int      `json:"pid"`
	Restarted  bool     `json:"restarted"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "vault-server: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	dataDir := flag.String("data", "", "directory for Vault's storage, the unseal key and the root token (required; reused on restart)")
	addr := flag.String("addr", "127.0.0.1:0", "loopback listen address; pass the previous address to restart on the same port")
	useTLS := flag.Bool("tls", false, "serve HTTPS with a CA and server certificate generated into -data (reused on restart); client certificates are requested for cert auth")
	logLevel := flag.String("log-level", "warn", "Vault core log level (stderr)")
	rollback := flag.Duration("rollback-period", 0, "how often Vault runs its backends' periodic functions (transit's auto_rotate_period check among them); 0 keeps Vault's default of 1m")
	exitOnEOF := flag.Bool("exit-on-stdin-eof", false, "exit when stdin closes, so a crashed test never leaves a server behind")
	flag.Parse()
	if *dataDir == "" {
		return errors.New("-data is required")
	}
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		return fmt.Errorf("-addr %q: %w", *addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-addr %q: only loopback addresses are allowed", *addr)
	}
	if err := os.MkdirAll(filepath.Join(*dataDir, "storage"), 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}

	logger := hclog.New(&hclog.LoggerOptions{Name: "vault", Level: hclog.LevelFromString(*logLevel), Output: os.Stderr})
	tb := newTB(logger)
	defer tb.cleanup()

	backend, err := file.NewFileBackend(map[string]string{"path": filepath.Join(*dataDir, "storage")}, logger.Named("storage"))
	if err != nil {
		return fmt.Errorf("file storage backend: %w", err)
	}
	core, err := vault.NewCore(&vault.CoreConfig{
		Physical:     backend,
		Seal:         newShamirSeal(logger),
		DisableMlock: true,
		Logger:       logger,
		LogicalBackends: map[string]logical.Factory{
			"transit": transit.Factory,
		},
		CredentialBackends: map[string]logical.Factory{
			"approle": approle.Factory,
			"cert":    cert.Factory,
			"jwt":     jwtauth.Factory,
		},
		BuiltinRegistry:    corehelpers.NewMockBuiltinRegistry(),
		NumRollbackWorkers: 2,
		RollbackPeriod:     *rollback,
	})
	if err != nil {
		return fmt.Errorf("new core: %w", err)
	}
	defer func() { _ = core.ShutdownWait() }()

	ctx := context.Background()
	st, restarted, err := initOrLoad(ctx, core, filepath.Join(*dataDir, "state.json"))
	if err != nil {
		return err
	}
	for _, k := range st.UnsealKeys {
		key, err := base64.StdEncoding.DecodeString(k)
		if err != nil {
			return fmt.Errorf("state file: unseal key: %w", err)
		}
		if _, err := core.Unseal(key); err != nil {
			return fmt.Errorf("unseal: %w", err)
		}
	}
	if err := waitActive(core, 30*time.Second); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	scheme, caFile := "http", ""
	if *useTLS {
		tlsConf, ca, err := serverTLS(*dataDir)
		if err != nil {
			return err
		}
		ln, scheme, caFile = tls.NewListener(ln, tlsConf), "https", ca
	}
	address := scheme + "://" + ln.Addr().String()
	vaulthttp.TestServerWithListener(tb, ln, address, core)

	line, err := json.Marshal(ready{Address: address, RootToken: st.RootToken, UnsealKeys: st.UnsealKeys, CAFile: caFile, PID: os.Getpid(), Restarted: restarted})
	if err != nil {
		return err
	}
	fmt.Println(string(line))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	eof := make(chan struct{})
	if *exitOnEOF {
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(eof) }()
	}
	select {
	case <-stop:
	case <-eof:
	case msg := <-tb.fatal:
		return errors.New(msg)
	}
	_ = ln.Close()
	return nil
}

// newShamirSeal is the Shamir seal with stored shares Vault's own test cores
// use (vault.NewTestSeal), without its trace-level test logger.
func newShamirSeal(logger hclog.Logger) vault.Seal {
	access, err := seal.NewAccessFromSealWrappers(logger.Named("seal"), 1, true, []*seal.SealWrapper{
		seal.NewSealWrapper(aead.NewShamirWrapper(), 1, "shamir", "shamir", false, true),
	})
	if err != nil {
		panic(fmt.Sprintf("shamir seal: %v", err)) // static arguments: cannot fail
	}
	s := vault.NewDefaultSeal(access)
	s.SetCachedBarrierConfig(&vault.SealConfig{StoredShares: 1, SecretThreshold: 1, SecretShares: 1})
	return s
}

// initOrLoad initializes a fresh core (saving its key and root token) or
// loads the state of a previous run.
func initOrLoad(ctx context.Context, core *vault.Core, path string) (state, bool, error) {
	inited, err := core.Initialized(ctx)
	if err != nil {
		return state{}, false, fmt.Errorf("initialized: %w", err)
	}
	if inited {
		raw, err := os.ReadFile(path)
		if err != nil {
			return state{}, false, fmt.Errorf("storage is initialized but its state file is unreadable: %w", err)
		}
		var st state
		if err := json.Unmarshal(raw, &st); err != nil {
			return state{}, false, fmt.Errorf("state file %s: %w", path, err)
		}
		return st, true, nil
	}
	res, err := core.Initialize(ctx, &vault.InitParams{
		BarrierConfig:  &vault.SealConfig{SecretShares: 1, SecretThreshold: 1, StoredShares: 1},
		RecoveryConfig: &vault.SealConfig{SecretShares: 1, SecretThreshold: 1},
	})
	if err != nil {
		return state{}, false, fmt.Errorf("initialize: %w", err)
	}
	st := state{RootToken: res.RootToken}
	for _, k := range res.SecretShares {
		st.UnsealKeys = append(st.UnsealKeys, base64.StdEncoding.EncodeToString(k))
	}
	raw, err := json.Marshal(st)
	if err != nil {
		return state{}, false, err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return state{}, false, fmt.Errorf("write state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return state{}, false, fmt.Errorf("write state: %w", err)
	}
	return st, false, nil
}

func waitActive(core *vault.Core, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if !core.Sealed() {
			if standby, _ := core.Standby(); !standby {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return errors.New("core did not become active and unsealed in time")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serverTLS returns a TLS config for 127.0.0.1 signed by a CA kept in dir
// (created on first use) and the CA file's path. Client certificates are
// requested, not required, so the cert auth method can see them.
func serverTLS(dir string) (*tls.Config, string, error) {
	caFile := filepath.Join(dir, "ca.pem")
	certFile := filepath.Join(dir, "server.pem")
	keyFile := filepath.Join(dir, "server-key.pem")
	if _, err := os.Stat(keyFile); errors.Is(err, os.ErrNotExist) {
		if err := writeServerPKI(caFile, certFile, keyFile); err != nil {
			return nil, "", fmt.Errorf("generate TLS certificates: %w", err)
		}
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, "", fmt.Errorf("load server certificate: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequestClientCert,
	}, caFile, nil
}

func writeServerPKI(caFile, certFile, keyFile string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vault-server test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "vault.test"},
		DNSNames:     []string{"vault.test", "localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caTmpl, &srvKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
}

// tb adapts Vault's exported test helpers, which take a testing.TB, to a
// long-running process: Fatal ends the process through run, logs go to the
// core's logger. testing.TB has an unexported method, so the interface is
// embedded (nil) and every method the helpers call is overridden.
type tb struct {
	testing.TB
	logger   hclog.Logger
	fatal    chan string
	cleanups []func()
}

func newTB(logger hclog.Logger) *tb {
	return &tb{logger: logger, fatal: make(chan string, 1)}
}

func (t *tb) Helper()                           {}
func (t *tb) Name() string                      { return "vault-server" }
func (t *tb) Log(args ...any)                   { t.logger.Info(fmt.Sprint(args...)) }
func (t *tb) Logf(format string, args ...any)   { t.logger.Info(fmt.Sprintf(format, args...)) }
func (t *tb) Error(args ...any)                 { t.logger.Error(fmt.Sprint(args...)) }
func (t *tb) Errorf(format string, args ...any) { t.logger.Error(fmt.Sprintf(format, args...)) }
func (t *tb) Fatal(args ...any)                 { t.fail(fmt.Sprint(args...)) }
func (t *tb) Fatalf(format string, args ...any) { t.fail(fmt.Sprintf(format, args...)) }
func (t *tb) FailNow()                          { t.fail("FailNow") }
func (t *tb) Fail()                             {}
func (t *tb) Failed() bool                      { return false }
func (t *tb) Skipped() bool                     { return false }
func (t *tb) Cleanup(f func())                  { t.cleanups = append(t.cleanups, f) }
func (t *tb) TempDir() string {
	dir, err := os.MkdirTemp("", "vault-server-")
	if err != nil {
		t.fail(err.Error())
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (t *tb) fail(msg string) {
	select {
	case t.fatal <- msg:
	default:
	}
	runtime.Goexit()
}

func (t *tb) cleanup() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}
