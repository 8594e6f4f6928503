package cluster

import (
	"fmt"
	"path/filepath"
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
	creds, err := newAPIServerCreds()
	if err != nil {
		return nil, err
	}
	a, port, err := creds.prepare(dir)
	if err != nil {
		return nil, err
	}
	path := func(name string) string { return filepath.Join(dir, name) }
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
