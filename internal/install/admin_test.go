package install

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// publicConfig is a plugin config whose admin port listens on a node
// address: install issues its credentials.
const publicConfig = "endpoint: unix:///var/run/kmsplugin/socket.sock\n" +
	"provider: local\n" +
	"local:\n" +
	"  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\n" +
	"# Reached by rotate from the other nodes.\n" +
	"httpAddr: 10.0.0.5:8787\n" +
	"log:\n" +
	"  format: json\n"

// The admin files install issues, and the test node's names.
const (
	adminCert       = "/etc/kubernetes/kms-plugin/admin/tls.crt"
	adminKey        = "/etc/kubernetes/kms-plugin/admin/tls.key"
	adminClientCert = "/etc/kubernetes/kms-plugin/admin/client.crt"
	adminClientKey  = "/etc/kubernetes/kms-plugin/admin/client.key"
	testHostname    = "cp-1.example.com"
)

var testAdminIP = net.ParseIP("192.0.2.7")

// caFiles is a test cluster CA.
type caFiles struct {
	certPEM, keyPEM []byte
	cert            *x509.Certificate
}

// testCA returns a CA valid from a year before testNow for ten years, as
// kubeadm makes them.
func testCA(t *testing.T) *caFiles {
	t.Helper()
	return testCAValid(t, testNow().AddDate(-1, 0, 0), testNow().AddDate(10, 0, 0))
}

func testCAValid(t *testing.T, notBefore, notAfter time.Time) *caFiles {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kubernetes"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &caFiles{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		cert:    cert,
	}
}

// adminRoot returns a kubeadm node root holding the cluster CA.
func adminRoot(t *testing.T, ca *caFiles) string {
	t.Helper()
	root := kubeadmRoot(t, fixture)
	writeCA(t, root, ca)
	return root
}

