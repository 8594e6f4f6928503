//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// authPlugin is the plugin's real admin server over HTTPS, admitting a
// client certificate of its CA (CommonName kms-plugin-admin) or its bearer
// token, following a local keyset; and the files a client needs.
type authPlugin struct {
	url                                  string // https://127.0.0.1:PORT
	port                                 string
	caFile, certFile, keyFile, tokenFile string
	// otherCertFile and otherKeyFile are a client certificate of another
	// CA, with the admitted name.
	otherCertFile, otherKeyFile string
	statusCalls, refreshCalls   func() int
}

func startAuthPlugin(t *testing.T, keyset string) *authPlugin {
	t.Helper()
	dir := t.TempDir()
	ca := adminauthtest.NewCA(t, "kms-plugin admin CA", adminauthtest.ECDSAPKCS8)
	other := adminauthtest.NewCA(t, "some other CA", adminauthtest.ECDSAPKCS8)
	srvCert, srvKey := ca.Server(t)
	cliCert, cliKey := ca.Client(t, adminauth.DefaultClientName)
	otherCert, otherKey := other.Client(t, adminauth.DefaultClientName)
	p := &authPlugin{
		caFile:        adminauthtest.WriteFile(t, dir, "ca.crt", ca.CertPEM, 0o644),
		certFile:      adminauthtest.WriteFile(t, dir, "client.crt", cliCert, 0o600),
		keyFile:       adminauthtest.WriteFile(t, dir, "client.key", cliKey, 0o600),
		tokenFile:     adminauthtest.WriteFile(t, dir, "token", []byte("s3cr3t-admin-token\n"), 0o600),
		otherCertFile: adminauthtest.WriteFile(t, dir, "other.crt", otherCert, 0o600),
		otherKeyFile:  adminauthtest.WriteFile(t, dir, "other.key", otherKey, 0o600),
	}
	sc := adminauth.ServerConfig{
		CertFile:     adminauthtest.WriteFile(t, dir, "server.crt", srvCert, 0o600),
		KeyFile:      adminauthtest.WriteFile(t, dir, "server.key", srvKey, 0o600),
		ClientCAFile: p.caFile,
		TokenFile:    p.tokenFile,
	}
	tc, err := adminauth.ServerTLS(sc)
	if err != nil {
		t.Fatal(err)
	}
	auth, err := adminauth.NewAuthenticator(sc)
	if err != nil {
		t.Fatal(err)
	}
	store, err := local.New(local.Config{Path: keyset})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var statuses, refreshes int
	s, err := admin.New(admin.Config{
		Addr: "127.0.0.1:0", TLS: tc,
		Authenticate: func(r *http.Request) error {
			err := auth.Authenticate(r)
			if err == nil {
				mu.Lock()
				if r.URL.Path == "/status" {
					statuses++
				} else {
					refreshes++
				}
				mu.Unlock()
			}
			return err
		},
		Stats: func() envelope.Stats {
			v, err := store.CurrentVersion(context.Background())
			if err != nil {
				return envelope.Stats{Provider: local.Name, LastError: err.Error()}
			}
			return envelope.Stats{Provider: local.Name, KeyID: envelope.DeriveKeyID(local.Name, v), RemoteVersion: v, Ready: true}
		},
		Refresh:            func(context.Context) error { return nil },
		RefreshMinInterval: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Serve(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	p.url = "https://" + s.Addr()
	_, p.port, _ = net.SplitHostPort(s.Addr())
	count := func(n *int) func() int {
		return func() int {
			mu.Lock()
			defer mu.Unlock()
			return *n
		}
	}
	p.statusCalls, p.refreshCalls = count(&statuses), count(&refreshes)
	return p
}

// rotateOnly is rotate as e.rotate runs it, but with the plugins that args
// name only.
func (e *rotateEnv) rotateOnly(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	args = append([]string{"--local-keyset", e.keyset, "--converge-wait", "10ms",
		"--poll-interval", "10ms", "--keep", "0", "--progress", "log", "--log-level", "warn"}, args...)
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := rotateMain(ctx, args, &out, &errOut, e.deps())
	return out.String(), errOut.String(), err
}

// TestRotatePresentsPluginCredential attacks rotate against plugins whose
// admin port requires a credential: before, rotate had no way to present
// one, so protecting /status and /refresh meant rotate could not run at
// all. Each credential the port accepts must get the rotation through
// (and the plugin must have seen it authenticated); none, or a client
// certificate of another CA, must stop it in preflight with every key
// intact.
func TestRotatePresentsPluginCredential(t *testing.T) {
	for _, tt := range []struct {
		name    string
		creds   func(p *authPlugin) []string
		wantErr string
	}{
		{"client certificate", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile, "--plugin-cert-file", p.certFile, "--plugin-key-file", p.keyFile}
		}, ""},
		{"bearer token", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile, "--plugin-token-file", p.tokenFile}
		}, ""},
		{"server name", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile, "--plugin-token-file", p.tokenFile, "--plugin-server-name", "localhost"}
		}, ""},
		{"no credential", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile}
		}, "401 Unauthorized: the plugin's admin port admits a client certificate of its CA or its bearer token"},
		{"certificate of another CA", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile, "--plugin-cert-file", p.otherCertFile, "--plugin-key-file", p.otherKeyFile}
		}, "unknown certificate authority"},
		{"no CA: the plugin's certificate is not trusted", func(p *authPlugin) []string {
			return []string{"--plugin-token-file", p.tokenFile}
		}, "refusing to send the bearer token"},
		{"wrong server name", func(p *authPlugin) []string {
			return []string{"--plugin-ca-file", p.caFile, "--plugin-token-file", p.tokenFile, "--plugin-server-name", "kms-plugin.example"}
		}, "certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newRotateEnv(t)
			p := startAuthPlugin(t, e.keyset)
			before, err := os.ReadFile(e.keyset)
			if err != nil {
				t.Fatal(err)
			}
			out, errOut, err := e.rotateOnly(t, append([]string{"--plugin-endpoints", p.url}, tt.creds(p)...)...)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("rotate: %v\n%s", err, errOut)
				}
				if !strings.Contains(out, "rotation completed") {
					t.Fatalf("output %q", out)
				}
				if p.statusCalls() == 0 || p.refreshCalls() == 0 {
					t.Errorf("the plugin admitted %d /status and %d /refresh requests; want both asked with the credential", p.statusCalls(), p.refreshCalls())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "preflight") || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("rotate: %v; want a preflight failure mentioning %q", err, tt.wantErr)
			}
			after, rerr := os.ReadFile(e.keyset)
			if rerr != nil {
				t.Fatal(rerr)
			}
			if !bytes.Equal(before, after) {
				t.Errorf("the keyset changed although preflight failed")
			}
			if strings.Contains(err.Error(), "s3cr3t") || strings.Contains(errOut, "s3cr3t") {
				t.Errorf("the token leaked into the output: %v\n%s", err, errOut)
			}
		})
	}
}

