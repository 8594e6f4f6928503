package install

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// The admin port's credentials. A plugin whose httpAddr is not loopback
// (rotate reaches every node's plugin) serves it only over HTTPS with a
// credential. On a kubeadm node install provides both from the cluster CA:
// a serving certificate for the node, a client certificate for rotate,
// and httpTLS in the plugin config pointing at them and at the CA. The CA
// key is read to sign and never written anywhere.

// hostnameRE matches a DNS name.
var hostnameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

// adminRenewBefore is how long before it expires an issued certificate
// is issued again.
const adminRenewBefore = 30 * 24 * time.Hour

// adminFiles are the files install issues, in Paths.AdminDir.
type adminFiles struct{ cert, key, clientCert, clientKey string }

func adminPaths(dir string) adminFiles {
	return adminFiles{
		cert:       filepath.Join(dir, "tls.crt"),
		key:        filepath.Join(dir, "tls.key"),
		clientCert: filepath.Join(dir, "client.crt"),
		clientKey:  filepath.Join(dir, "client.key"),
	}
}

// adminSource says who provides the admin port's TLS.
type adminSource int

const (
	// adminPlain: no TLS, and none needed (loopback, or no HTTP server).
	adminPlain adminSource = iota
	// adminOwn: the plugin config names its own httpTLS or httpAuth
	// files; install keeps them and mounts them into the pod.
	adminOwn
	// adminIssued: install issues the files in Paths.AdminDir, renews
	// them, and points httpTLS at them.
	adminIssued
)

// adminSourceOf decides who provides the admin port's TLS for the plugin
// config cfg: install when the config already points at install's files,
// or when httpAddr is not loopback and the config names no credential of
// its own. A config naming its own that the plugin would refuse to serve
// is an error.
func adminSourceOf(cfg config.Config, files adminFiles) (adminSource, error) {
	t, a := cfg.HTTPTLS, cfg.HTTPAuth
	if t.CertFile == files.cert && t.KeyFile == files.key {
		return adminIssued, nil
	}
	loopback := true
	if cfg.HTTPAddr != "" {
		var err error
		if loopback, err = adminauth.IsLoopback(cfg.HTTPAddr); err != nil {
			return 0, fmt.Errorf("plugin config: httpAddr: %w", err)
		}
	}
	if t.CertFile != "" || a.TokenFile != "" {
		if !loopback && (t.CertFile == "" || (t.ClientCAFile == "" && a.TokenFile == "")) {
			return 0, fmt.Errorf("plugin config: httpAddr %s is not loopback, and the plugin serves it only with httpTLS.certFile and httpTLS.keyFile plus httpTLS.clientCAFile or httpAuth.tokenFile", cfg.HTTPAddr)
		}
		return adminOwn, nil
	}
	if loopback {
		return adminPlain, nil
	}
	return adminIssued, nil
}