func writeCA(t *testing.T, root string, ca *caFiles) {
	t.Helper()
	paths := DefaultPaths()
	if err := os.MkdirAll(filepath.Join(root, filepath.Dir(paths.ClusterCACert)), 0o755); err != nil {
		t.Fatal(err)
	}
	for p, data := range map[string][]byte{paths.ClusterCACert: ca.certPEM, paths.ClusterCAKey: ca.keyPEM} {
		if err := os.WriteFile(filepath.Join(root, p), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// adminInstaller returns an Installer of publicConfig on root with the
// test node's names and clock now.
func adminInstaller(t *testing.T, root string, now func() time.Time, edit func(*Config)) *Installer {
	t.Helper()
	return newInstaller(t, root, func(c *Config) {
		c.PluginConfig = []byte(publicConfig)
		c.AdminIPs = []net.IP{testAdminIP}
		c.AdminHostname = testHostname
		c.Now = now
		if edit != nil {
			edit(c)
		}
	})
}

// loadCert reads and parses a PEM certificate from the node root.
func loadCert(t *testing.T, root, p string) *x509.Certificate {
	t.Helper()
	c, err := parseCertPEM([]byte(readFile(t, filepath.Join(root, p))))
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	return c
}

// TestAdminCredentials installs a plugin whose admin port is not loopback
// on a kubeadm node and attacks what install issued: the certificates must
// verify against the cluster CA with the node's names and nothing else,
// the right usage and CommonName, keys that match and are 0600; the CA key
// must be copied nowhere and the dry run must show no key; the plugin
// config and static pod must use them; and a second run changes nothing.
func TestAdminCredentials(t *testing.T) {
	ca := testCA(t)
	root := adminRoot(t, ca)
	in := adminInstaller(t, root, testNow, nil)
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}

	// The dry run: certificates shown, keys not.
	diff := string(plan.Diff())
	for _, want := range []string{
		"+++ " + adminCert + "\n@@", "+-----BEGIN CERTIFICATE-----",
		"--- /dev/null\n+++ " + adminKey + "\n# " + adminKey + ": key material, not shown\n",
		"--- /dev/null\n+++ " + adminClientKey + "\n# " + adminClientKey + ": key material, not shown\n",
		"+  certFile: " + adminCert + "\n",
	} {
		if !strings.Contains(diff, want) {
			t.Errorf("diff lacks %q:\n%s", want, diff)
		}
	}
	if strings.Contains(diff, "PRIVATE KEY") {
		t.Errorf("diff shows a private key:\n%s", diff)
	}
	var order []string
	for _, c := range plan.Changes {
		order = append(order, c.Path)
	}
	if want := []string{adminCert, adminKey, adminClientCert, adminClientKey, DefaultPaths().PluginConfig}; !slices.Equal(order[:5], want) {
		t.Errorf("changes in order %v; want the certificates before the config that names them, %v", order, want)
	}
	if _, err := in.Apply(plan); err != nil {
		t.Fatal(err)
	}

	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	for _, tt := range []struct {
		cert, key string
		usage     x509.ExtKeyUsage
		cn        string
		names     []string
	}{
		{adminCert, adminKey, x509.ExtKeyUsageServerAuth, "kms-plugin", []string{"10.0.0.5", "127.0.0.1", "192.0.2.7", testHostname}},
		{adminClientCert, adminClientKey, x509.ExtKeyUsageClientAuth, adminauth.DefaultClientName, nil},
	} {
		c := loadCert(t, root, tt.cert)
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: testNow(), KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
			t.Errorf("%s does not verify against the cluster CA: %v", tt.cert, err)
		}
		if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{tt.usage}) || c.IsCA {
			t.Errorf("%s: usages %v, CA %v; want only %v", tt.cert, c.ExtKeyUsage, c.IsCA, tt.usage)
		}
		if c.Subject.CommonName != tt.cn || len(c.Subject.Organization) != 0 {
			t.Errorf("%s: subject %s; want CN=%s and no organization (kube-apiserver would read it as groups)", tt.cert, c.Subject, tt.cn)
		}
		if got := certNames(c.DNSNames, c.IPAddresses); !slices.Equal(got, tt.names) {
			t.Errorf("%s names %v; want %v", tt.cert, got, tt.names)
		}
		if _, err := tls.X509KeyPair([]byte(readFile(t, filepath.Join(root, tt.cert))), []byte(readFile(t, filepath.Join(root, tt.key)))); err != nil {
			t.Errorf("%s and %s are not a pair: %v", tt.cert, tt.key, err)
		}
		for _, p := range []string{tt.cert, tt.key} {
			if info, err := os.Stat(filepath.Join(root, p)); err != nil || info.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v, %v; want 0600", p, info.Mode(), err)
			}
		}
	}

	// The CA key is read, never copied: not into any file (backups
	// included) but its own.
	caKeyDER, _ := pem.Decode(ca.keyPEM)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || p == filepath.Join(root, DefaultPaths().ClusterCAKey) {
			return err
		}
		data, err := os.ReadFile(p)
		if bytes.Contains(data, ca.keyPEM) || bytes.Contains(data, caKeyDER.Bytes) {
			t.Errorf("%s holds the CA key", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}

	// The plugin config: the given file, with httpTLS after httpAddr.
	gotConfig := readFile(t, filepath.Join(root, DefaultPaths().PluginConfig))
	wantConfig := strings.Replace(publicConfig, "httpAddr: 10.0.0.5:8787\n", "httpAddr: 10.0.0.5:8787\n"+
		"# Written by `kms-plugin install`: httpAddr is not loopback, so the admin\n"+
		"# port serves HTTPS with a certificate of the cluster CA, and admits client\n"+
		"# certificates of that CA named in clientNames (default kms-plugin-admin).\n"+
		"httpTLS:\n"+
		"  certFile: "+adminCert+"\n"+
		"  keyFile: "+adminKey+"\n"+
		"  clientCAFile: /etc/kubernetes/pki/ca.crt\n", 1)
	if gotConfig != wantConfig {
		t.Errorf("plugin config:\n%s", unifiedDiff("want", "got", []byte(wantConfig), []byte(gotConfig), 3))
	}
	cfg := registry.Builtin().Default()
	if err := config.Parse([]byte(gotConfig), &cfg); err != nil || cfg.HTTPTLS.CertFile != adminCert || cfg.HTTPTLS.ClientCAFile != DefaultPaths().ClusterCACert {
		t.Errorf("installed config parses to %+v, %v", cfg.HTTPTLS, err)
	}

	// The static pod: HTTPS probes, the admin directory and the CA
	// certificate mounted read-only, never the CA's directory.
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict([]byte(readFile(t, filepath.Join(root, DefaultPaths().StaticPod))), &pod); err != nil {
		t.Fatal(err)
	}
	c := pod.Spec.Containers[0]
	if c.LivenessProbe.HTTPGet.Scheme != corev1.URISchemeHTTPS || c.ReadinessProbe.HTTPGet.Scheme != corev1.URISchemeHTTPS {
		t.Errorf("probes use %s and %s; want HTTPS", c.LivenessProbe.HTTPGet.Scheme, c.ReadinessProbe.HTTPGet.Scheme)
	}
	if h := c.LivenessProbe.HTTPGet.Host; h != "10.0.0.5" {
		t.Errorf("liveness probe host %s; want httpAddr's", h)
	}
	mounts := map[string]bool{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.ReadOnly
	}
	for _, p := range []string{"/etc/kubernetes/kms-plugin/admin", "/etc/kubernetes/pki/ca.crt"} {
		if ro, ok := mounts[p]; !ok || !ro {
			t.Errorf("%s mounted %v, read-only %v; want read-only", p, ok, ro)
		}
	}
	for _, v := range pod.Spec.Volumes {
		if p := v.HostPath.Path; p == "/etc/kubernetes/pki" || p == DefaultPaths().ClusterCAKey {
			t.Errorf("the pod mounts %s", p)
		}
	}

	// A second run, with the config given again or the installed one,
	// keeps every file.
	for name, edit := range map[string]func(*Config){"given config": nil, "installed config": func(c *Config) { c.PluginConfig = nil }} {
		before := snapshot(t, root)
		plan, err := adminInstaller(t, root, testNow, edit).PlanInstall()
		if err != nil {
			t.Fatal(err)
		}
		if !plan.Empty() {
			t.Errorf("%s: second install plans changes:\n%s", name, plan.Diff())
		}
		sameTree(t, snapshot(t, root), before)
	}
}