// TestPluginFlagsRejectHalfACredential: a certificate without its key,
// or a client certificate with nothing to verify the server by, is a
// mistake to report, not a credential to drop silently.
func TestPluginFlagsRejectHalfACredential(t *testing.T) {
	e := newRotateEnv(t)
	p := startAuthPlugin(t, e.keyset)
	for _, args := range [][]string{
		{"--plugin-ca-file", p.caFile, "--plugin-cert-file", p.certFile},
		{"--plugin-cert-file", p.certFile, "--plugin-key-file", p.keyFile},
		{"--plugin-ca-file", filepath.Join(t.TempDir(), "missing.crt")},
	} {
		_, _, err := e.rotateOnly(t, append([]string{"--plugin-endpoints", p.url}, args...)...)
		if err == nil || !strings.Contains(err.Error(), "--plugin-") {
			t.Errorf("rotate %q: %v; want an error naming the --plugin- flags", args, err)
		}
	}
}

// TestStatusAndVerifyPresentPluginCredential: status and verify read the
// plugins' /status too, and so need the same credential.
func TestStatusAndVerifyPresentPluginCredential(t *testing.T) {
	e := newRotateEnv(t)
	p := startAuthPlugin(t, e.keyset)
	clients := func(string, []string, float32, int) (*clusterClients, error) {
		return &clusterClients{client: e.client, dynamic: e.dyn}, nil
	}
	status := func(args ...string) (clusterStatus, error) {
		var out, errOut bytes.Buffer
		err := statusMain(context.Background(), append([]string{"-o", "json"}, args...), &out, &errOut, clients, time.Now)
		var st clusterStatus
		if err == nil {
			err = json.Unmarshal(out.Bytes(), &st)
		}
		return st, err
	}
	st, err := status("--plugin-endpoints", p.url, "--plugin-ca-file", p.caFile, "--plugin-token-file", p.tokenFile)
	if err != nil || !st.Agree || len(st.Plugins) != 1 || !st.Plugins[0].Healthy() {
		t.Fatalf("status with the token: %+v, %v; want the plugin healthy", st, err)
	}
	st, err = status("--plugin-endpoints", p.url, "--plugin-ca-file", p.caFile)
	if err != nil || st.Agree || len(st.Plugins) != 1 || !strings.Contains(st.Plugins[0].Err, "401") {
		t.Fatalf("status without a credential: %+v, %v; want the plugin's 401", st, err)
	}

	// Found from a Node (no --plugin-endpoints): https with a CA file.
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp-0", Labels: map[string]string{"node-role.kubernetes.io/control-plane": ""}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}}}}
	if _, err := e.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	st, err = status("--plugin-port", p.port, "--plugin-ca-file", p.caFile, "--plugin-cert-file", p.certFile, "--plugin-key-file", p.keyFile)
	if err != nil || !st.Agree || len(st.Plugins) != 1 || st.Plugins[0].URL != p.url || st.Plugins[0].Node != "cp-0" {
		t.Fatalf("status of a discovered plugin: %+v, %v; want cp-0 at %s, healthy", st, err, p.url)
	}

	dial := func(*etcdFlags) (etcdscan.Ranger, func(), error) {
		return &fakeRanger{kv: map[string][]byte{}}, func() {}, nil
	}
	var out, errOut bytes.Buffer
	err = verifyMain(context.Background(), []string{"-o", "json", "--plugin-endpoints", p.url, "--plugin-ca-file", p.caFile, "--plugin-token-file", p.tokenFile}, &out, &errOut, dial)
	if err != nil || !strings.Contains(out.String(), `"expectedKeyID": "kp1.`) {
		t.Fatalf("verify with the token: %v\n%s%s; want the plugin's key_id expected", err, out.String(), errOut.String())
	}
	out.Reset()
	err = verifyMain(context.Background(), []string{"-o", "json", "--plugin-endpoints", p.url, "--plugin-ca-file", p.caFile}, &out, &errOut, dial)
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("verify without a credential: %v; want the plugin's 401", err)
	}
}

