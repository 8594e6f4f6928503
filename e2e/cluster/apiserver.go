package cluster

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/rest"
)

// APIServerConfig configures a kube-apiserver process.
type APIServerConfig struct {
	Binary                 string // kube-apiserver binary
	Dir                    string // certificates, token file and log
	EtcdURL                string // --etcd-servers
	EncryptionProviderFile string // --encryption-provider-config
}

// APIServer is a kube-apiserver process on loopback that authenticates a
// static bearer token in group system:masters and serves a self-signed
// certificate.
type APIServer struct {
	URL   string // https://127.0.0.1:port
	CA    []byte // PEM of the serving certificate, which is its own CA
	Token string // bearer token of user e2e-admin in system:masters

	proc *Process
	http *http.Client
}

// NewAPIServer writes the serving certificate, the service-account key and
// the token file into cfg.Dir and picks a free port; Start runs it.
func NewAPIServer(cfg APIServerConfig) (*APIServer, error) {
	if cfg.Binary == "" || cfg.Dir == "" || cfg.EtcdURL == "" || cfg.EncryptionProviderFile == "" {
		return nil, fmt.Errorf("kube-apiserver: Binary, Dir, EtcdURL and EncryptionProviderFile are required")
	}
	creds, err := newAPIServerCreds()
	if err != nil {
		return nil, err
	}
	a, port, err := creds.prepare(cfg.Dir)
	if err != nil {
		return nil, err
	}
	a.proc = &Process{
		Name:    "kube-apiserver",
		Path:    cfg.Binary,
		LogPath: filepath.Join(cfg.Dir, "kube-apiserver.log"),
		Args:    apiServerArgs(cfg.Dir, port, []string{"--etcd-servers=" + cfg.EtcdURL}, cfg.EncryptionProviderFile),
	}
	return a, nil
}

// apiServerArgs are the flags of every kube-apiserver the harness starts:
// etcdFlags, loopback serving on port with the credentials prepare wrote
// to dir, RBAC, and the EncryptionConfiguration at encryptionConfig.
func apiServerArgs(dir string, port int, etcdFlags []string, encryptionConfig string) []string {
	path := func(name string) string { return filepath.Join(dir, name) }
	return append(etcdFlags,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--tls-cert-file="+path("serving.crt"),
		"--tls-private-key-file="+path("serving.key"),
		"--token-auth-file="+path("tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+path("sa.pub"),
		"--service-account-signing-key-file="+path("sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		// The advertise address is loopback, which Endpoints may not hold.
		"--endpoint-reconciler-type=none",
		"--encryption-provider-config="+encryptionConfig,
		"--encryption-provider-config-automatic-reload=false",
		"--profiling=false",
		"--v=2",
	)
}

// Process is the kube-apiserver process.
func (a *APIServer) Process() *Process { return a.proc }

// Start starts kube-apiserver and waits until GET /readyz answers 200.
func (a *APIServer) Start(ctx context.Context) error {
	if err := a.proc.Start(); err != nil {
		return err
	}
	return a.WaitReady(ctx, "/readyz", 3*time.Minute)
}

// WaitReady polls GET path until it answers 200, for at most timeout.
func (a *APIServer) WaitReady(ctx context.Context, path string, timeout time.Duration) error {
	return waitUntil(ctx, a.proc, timeout, 250*time.Millisecond, "kube-apiserver "+path+" 200", func(ctx context.Context) (bool, error) {
		code, body, err := a.Get(ctx, path)
		if err != nil {
			return false, err
		}
		return code == http.StatusOK, fmt.Errorf("%s: %d %q", path, code, lastLines(body, 5))
	})
}

// Stop sends SIGTERM and waits.
func (a *APIServer) Stop() error { return a.proc.Stop() }

// Restart stops kube-apiserver gracefully, starts it again and waits for
// /readyz.
func (a *APIServer) Restart(ctx context.Context) error {
	if err := a.Stop(); err != nil {
		return err
	}
	return a.Start(ctx)
}

// Get does an authenticated GET path.
func (a *APIServer) Get(ctx context.Context, path string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.URL+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+a.Token)
	resp, err := a.http.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, string(body), err
}

// ReadyzChecks returns the names of the checks GET /readyz?verbose lists.
func (a *APIServer) ReadyzChecks(ctx context.Context) ([]string, error) {
	_, body, err := a.Get(ctx, "/readyz?verbose")
	if err != nil {
		return nil, err
	}
	var names []string
	s := bufio.NewScanner(strings.NewReader(body))
	for s.Scan() {
		// Lines look like "[+]kms-providers ok" or "[-]etcd failed: ...".
		line := s.Text()
		if len(line) < 3 || line[0] != '[' || line[2] != ']' {
			continue
		}
		name, _, _ := strings.Cut(line[3:], " ")
		names = append(names, name)
	}
	return names, s.Err()
}

// RestConfig is a client configuration for the static admin token.
func (a *APIServer) RestConfig() *rest.Config {
	return &rest.Config{
		Host:            a.URL,
		BearerToken:     a.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: a.CA},
		QPS:             200,
		Burst:           400,
		Timeout:         30 * time.Second,
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// selfSignedServingCert returns a P-256 certificate for 127.0.0.1 and
// localhost that is its own CA, and its key, both PEM.
func selfSignedServingCert() (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "kms-plugin e2e kube-apiserver"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// serviceAccountKey returns a P-256 service-account signing key and its
// public key, both PEM.
func serviceAccountKey() (keyPEM, pubPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), nil
}

// apiServerCreds are what every kube-apiserver of the control plane
// shares: serving certificate, service-account keys and admin token.
type apiServerCreds struct {
	certPEM, keyPEM, saKeyPEM, saPubPEM []byte
	token                               string
}

func newAPIServerCreds() (*apiServerCreds, error) {
	var c apiServerCreds
	var err error
	if c.certPEM, c.keyPEM, err = selfSignedServingCert(); err != nil {
		return nil, err
	}
	if c.saKeyPEM, c.saPubPEM, err = serviceAccountKey(); err != nil {
		return nil, err
	}
	c.token = RandomHex(16)
	return &c, nil
}

// prepare picks a free port, writes the credentials into dir (serving.crt,
// serving.key, sa.key, sa.pub, tokens.csv) and returns the APIServer's
// client side, for the caller to add its process.
func (c *apiServerCreds) prepare(dir string) (*APIServer, int, error) {
	port, err := FreePort()
	if err != nil {
		return nil, 0, err
	}
	for name, data := range map[string][]byte{
		"serving.crt": c.certPEM,
		"serving.key": c.keyPEM,
		"sa.key":      c.saKeyPEM,
		"sa.pub":      c.saPubPEM,
		"tokens.csv":  []byte(c.token + `,e2e-admin,e2e-admin-uid,"system:masters"` + "\n"),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return nil, 0, err
		}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.certPEM) {
		return nil, 0, fmt.Errorf("kube-apiserver: cannot parse generated certificate")
	}
	return &APIServer{
		URL:   fmt.Sprintf("https://127.0.0.1:%d", port),
		CA:    c.certPEM,
		Token: c.token,
		http: &http.Client{
			Timeout:   15 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
		},
	}, port, nil
}