// adminCredentials plans the admin port's credentials. With adminIssued
// it returns ps with httpTLS set (in the parsed config and in the file
// to install), the certificate files to write (the serving pair, then the
// client pair; only those not current), and notes.
func (i *Installer) adminCredentials(ps pluginSettings) (pluginSettings, []Change, []string, error) {
	files := adminPaths(i.cfg.Paths.AdminDir)
	src, err := adminSourceOf(ps.cfg, files)
	if err != nil {
		return ps, nil, nil, err
	}
	ps.admin = src
	if src != adminIssued {
		return ps, nil, nil, nil
	}
	fsys, paths := i.cfg.FS, i.cfg.Paths
	why := "the plugin config names them"
	if ok, _ := adminauth.IsLoopback(ps.cfg.HTTPAddr); !ok {
		why = fmt.Sprintf("httpAddr %s is not loopback", ps.cfg.HTTPAddr)
	}
	externalCA := func(missing string) error {
		return fmt.Errorf("the admin port needs certificates (%s) and install issues them from the cluster CA, but %s does not exist (external CA?): set httpTLS.certFile, httpTLS.keyFile and httpTLS.clientCAFile (or httpAuth.tokenFile) in the plugin config", why, missing)
	}
	caPEM, _, ok, err := readOptional(fsys, paths.ClusterCACert)
	if err != nil {
		return ps, nil, nil, err
	}
	if !ok {
		return ps, nil, nil, externalCA(paths.ClusterCACert)
	}
	ca, err := parseCertPEM(caPEM)
	if err != nil {
		return ps, nil, nil, fmt.Errorf("cluster CA %s: %w", paths.ClusterCACert, err)
	}
	serving, err := servingRequest(ps.cfg.HTTPAddr, i.cfg.AdminIPs, i.cfg.AdminHostname)
	if err != nil {
		return ps, nil, nil, err
	}
	client := adminauth.CertRequest{CommonName: adminauth.DefaultClientName, Client: true}
	if names := ps.cfg.HTTPTLS.ClientNames; len(names) > 0 {
		client.CommonName = names[0]
	}

	now := i.cfg.Now()
	issuer := adminauth.Issuer{Now: i.cfg.Now}
	var caKey []byte
	var changes []Change
	var notes []string
	for _, pair := range []struct {
		cert, key string
		req       adminauth.CertRequest
	}{{files.cert, files.key, serving}, {files.clientCert, files.clientKey, client}} {
		oldCert, certPerm, certOK, err := readOptional(fsys, pair.cert)
		if err != nil {
			return ps, nil, nil, err
		}
		oldKey, keyPerm, keyOK, err := readOptional(fsys, pair.key)
		if err != nil {
			return ps, nil, nil, err
		}
		reason := "it does not exist"
		if certOK {
			if !keyOK {
				oldKey = nil
			}
			reason = certReason(oldCert, oldKey, keyPerm, ca, pair.req, now)
		}
		if reason == "" {
			continue
		}
		if caKey == nil {
			data, _, ok, err := readOptional(fsys, paths.ClusterCAKey)
			if err != nil {
				return ps, nil, nil, err
			}
			if !ok {
				return ps, nil, nil, externalCA(paths.ClusterCAKey)
			}
			caKey = data
		}
		certPEM, keyPEM, err := issuer.Issue(caPEM, caKey, pair.req)
		if err != nil {
			return ps, nil, nil, fmt.Errorf("issue %s: %w", pair.cert, err)
		}
		changes = append(changes,
			Change{Path: pair.cert, Existed: certOK, Old: oldCert, OldPerm: certPerm, New: certPEM, Perm: 0o600},
			Change{Path: pair.key, Existed: keyOK, Old: oldKey, OldPerm: keyPerm, New: keyPEM, Perm: 0o600, Secret: true})
		switch {
		case certOK:
			notes = append(notes, fmt.Sprintf("%s is issued again: %s", pair.cert, reason))
		case pair.req.Client:
			notes = append(notes, fmt.Sprintf("kms-plugin rotate and status reach the plugins over HTTPS with the client certificate issued on this node: --plugin-ca-file=%s --plugin-cert-file=%s --plugin-key-file=%s",
				paths.ClusterCACert, pair.cert, pair.key))
		}
	}
	clear(caKey) // nothing below needs it
	if ca.NotAfter.Before(now.Add(adminRenewBefore)) {
		notes = append(notes, fmt.Sprintf("the cluster CA %s expires on %s, and the admin certificates with it", paths.ClusterCACert, ca.NotAfter.UTC().Format(time.DateOnly)))
	}

	want := ps.cfg.HTTPTLS
	want.CertFile, want.KeyFile, want.ClientCAFile = files.cert, files.key, paths.ClusterCACert
	raw, restyled, err := setHTTPTLS(ps.raw, want)
	if err != nil {
		return ps, nil, nil, fmt.Errorf("plugin config: %w", err)
	}
	// The file must say to serve what install just planned.
	check := registry.Builtin().Default()
	if err := config.Parse(raw, &check); err != nil || !slices.Equal(check.HTTPTLS.ClientNames, want.ClientNames) ||
		check.HTTPTLS.CertFile != want.CertFile || check.HTTPTLS.KeyFile != want.KeyFile || check.HTTPTLS.ClientCAFile != want.ClientCAFile {
		return ps, nil, nil, fmt.Errorf("plugin config: setting httpTLS failed (%v)", err)
	}
	ps.raw, ps.restyled, ps.cfg.HTTPTLS = raw, restyled, want
	return ps, changes, notes, nil
}

// servingRequest returns the request for the serving certificate of a
// plugin listening on httpAddr: its IP (or name), the node's ips and
// hostname, and 127.0.0.1 (kubelet's probes, a local rotate). An httpAddr
// on every address needs ips: rotate reaches each plugin at its node's
// InternalIP, which the certificate must name.
func servingRequest(httpAddr string, ips []net.IP, hostname string) (adminauth.CertRequest, error) {
	req := adminauth.CertRequest{CommonName: "kms-plugin", Server: true}
	addIP := func(ip net.IP) {
		if !slices.ContainsFunc(req.IPs, ip.Equal) {
			req.IPs = append(req.IPs, ip)
		}
	}
	addName := func(n string) {
		if n = strings.ToLower(n); n != "" && !slices.Contains(req.DNSNames, n) {
			req.DNSNames = append(req.DNSNames, n)
		}
	}
	host, _, err := net.SplitHostPort(httpAddr)
	if err != nil {
		return req, fmt.Errorf("plugin config: httpAddr %q: %w", httpAddr, err)
	}
	if ip := net.ParseIP(host); ip != nil {
		if !ip.IsUnspecified() {
			addIP(ip)
		}
	} else {
		addName(host)
	}
	for _, ip := range ips {
		addIP(ip)
	}
	if len(req.IPs) == 0 && len(req.DNSNames) == 0 {
		return req, fmt.Errorf("plugin config: httpAddr %s listens on every address: name this node's addresses with --admin-ip, for the admin port's serving certificate (rotate reaches each plugin at its node's InternalIP)", httpAddr)
	}
	addIP(net.IPv4(127, 0, 0, 1))
	if hostname != "" && !hostnameRE.MatchString(strings.ToLower(hostname)) {
		return req, fmt.Errorf("hostname %q is not a DNS name for the admin port's serving certificate (set --admin-hostname)", hostname)
	}
	addName(hostname)
	return req, nil
}