// TestAdminCredentialsWork serves TLS with the issued files through
// adminauth, as the plugin does, and calls it as rotate does with the
// client pair: the handshake and the authentication succeed on 127.0.0.1.
func TestAdminCredentialsWork(t *testing.T) {
	ca := testCA(t)
	root := adminRoot(t, ca)
	// adminauth checks certificates against the real clock: install
	// with it.
	now := time.Now
	ca2 := testCAValid(t, time.Now().Add(-time.Hour), time.Now().AddDate(1, 0, 0))
	writeCA(t, root, ca2)
	install(t, adminInstaller(t, root, now, nil))
	at := func(p string) string { return filepath.Join(root, p) }
	serverTLS, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: at(adminCert), KeyFile: at(adminKey), ClientCAFile: at(DefaultPaths().ClusterCACert)})
	if err != nil {
		t.Fatal(err)
	}
	auth, err := adminauth.NewAuthenticator(adminauth.ServerConfig{ClientCAFile: at(DefaultPaths().ClusterCACert)})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := tls.Listen("tcp", "127.0.0.1:0", serverTLS)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := auth.Authenticate(r); err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })

	client, err := adminauth.HTTPClient(adminauth.ClientConfig{CAFile: at(DefaultPaths().ClusterCACert), CertFile: at(adminClientCert), KeyFile: at(adminClientKey)})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Get("https://" + lis.Addr().String() + "/status")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Fatalf("GET /status with the issued client certificate: %s %s", resp.Status, body)
	}
}

