package adminauth

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"
)

// DefaultClientTimeout is ClientConfig.Timeout when left zero.
const DefaultClientTimeout = 10 * time.Second

// ClientConfig configures a client of admin servers: kms-plugin rotate,
// status and verify.
type ClientConfig struct {
	// CAFile is the PEM bundle of CAs that signed the servers' serving
	// certificates (the cluster CA when install issued them). Required
	// by ClientTLS, and by HTTPClient for https URLs.
	CAFile string
	// CertFile and KeyFile are the client certificate and key presented
	// to servers that ask for one, re-read when they change. Optional:
	// both or neither.
	CertFile, KeyFile string
	// ServerName is the name checked against the serving certificate.
	// Default: the host of each URL (an IP address for a node's plugin,
	// so its certificate needs that IP as a SAN).
	ServerName string
	// TokenFile holds the bearer token HTTPClient sends; see TokenFile.
	// Optional.
	TokenFile string
	// Timeout bounds each request of HTTPClient. Default
	// DefaultClientTimeout.
	Timeout time.Duration
}

// ClientTLS returns the TLS configuration for admin servers: TLS 1.2 or
// later, serving certificates verified against CAFile only (not the
// system roots), and the client pair, when set, re-read when it changes.
func ClientTLS(cfg ClientConfig) (*tls.Config, error) {
	if cfg.CAFile == "" {
		return nil, errors.New("adminauth: no CA file to verify the admin server's certificate")
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("adminauth: a client certificate needs both a certificate file and a key file")
	}
	pool, err := loadCAPool(cfg.CAFile)
	if err != nil {
		return nil, err
	}
	tc := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    pool,
		ServerName: cfg.ServerName,
	}
	if cfg.CertFile != "" {
		kp, err := loadKeyPairFile(cfg.CertFile, cfg.KeyFile, nil)
		if err != nil {
			return nil, err
		}
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return kp.get()
		}
	}
	return tc, nil
}

// HTTPClient returns an HTTP client for admin servers with cfg.Timeout
// per request. It uses no proxy and follows no redirect (it returns the
// redirect response). With CAFile, https URLs use ClientTLS(cfg); without
// it they are verified against the system roots, which admin servers'
// certificates do not chain to, so such a client is for plain http on a
// loopback address, and a client certificate is an error. With TokenFile, each request carries
// "Authorization: Bearer TOKEN", the token read when the file changed;
// the token is sent only over https verified against CAFile, or over
// plain http to a loopback address, and any other request fails before
// it is sent.
func HTTPClient(cfg ClientConfig) (*http.Client, error) {
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout: 5 * time.Second,
		MaxIdleConns:        10,
		IdleConnTimeout:     30 * time.Second,
	}
	pinned := cfg.CAFile != ""
	if pinned {
		tc, err := ClientTLS(cfg)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = tc
	} else if cfg.CertFile != "" || cfg.KeyFile != "" {
		return nil, errors.New("adminauth: a client certificate needs a CA file to verify the admin server's certificate")
	}
	var rt http.RoundTripper = tr
	if cfg.TokenFile != "" {
		tf, err := NewTokenFile(cfg.TokenFile)
		if err != nil {
			return nil, err
		}
		rt = &bearerTransport{next: tr, token: tf, pinned: pinned}
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultClientTimeout
	}
	return &http.Client{
		Transport:     rt,
		Timeout:       timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}

// bearerTransport adds the token to requests that may carry it.
type bearerTransport struct {
	next   http.RoundTripper
	token  *TokenFile
	pinned bool // https is verified against a configured CA
}

func (t *bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if err := mayCarryToken(r.URL, t.pinned); err != nil {
		closeBody(r)
		return nil, err
	}
	tok, err := t.token.Token()
	if err != nil {
		closeBody(r)
		return nil, err
	}
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+tok)
	return t.next.RoundTrip(r)
}

// mayCarryToken returns an error unless a bearer token may go to u: over
// https when the server is verified against a configured CA, or over
// http to a loopback address.
func mayCarryToken(u *url.URL, pinned bool) error {
	switch u.Scheme {
	case "https":
		if pinned {
			return nil
		}
		return fmt.Errorf("adminauth: refusing to send the bearer token to %s: no CA file to verify the server", u.Host)
	case "http":
		host := u.Host
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "80")
		}
		if ok, _ := IsLoopback(host); ok {
			return nil
		}
		return fmt.Errorf("adminauth: refusing to send the bearer token over plain http to %s: use https", u.Host)
	default:
		return fmt.Errorf("adminauth: refusing to send the bearer token over %q", u.Scheme)
	}
}

func closeBody(r *http.Request) {
	if r.Body != nil {
		r.Body.Close()
	}
}