// certReason returns why the installed pair certPEM and keyPEM (nil when
// missing; keyPerm its key file's mode) is not one install keeps for req,
// or "" when it is: signed by ca, valid now and for adminRenewBefore more
// (or until ca expires), with req's usage, CommonName and exactly its
// names, and a key readable by its owner only.
func certReason(certPEM, keyPEM []byte, keyPerm fs.FileMode, ca *x509.Certificate, req adminauth.CertRequest, now time.Time) string {
	if keyPEM == nil {
		return "its key does not exist"
	}
	if keyPerm&0o077 != 0 {
		return fmt.Sprintf("its key file has mode %04o, readable by others", keyPerm)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return "the certificate and key are not a pair" // err may quote the files
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return "the certificate does not parse"
	}
	usage := x509.ExtKeyUsageClientAuth
	if req.Server {
		usage = x509.ExtKeyUsageServerAuth
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Sprintf("it does not verify against the cluster CA: %v", err)
	}
	if renew := now.Add(adminRenewBefore); cert.NotAfter.Before(renew) && cert.NotAfter.Before(ca.NotAfter) {
		return fmt.Sprintf("it expires on %s", cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if cert.Subject.CommonName != req.CommonName {
		return fmt.Sprintf("its CommonName is %q, not %q", cert.Subject.CommonName, req.CommonName)
	}
	if got, want := certNames(cert.DNSNames, cert.IPAddresses), certNames(req.DNSNames, req.IPs); !slices.Equal(got, want) {
		return fmt.Sprintf("it names %s, not %s", strings.Join(got, ", "), strings.Join(want, ", "))
	}
	return ""
}

// certNames returns a certificate's subject alternative names, sorted.
func certNames(dns []string, ips []net.IP) []string {
	var out []string
	for _, n := range dns {
		out = append(out, strings.ToLower(n))
	}
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// parseCertPEM returns the first certificate of PEM data.
func parseCertPEM(data []byte) (*x509.Certificate, error) {
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return nil, errors.New("no PEM CERTIFICATE block")
		}
		if b.Type == "CERTIFICATE" {
			return x509.ParseCertificate(b.Bytes)
		}
	}
}

// httpTLSComment heads the httpTLS section install adds to a plugin
// config.
const httpTLSComment = "Written by `kms-plugin install`: httpAddr is not loopback, so the admin\n" +
	"port serves HTTPS with a certificate of the cluster CA, and admits client\n" +
	"certificates of that CA named in clientNames (default kms-plugin-admin)."

// setHTTPTLS returns the plugin config data with httpTLS.certFile,
// httpTLS.keyFile and httpTLS.clientCAFile set as in t, everything else
// kept, and whether its layout changed beyond that edit. A file already
// holding those values comes back byte for byte.
func setHTTPTLS(data []byte, t config.HTTPTLSConfig) ([]byte, bool, error) {
	d, err := parseYAML(data)
	if err != nil {
		return nil, false, err
	}
	top := d.top()
	if top.Kind != yaml.MappingNode {
		return nil, false, errors.New("not a YAML mapping")
	}
	section := mapGetFold(top, "httpTLS")
	if !isKind(section, yaml.MappingNode) {
		m := mapNode()
		if section != nil {
			*section = *m // replaces null or {}
		} else {
			key := strNode("httpTLS")
			key.HeadComment = httpTLSComment
			at := len(top.Content)
			for n := 0; n+1 < len(top.Content); n += 2 {
				if strings.EqualFold(top.Content[n].Value, "httpAddr") {
					at = n + 2
				}
			}
			top.Content = slices.Insert(top.Content, at, key, m)
		}
		section = mapGetFold(top, "httpTLS")
	}
	for _, f := range []struct{ key, value string }{{"certFile", t.CertFile}, {"keyFile", t.KeyFile}, {"clientCAFile", t.ClientCAFile}} {
		if v := mapGetFold(section, f.key); v != nil {
			if v.Kind != yaml.ScalarNode || v.Value != f.value {
				*v = *strNode(f.value)
			}
			continue
		}
		section.Content = append(section.Content, strNode(f.key), strNode(f.value))
	}
	out, err := d.encode()
	if err != nil {
		return nil, false, err
	}
	return out, d.restyled && !bytes.Equal(out, data), nil
}

// mapGetFold returns the value of key in mapping m, matching the key
// ignoring case as config.Parse does, or nil.
func mapGetFold(m *yaml.Node, key string) *yaml.Node {
	if !isKind(m, yaml.MappingNode) {
		return nil
	}
	for n := 0; n+1 < len(m.Content); n += 2 {
		if strings.EqualFold(m.Content[n].Value, key) {
			return m.Content[n+1]
		}
	}
	return nil
}