// TestAdminCredentialsRenewal changes what a current pair depends on, one
// thing at a time, and checks that exactly the pairs affected are issued
// again, and that a pair close to expiry but not within 30 days stays.
func TestAdminCredentialsRenewal(t *testing.T) {
	both := []string{adminCert, adminKey, adminClientCert, adminClientKey}
	serving, client := both[:2], both[2:]
	later := func(d time.Duration) func(*testing.T, string, *clocktest.Clock) {
		return func(_ *testing.T, _ string, clock *clocktest.Clock) { clock.Add(d) }
	}
	for _, tt := range []struct {
		name   string
		files  func(t *testing.T, root string, clock *clocktest.Clock) // before the run
		config func(*Config)
		want   []string // files issued again
		note   string
	}{
		{name: "nothing"},
		{name: "expires in 31 days", files: later(adminauth.DefaultValidity - 31*24*time.Hour)},
		{name: "expires in 29 days", files: later(adminauth.DefaultValidity - 29*24*time.Hour), want: both, note: adminCert + " is issued again: it expires on "},
		{name: "expired", files: later(adminauth.DefaultValidity + time.Hour), want: both, note: "it does not verify against the cluster CA"},
		{name: "another node address", config: func(c *Config) { c.AdminIPs = []net.IP{net.ParseIP("192.0.2.8")} }, want: serving,
			note: "it names 10.0.0.5, 127.0.0.1, 192.0.2.7, cp-1.example.com, not 10.0.0.5, 127.0.0.1, 192.0.2.8, cp-1.example.com"},
		{name: "another hostname", config: func(c *Config) { c.AdminHostname = "cp-2" }, want: serving, note: "not 10.0.0.5, 127.0.0.1, 192.0.2.7, cp-2"},
		{name: "another httpAddr", config: func(c *Config) { c.PluginConfig = []byte(strings.Replace(publicConfig, "10.0.0.5", "10.0.0.6", 1)) }, want: serving, note: "not 10.0.0.6, "},
		{name: "another client name", config: func(c *Config) { c.PluginConfig = []byte(publicConfig + "httpTLS:\n  clientNames: [rotator]\n") }, want: client,
			note: `its CommonName is "kms-plugin-admin", not "rotator"`},
		{name: "key readable by others", files: func(t *testing.T, root string, _ *clocktest.Clock) { chmod(t, filepath.Join(root, adminKey), 0o644) }, want: serving,
			note: "its key file has mode 0644, readable by others"},
		{name: "key missing", files: func(t *testing.T, root string, _ *clocktest.Clock) { remove(t, filepath.Join(root, adminClientKey)) }, want: client, note: "its key does not exist"},
		{name: "certificate missing", files: func(t *testing.T, root string, _ *clocktest.Clock) { remove(t, filepath.Join(root, adminCert)) }, want: serving},
		{name: "key of the other pair", files: func(t *testing.T, root string, _ *clocktest.Clock) {
			writeNode(t, root, adminKey, []byte(readFile(t, filepath.Join(root, adminClientKey))))
		}, want: serving, note: "the certificate and key are not a pair"},
		{name: "pair of another CA", files: func(t *testing.T, root string, _ *clocktest.Clock) {
			other := testCA(t)
			cert, key, err := adminauth.Issuer{Now: testNow}.Issue(other.certPEM, other.keyPEM, adminauth.CertRequest{CommonName: adminauth.DefaultClientName, Client: true})
			if err != nil {
				t.Fatal(err)
			}
			writeNode(t, root, adminClientCert, cert)
			writeNode(t, root, adminClientKey, key)
		}, want: client, note: adminClientCert + " is issued again: it does not verify against the cluster CA"},
		{name: "new cluster CA", files: func(t *testing.T, root string, _ *clocktest.Clock) { writeCA(t, root, testCA(t)) }, want: both, note: "it does not verify against the cluster CA"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := adminRoot(t, testCA(t))
			clock := clocktest.New(testNow())
			install(t, adminInstaller(t, root, clock.Now, nil))
			if tt.files != nil {
				tt.files(t, root, clock)
			}
			before := snapshot(t, root)
			in := adminInstaller(t, root, clock.Now, tt.config)
			plan, err := in.PlanInstall()
			if err != nil {
				t.Fatal(err)
			}
			var issued []string
			for _, c := range plan.Changes {
				if strings.HasPrefix(c.Path, DefaultPaths().AdminDir+"/") {
					issued = append(issued, c.Path)
				}
			}
			if !slices.Equal(issued, tt.want) {
				t.Fatalf("issued %v; want %v\n%s", issued, tt.want, plan.Diff())
			}
			if notes := strings.Join(plan.Notes, "\n"); !strings.Contains(notes, tt.note) {
				t.Errorf("notes %q lack %q", notes, tt.note)
			}
			if _, err := in.Apply(plan); err != nil {
				t.Fatal(err)
			}
			after := snapshot(t, root)
			for _, p := range both {
				if changed := after[p] != before[p]; changed != slices.Contains(tt.want, p) {
					t.Errorf("%s changed: %v; want %v", p, changed, !changed)
				}
			}
			for _, p := range []string{adminCert, adminClientCert} {
				if slices.Contains(tt.want, p) {
					if c := loadCert(t, root, p); !c.NotAfter.After(clock.Now().Add(adminRenewBefore)) {
						t.Errorf("%s issued again expires on %s, within 30 days", p, c.NotAfter)
					}
				}
			}
			// And then it is current.
			if plan, err := adminInstaller(t, root, clock.Now, tt.config).PlanInstall(); err != nil || !plan.Empty() {
				t.Errorf("third run: %v\n%s", err, plan.Diff())
			}
		})
	}
}