// TestAPIServerClientKeepsCredentials: the client rotate builds for each
// apiserver of the kubernetes EndpointSlice talks to that address with
// the kubeconfig's credentials and verifies it against the kubeconfig's
// CA; without such a CA there is no such client, since whoever can write
// an EndpointSlice in default would otherwise choose where the token goes.
func TestAPIServerClientKeepsCredentials(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Host+" "+r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"major":"1","minor":"37","gitVersion":"v1.37.2"}`))
	})
	lb := httptest.NewTLSServer(handler)
	t.Cleanup(lb.Close)
	api := httptest.NewTLSServer(handler) // same test certificate, another address
	t.Cleanup(api.Close)

	kc := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := clientcmdapi.NewConfig()
	caPEM := certPEM(t, lb)
	cfg.Clusters["c"] = &clientcmdapi.Cluster{Server: lb.URL, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: "kubeconfig-token"}
	cfg.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	cfg.CurrentContext = "c"
	if err := clientcmd.WriteToFile(*cfg, kc); err != nil {
		t.Fatal(err)
	}
	cc, err := realClients(kc, nil, 5, 10)
	if err != nil {
		t.Fatal(err)
	}
	if cc.apiserver == nil {
		t.Fatal("no per-apiserver client factory")
	}
	c, err := cc.apiserver(api.URL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Discovery().ServerVersion(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := strings.Join(seen, "\n")
	mu.Unlock()
	want := strings.TrimPrefix(api.URL, "https://") + " Bearer kubeconfig-token"
	if got != want {
		t.Fatalf("requests seen %q; want one to %q", got, want)
	}

	// With another CA in the kubeconfig, the same apiserver is not
	// trusted.
	cfg.Clusters["c"].CertificateAuthorityData = adminauthtest.NewCA(t, "not the cluster CA", adminauthtest.ECDSAPKCS8).CertPEM
	if err := clientcmd.WriteToFile(*cfg, kc); err != nil {
		t.Fatal(err)
	}
	if cc, err = realClients(kc, nil, 5, 10); err != nil {
		t.Fatal(err)
	}
	if c, err = cc.apiserver(api.URL); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Discovery().ServerVersion(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("apiserver behind a certificate of another CA: %v; want a certificate error", err)
	}

	// Without a CA of the kubeconfig's own (system roots, or no check at
	// all), addresses from the cluster get no client: the token would go
	// to whoever answers them.
	for name, cl := range map[string]*clientcmdapi.Cluster{
		"insecure":     {Server: lb.URL, InsecureSkipTLSVerify: true},
		"system roots": {Server: lb.URL},
	} {
		cfg.Clusters["c"] = cl
		if err := clientcmd.WriteToFile(*cfg, kc); err != nil {
			t.Fatal(err)
		}
		if cc, err = realClients(kc, nil, 5, 10); err != nil {
			t.Fatal(err)
		}
		if cc.apiserver != nil {
			t.Errorf("%s: a client factory for the EndpointSlices' addresses; want none", name)
		}
	}
}

// certPEM is the PEM of srv's certificate (httptest's, its own CA).
func certPEM(t *testing.T, srv *httptest.Server) []byte {
	t.Helper()
	c := srv.Certificate()
	if c == nil {
		t.Fatal("no certificate")
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
