package adminauth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"time"
)

// DefaultValidity is CertRequest.Validity when left zero.
const DefaultValidity = 365 * 24 * time.Hour

// backdate is how far before now an issued certificate becomes valid, so
// that a peer whose clock is a little behind accepts it at once.
const backdate = 5 * time.Minute

// CertRequest describes a certificate to issue.
type CertRequest struct {
	// CommonName is the subject's CN. Required for a client certificate:
	// it is the identity the admin server checks (DefaultClientName).
	CommonName string
	// Organization is the subject's O. Optional.
	Organization []string
	// DNSNames and IPs are the subject alternative names a client checks
	// the server against. A server certificate needs at least one.
	DNSNames []string
	IPs      []net.IP
	// Server and Client select the extended key usages (TLS server
	// authentication, TLS client authentication). At least one is needed.
	Server, Client bool
	// Validity is how long the certificate is valid from now. Default
	// DefaultValidity. It never outlives the CA: NotAfter is at most the
	// CA certificate's NotAfter.
	Validity time.Duration
}

// Issuer issues certificates. Its zero value is ready to use.
type Issuer struct {
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// Rand is the source of the serial number. Default crypto/rand. The
	// new key and the signature always use crypto/rand (the standard
	// library ignores other sources since Go 1.26).
	Rand io.Reader
}

// Issue issues a certificate with the zero Issuer; see Issuer.Issue.
func Issue(caCertPEM, caKeyPEM []byte, req CertRequest) (certPEM, keyPEM []byte, err error) {
	return Issuer{}.Issue(caCertPEM, caKeyPEM, req)
}

// Issue returns a new ECDSA P-256 key (PKCS#8 PEM) and a certificate for
// it (PEM) signed by the CA: caCertPEM holds the CA certificate, caKeyPEM
// its RSA or ECDSA key as PKCS#1, SEC1 or PKCS#8 PEM, such as kubeadm's
// /etc/kubernetes/pki/ca.crt and ca.key. The certificate has a random
// 128-bit serial, becomes valid five minutes before now, and has the key
// usage digital signature plus the extended key usages req asks for.
func (is Issuer) Issue(caCertPEM, caKeyPEM []byte, req CertRequest) (certPEM, keyPEM []byte, err error) {
	now, rnd := time.Now, io.Reader(rand.Reader)
	if is.Now != nil {
		now = is.Now
	}
	if is.Rand != nil {
		rnd = is.Rand
	}
	if err := req.check(); err != nil {
		return nil, nil, err
	}
	ca, err := parseCertificatePEM(caCertPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: CA certificate: %w", err)
	}
	caKey, err := parsePrivateKeyPEM(caKeyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: CA key: %w", err)
	}
	t := now()
	if err := checkCA(ca, caKey, t); err != nil {
		return nil, nil, err
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: generate key: %w", err)
	}
	serial, err := rand.Int(rnd, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: serial number: %w", err)
	}
	serial.Add(serial, big.NewInt(1)) // never 0
	validity := req.Validity
	if validity <= 0 {
		validity = DefaultValidity
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: req.CommonName, Organization: req.Organization},
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPs,
		NotBefore:             t.Add(-backdate).UTC().Truncate(time.Second),
		NotAfter:              t.Add(validity).UTC().Truncate(time.Second),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	if tmpl.NotAfter.After(ca.NotAfter) {
		tmpl.NotAfter = ca.NotAfter
	}
	if req.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if req.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: sign certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("adminauth: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

func (req CertRequest) check() error {
	switch {
	case !req.Server && !req.Client:
		return errors.New("adminauth: certificate request is for neither a server nor a client")
	case req.Client && req.CommonName == "":
		return errors.New("adminauth: a client certificate needs a CommonName: it is the identity the server checks")
	case req.Server && len(req.DNSNames) == 0 && len(req.IPs) == 0:
		return errors.New("adminauth: a server certificate needs at least one DNS name or IP address")
	}
	return nil
}

// checkCA returns an error unless ca is a CA certificate valid at t whose
// public key is key's.
func checkCA(ca *x509.Certificate, key crypto.Signer, t time.Time) error {
	switch {
	case !ca.BasicConstraintsValid || !ca.IsCA:
		return fmt.Errorf("adminauth: CA certificate %q is not a CA (basic constraints CA:FALSE or missing)", ca.Subject)
	case ca.KeyUsage != 0 && ca.KeyUsage&x509.KeyUsageCertSign == 0:
		return fmt.Errorf("adminauth: CA certificate %q may not sign certificates (no keyCertSign usage)", ca.Subject)
	case t.Before(ca.NotBefore) || t.After(ca.NotAfter):
		return fmt.Errorf("adminauth: CA certificate %q is valid from %s to %s, not now", ca.Subject, ca.NotBefore.UTC().Format(time.RFC3339), ca.NotAfter.UTC().Format(time.RFC3339))
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(ca.PublicKey) {
		return fmt.Errorf("adminauth: CA key is not the key of CA certificate %q", ca.Subject)
	}
	return nil
}

// parseCertificatePEM returns the first certificate in PEM data.
func parseCertificatePEM(data []byte) (*x509.Certificate, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, errors.New("no PEM CERTIFICATE block")
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		return c, nil
	}
}

// parsePrivateKeyPEM returns the first RSA or ECDSA private key in PEM
// data, encoded as PKCS#1 ("RSA PRIVATE KEY"), SEC1 ("EC PRIVATE KEY") or
// PKCS#8 ("PRIVATE KEY"). Other blocks, such as openssl's "EC PARAMETERS",
// are skipped. Errors never include key bytes.
func parsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, errors.New("no PEM private key block (RSA PRIVATE KEY, EC PRIVATE KEY or PRIVATE KEY)")
		}
		var (
			key any
			err error
		)
		switch b.Type {
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(b.Bytes)
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("the private key is encrypted: decrypt it first")
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", b.Type, err)
		}
		switch k := key.(type) {
		case *rsa.PrivateKey:
			return k, nil
		case *ecdsa.PrivateKey:
			return k, nil
		default:
			return nil, fmt.Errorf("unsupported %T key: want RSA or ECDSA", key)
		}
	}
}
