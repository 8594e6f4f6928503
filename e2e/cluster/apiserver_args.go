package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// NewAPIServerWithArgs prepares a kube-apiserver that runs with args, the
// flags of a static pod manifest (host paths already mapped), followed by
// the harness's own: etcd at etcdURL, loopback address and a free port, a
// self-signed serving certificate, the static admin token and
// service-account keys, all written into dir. Flags given twice take the
// last value, so the harness's win; args must not name files that do not
// exist (drop kubeadm's certificate flags). Start runs it.
func NewAPIServerWithArgs(binary, dir, etcdURL string, args []string) (*APIServer, error) {
	if binary == "" || dir == "" || etcdURL == "" {
		return nil, fmt.Errorf("kube-apiserver: binary, dir and etcd URL are required")
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := selfSignedServingCert()
	if err != nil {
		return nil, err
	}
	saKeyPEM, saPubPEM, err := serviceAccountKey()
	if err != nil {
		return nil, err
	}
	token, err := randomHex(16)
	if err != nil {
		return nil, err
	}
	path := func(name string) string { return filepath.Join(dir, name) }
	for name, data := range map[string][]byte{
		"serving.crt": certPEM,
		"serving.key": keyPEM,
		"sa.key":      saKeyPEM,
		"sa.pub":      saPubPEM,
		"tokens.csv":  []byte(token + `,e2e-admin,e2e-admin-uid,"system:masters"` + "\n"),
	} {
		if err := os.WriteFile(path(name), data, 0o600); err != nil {
			return nil, err
		}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(certPEM) {
		return nil, fmt.Errorf("kube-apiserver: cannot parse generated certificate")
	}
	a := &APIServer{
		URL:   fmt.Sprintf("https://127.0.0.1:%d", port),
		CA:    certPEM,
		Token: token,
		http: &http.Client{
			Timeout:   15 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
		},
	}
	a.proc = &Process{
		Name:    "kube-apiserver",
		Path:    binary,
		LogPath: path("kube-apiserver.log"),
		Args: append(append([]string(nil), args...),
			"--etcd-servers="+etcdURL,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", port),
			"--tls-cert-file="+path("serving.crt"),
			"--tls-private-key-file="+path("serving.key"),
			"--token-auth-file="+path("tokens.csv"),
			"--service-account-key-file="+path("sa.pub"),
			"--service-account-signing-key-file="+path("sa.key"),
			// The advertise address is loopback, which Endpoints may not hold.
			"--endpoint-reconciler-type=none",
		),
	}
	return a, nil
}