func chmod(t *testing.T, p string, mode fs.FileMode) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func remove(t *testing.T, p string) {
	t.Helper()
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
}

// writeNode writes a 0600 file at host path p of the node root.
func writeNode(t *testing.T, root, p string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(root, p), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestAdminCredentialsExternalCA removes the cluster CA key (an external
// CA: kubeadm has only the certificate) or the CA itself: install refuses
// in one line saying what to set, and writes nothing. Certificates still
// current need no CA key.
func TestAdminCredentialsExternalCA(t *testing.T) {
	for _, missing := range []string{DefaultPaths().ClusterCAKey, DefaultPaths().ClusterCACert} {
		t.Run(filepath.Base(missing), func(t *testing.T) {
			root := adminRoot(t, testCA(t))
			remove(t, filepath.Join(root, missing))
			before := snapshot(t, root)
			_, err := adminInstaller(t, root, testNow, nil).PlanInstall()
			want := missing + " does not exist (external CA?): set httpTLS.certFile, httpTLS.keyFile and httpTLS.clientCAFile (or httpAuth.tokenFile) in the plugin config"
			if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error = %v; want one line saying %q", err, want)
			}
			sameTree(t, snapshot(t, root), before)
		})
	}
	t.Run("current certificates", func(t *testing.T) {
		root := adminRoot(t, testCA(t))
		install(t, adminInstaller(t, root, testNow, nil))
		remove(t, filepath.Join(root, DefaultPaths().ClusterCAKey))
		if plan, err := adminInstaller(t, root, testNow, nil).PlanInstall(); err != nil || !plan.Empty() {
			t.Fatalf("rerun without the CA key: %v, %v", plan, err)
		}
	})
}

// TestAdminCredentialsEveryAddress checks that an httpAddr on every
// address needs the node's addresses, which the certificate then names.
func TestAdminCredentialsEveryAddress(t *testing.T) {
	for _, host := range []string{"0.0.0.0", "[::]", ""} {
		config := strings.Replace(publicConfig, "10.0.0.5:8787", `"`+host+`:8787"`, 1)
		root := adminRoot(t, testCA(t))
		_, err := adminInstaller(t, root, testNow, func(c *Config) { c.PluginConfig = []byte(config); c.AdminIPs = nil }).PlanInstall()
		if err == nil || !strings.Contains(err.Error(), "listens on every address: name this node's addresses with --admin-ip") {
			t.Errorf("%s without --admin-ip: error %v; want a refusal", host, err)
		}
		install(t, adminInstaller(t, root, testNow, func(c *Config) { c.PluginConfig = []byte(config); c.AdminHostname = "" }))
		if got, want := certNames(loadCert(t, root, adminCert).DNSNames, loadCert(t, root, adminCert).IPAddresses), []string{"127.0.0.1", "192.0.2.7"}; !slices.Equal(got, want) {
			t.Errorf("%s: serving certificate names %v; want %v", host, got, want)
		}
	}
}

// TestAdminOwnCredentialsKept gives a plugin config naming its own admin
// credentials: install keeps the file byte for byte, issues nothing (no CA
// on the node), mounts the files outside the config directory read-only,
// and probes over HTTPS. A config the plugin would refuse to serve off
// loopback is refused.
func TestAdminOwnCredentialsKept(t *testing.T) {
	own := strings.Replace(publicConfig, "httpAddr: 10.0.0.5:8787\n", "httpAddr: 10.0.0.5:8787\n"+
		"httpTLS:\n  certFile: /etc/pki/kms/tls.crt\n  keyFile: /etc/pki/kms/tls.key\n  clientCAFile: /etc/kubernetes/kms-plugin/clients.pem\n"+
		"httpAuth:\n  tokenFile: /etc/kubernetes/kms-plugin/token\n", 1)
	root := kubeadmRoot(t, fixture)
	install(t, adminInstaller(t, root, testNow, func(c *Config) { c.PluginConfig = []byte(own) }))
	tree := snapshot(t, root)
	if tree[DefaultPaths().PluginConfig] != own {
		t.Errorf("plugin config changed:\n%s", unifiedDiff("given", "installed", []byte(own), []byte(tree[DefaultPaths().PluginConfig]), 3))
	}
	if _, ok := tree[DefaultPaths().AdminDir]; ok {
		t.Error("install issued credentials of its own")
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict([]byte(tree[DefaultPaths().StaticPod]), &pod); err != nil {
		t.Fatal(err)
	}
	c := pod.Spec.Containers[0]
	if s := c.LivenessProbe.HTTPGet.Scheme; s != corev1.URISchemeHTTPS {
		t.Errorf("liveness probe scheme %q; want HTTPS", s)
	}
	var got []string
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(m.Name, "admin-") {
			if !m.ReadOnly {
				t.Errorf("%s is mounted read-write", m.MountPath)
			}
			got = append(got, m.MountPath)
		}
	}
	if want := []string{"/etc/pki/kms/tls.crt", "/etc/pki/kms/tls.key"}; !slices.Equal(got, want) {
		t.Errorf("admin mounts %v; want %v (the CA and token files are in the config directory)", got, want)
	}

	// A directory mounted with ExtraMounts covers the files in it: a file
	// mounted alone would hide its renewals.
	root = kubeadmRoot(t, fixture)
	install(t, adminInstaller(t, root, testNow, func(c *Config) { c.PluginConfig = []byte(own); c.ExtraMounts = []string{"/etc/pki/kms"} }))
	if pod := readFile(t, filepath.Join(root, DefaultPaths().StaticPod)); strings.Contains(pod, "name: admin-") || !strings.Contains(pod, "mountPath: /etc/pki/kms\n") {
		t.Errorf("with --mount /etc/pki/kms, the pod mounts:\n%s", pod)
	}

	// Off loopback, a certificate without a way to authenticate callers.
	weak := strings.Replace(own, "  clientCAFile: /etc/kubernetes/kms-plugin/clients.pem\nhttpAuth:\n  tokenFile: /etc/kubernetes/kms-plugin/token\n", "", 1)
	_, err := adminInstaller(t, kubeadmRoot(t, fixture), testNow, func(c *Config) { c.PluginConfig = []byte(weak) }).PlanInstall()
	if err == nil || !strings.Contains(err.Error(), "is not loopback, and the plugin serves it only with httpTLS.certFile and httpTLS.keyFile plus httpTLS.clientCAFile or httpAuth.tokenFile") {
		t.Errorf("certificate without client CA or token: error %v; want a refusal", err)
	}
}

// TestAdminLoopbackIssuesNothing checks that a loopback httpAddr gives the
// same plan with the cluster CA on the node as without it.
func TestAdminLoopbackIssuesNothing(t *testing.T) {
	plain, err := newInstaller(t, kubeadmRoot(t, fixture), nil).PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	withCA, err := newInstaller(t, adminRoot(t, testCA(t)), func(c *Config) { c.AdminIPs = []net.IP{testAdminIP} }).PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(withCA.Diff()), string(plain.Diff()); got != want {
		t.Errorf("plan with the CA differs:\n%s", unifiedDiff("without", "with", []byte(want), []byte(got), 3))
	}
}

// TestSetHTTPTLS edits httpTLS into plugin configs of every shape: the
// fields are set, every other field and comment kept, keys matched
// ignoring case as config.Parse does, and a second edit changes nothing.
func TestSetHTTPTLS(t *testing.T) {
	want := config.HTTPTLSConfig{CertFile: "/a/tls.crt", KeyFile: "/a/tls.key", ClientCAFile: "/pki/ca.crt"}
	for _, tt := range []struct{ name, in, out string }{
		{"no section, no httpAddr", "endpoint: x # here\n", "endpoint: x # here\n# " + strings.ReplaceAll(httpTLSComment, "\n", "\n# ") + "\nhttpTLS:\n  certFile: /a/tls.crt\n  keyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\n"},
		{"null section", "httpTLS: null\nlog: {}\n", "httpTLS:\n  certFile: /a/tls.crt\n  keyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\nlog: {}\n"},
		{"client names kept", "httpTLS:\n  # who\n  clientNames: [rotator]\n", "httpTLS:\n  # who\n  clientNames: [rotator]\n  certFile: /a/tls.crt\n  keyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\n"},
		{"other case", "HTTPTLS:\n  certfile: /old.crt\n  KeyFile: /old.key\n", "HTTPTLS:\n  certfile: /a/tls.crt\n  KeyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\n"},
		{"already set", "httpTLS:\n  certFile: '/a/tls.crt'\n  keyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\n", "httpTLS:\n  certFile: '/a/tls.crt'\n  keyFile: /a/tls.key\n  clientCAFile: /pki/ca.crt\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := setHTTPTLS([]byte(tt.in), want)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.out {
				t.Errorf("got:\n%s\nwant:\n%s", got, tt.out)
			}
			again, _, err := setHTTPTLS(got, want)
			if err != nil || string(again) != string(got) {
				t.Errorf("second edit changed the file: %v\n%s", err, again)
			}
		})
	}
	if _, _, err := setHTTPTLS([]byte("- a\n"), want); err == nil {
		t.Error("a YAML list edited without error")
	}
}

// TestUninstallRemovesAdminCredentials checks that finalizing removes the
// certificates and keys install issued, showing no key in its diff.
func TestUninstallRemovesAdminCredentials(t *testing.T) {
	root := adminRoot(t, testCA(t))
	in := adminInstaller(t, root, testNow, nil)
	install(t, in)
	uninstall(t, in, UninstallOptions{})
	plan, err := in.PlanUninstall(t.Context(), UninstallOptions{Finalize: true, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if d := string(plan.Diff()); strings.Contains(d, "PRIVATE KEY") || !strings.Contains(d, "--- "+adminKey+"\n+++ /dev/null\n# "+adminKey+": key material, not shown\n") {
		t.Errorf("finalize diff:\n%s", d)
	}
	res, err := in.Apply(plan)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{adminCert, adminKey, adminClientCert, adminClientKey} {
		if !slices.Contains(res.Removed, p) {
			t.Errorf("%s not removed (removed %v)", p, res.Removed)
		}
	}
	for _, p := range []string{DefaultPaths().ClusterCACert, DefaultPaths().ClusterCAKey} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("the cluster CA's %s is gone: %v", p, err)
		}
	}
}
