package vault

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Section is the config file's key of the vault settings.
const Section = "vault"

// Auth method names.
const (
	AuthToken   = "token"
	AuthAppRole = "approle"
	AuthCert    = "cert"
	AuthJWT     = "jwt"
)

// clientMaxRetries is the Vault client's own retries of a failed request
// (5xx, 412, connection errors), with its backoff of 250 ms to 1 s: one, so
// that a connection reset or a leader election costs a retry rather than a
// failed Decrypt, and no more, because the provider's backoff handles an
// outage and the client's default (2 retries, up to 1.5 s each) would
// triple the requests to an overloaded or sealed Vault.
const clientMaxRetries = 1

// Registration describes the vault provider to the provider registry.
func Registration() provider.Registration {
	return provider.Registration{
		Name:    Name,
		Section: Section,
		Summary: "a key of a HashiCorp Vault or OpenBao transit engine",
		NewSettings: func() provider.Settings {
			return &Settings{TransitMount: DefaultMount, Auth: AuthSettings{Method: AuthToken}}
		},
		Flags: flags,
	}
}

// Settings are the vault section of the config file. Secrets are read from
// files named here, never given inline. VAULT_* environment variables apply
// where the official client reads them (VAULT_ADDR, VAULT_CACERT,
// VAULT_CLIENT_CERT, VAULT_NAMESPACE, VAULT_TOKEN, ...); a setting here
// wins over its variable.
type Settings struct {
	// Address is Vault's URL, https://vault.example:8200. Default
	// VAULT_ADDR.
	Address string `json:"address,omitempty"`
	// Namespace is the Vault Enterprise / OpenBao namespace of the key and
	// the auth method.
	Namespace string `json:"namespace,omitempty"`
	// TransitMount is the transit engine's mount path. Default "transit".
	TransitMount string `json:"transitMount,omitempty"`
	// KeyName is the transit key. Required.
	KeyName string `json:"keyName,omitempty"`
	// CAFile is a PEM bundle that verifies Vault's certificate (default:
	// the system's roots).
	CAFile string `json:"caFile,omitempty"`
	// ClientCertFile and ClientKeyFile are the client certificate for
	// mutual TLS and for cert auth.
	ClientCertFile string `json:"clientCertFile,omitempty"`
	ClientKeyFile  string `json:"clientKeyFile,omitempty"`
	// TLSServerName is the name to verify Vault's certificate against when
	// it is not the address's host.
	TLSServerName string `json:"tlsServerName,omitempty"`
	// Timeout bounds each call to Vault; zero means the default (10s).
	Timeout config.Duration `json:"timeout,omitzero"`
	// Auth says how to log in.
	Auth AuthSettings `json:"auth"`
}

// AuthSettings select how the plugin logs in to Vault. Kubernetes auth is
// not offered: the plugin runs before the cluster's API serves.
type AuthSettings struct {
	// Method is token (default), approle, cert or jwt.
	Method string `json:"method"`
	// Mount is the auth method's mount path; default the method's name.
	Mount string `json:"mount,omitempty"`
	// TokenFile holds the token (token method); empty uses VAULT_TOKEN.
	TokenFile string `json:"tokenFile,omitempty"`
	// RoleIDFile and SecretIDFile hold the AppRole credentials.
	RoleIDFile   string `json:"roleIDFile,omitempty"`
	SecretIDFile string `json:"secretIDFile,omitempty"`
	// JWTFile holds the JWT; Role is the jwt role, or the cert role's name
	// (optional for cert).
	JWTFile string `json:"jwtFile,omitempty"`
	Role    string `json:"role,omitempty"`
}

var (
	_ provider.Settings   = (*Settings)(nil)
	_ provider.Describer  = (*Settings)(nil)
	_ provider.Doctor     = (*Settings)(nil)
	_ provider.HostPather = (*Settings)(nil)
)

// flags registers the --vault-* flags. Secrets are only ever named by
// file.
func flags(fs *flag.FlagSet) func(provider.Settings) {
	s := map[string]*string{}
	str := func(name, usage string) { s[name] = fs.String(name, "", usage) }
	str("vault-address", "vault: Vault's address, https://HOST:8200 (default VAULT_ADDR)")
	str("vault-namespace", "vault: namespace of the key and auth method (Vault Enterprise, OpenBao)")
	str("vault-transit-mount", "vault: transit engine mount path (default transit)")
	str("vault-key-name", "vault: transit key name")
	str("vault-ca-file", "vault: PEM CA bundle that verifies Vault's certificate")
	str("vault-client-cert", "vault: client certificate (PEM) for mutual TLS and cert auth")
	str("vault-client-key", "vault: client certificate's key (PEM)")
	str("vault-tls-server-name", "vault: name to verify Vault's certificate against")
	str("vault-auth", "vault: auth method: token, approle, cert or jwt (default token)")
	str("vault-auth-mount", "vault: auth method mount path (default: the method's name)")
	str("vault-token-file", "vault: file holding the token (token auth; default VAULT_TOKEN)")
	str("vault-approle-role-id-file", "vault: file holding the AppRole role ID")
	str("vault-approle-secret-id-file", "vault: file holding the AppRole secret ID")
	str("vault-jwt-file", "vault: file holding the JWT (jwt auth)")
	str("vault-jwt-role", "vault: jwt auth role")
	str("vault-cert-role", "vault: cert auth role name (optional)")
	timeout := fs.Duration("vault-timeout", 0, "vault: timeout of each call to Vault (default 10s)")

	return func(settings provider.Settings) {
		v := settings.(*Settings)
		a := &v.Auth
		fields := map[string]*string{
			"vault-address": &v.Address, "vault-namespace": &v.Namespace, "vault-transit-mount": &v.TransitMount,
			"vault-key-name": &v.KeyName, "vault-ca-file": &v.CAFile, "vault-client-cert": &v.ClientCertFile,
			"vault-client-key": &v.ClientKeyFile, "vault-tls-server-name": &v.TLSServerName,
			"vault-auth": &a.Method, "vault-auth-mount": &a.Mount, "vault-token-file": &a.TokenFile,
			"vault-approle-role-id-file": &a.RoleIDFile, "vault-approle-secret-id-file": &a.SecretIDFile,
			"vault-jwt-file": &a.JWTFile, "vault-jwt-role": &a.Role, "vault-cert-role": &a.Role,
		}
		fs.Visit(func(f *flag.Flag) {
			if dst, ok := fields[f.Name]; ok {
				*dst = *s[f.Name]
			}
			if f.Name == "vault-timeout" {
				v.Timeout = config.Duration{Duration: *timeout}
			}
		})
	}
}

// Validate implements provider.Settings.
func (v *Settings) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", Section, field, fmt.Sprintf(format, args...)))
	}
	switch addr := v.address(); {
	case addr == "":
		bad("address", "required with provider %s (or VAULT_ADDR in the plugin's environment)", Name)
	default:
		if u, err := url.Parse(addr); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" {
			bad("address", "%q must be https://HOST[:PORT]", addr)
		}
	}
	if !keyNameRE.MatchString(v.KeyName) {
		bad("keyName", "%q must be 1-128 letters, digits, '.', '_' and '-'", v.KeyName)
	}
	if m := strings.Trim(v.TransitMount, "/"); m != "" && !mountRE.MatchString(m) {
		bad("transitMount", "%q must be a mount path such as transit or kms/transit", v.TransitMount)
	}
	if ns := strings.Trim(v.Namespace, "/"); ns != "" && !mountRE.MatchString(ns) {
		bad("namespace", "%q must be a namespace path such as team-a or team-a/kms", v.Namespace)
	}
	abs := func(field, path string) {
		if path != "" && !filepath.IsAbs(path) {
			bad(field, "%q must be an absolute path", path)
		}
	}
	abs("caFile", v.CAFile)
	abs("clientCertFile", v.ClientCertFile)
	abs("clientKeyFile", v.ClientKeyFile)
	if (v.ClientCertFile == "") != (v.ClientKeyFile == "") {
		bad("clientKeyFile", "clientCertFile and clientKeyFile go together")
	}
	if d := v.Timeout.Duration; d != 0 && (d < time.Second || d > 5*time.Minute) {
		bad("timeout", "%s is outside 1s..5m", d)
	}
	a := v.Auth
	need := func(field, val string) {
		if val == "" {
			bad("auth."+field, "required with auth method %s", a.Method)
		}
		abs("auth."+field, val)
	}
	if a.Mount != "" && !mountRE.MatchString(strings.Trim(a.Mount, "/")) {
		bad("auth.mount", "%q must be a mount path such as approle", a.Mount)
	}
	switch a.Method {
	case AuthToken, "":
		abs("auth.tokenFile", a.TokenFile)
		if a.TokenFile == "" && os.Getenv(api.EnvVaultToken) == "" {
			bad("auth.tokenFile", "required with auth method token (or VAULT_TOKEN in the plugin's environment)")
		}
	case AuthAppRole:
		need("roleIDFile", a.RoleIDFile)
		need("secretIDFile", a.SecretIDFile)
	case AuthCert:
		if v.ClientCertFile == "" && os.Getenv(api.EnvVaultClientCert) == "" {
			bad("clientCertFile", "required with auth method cert (the TLS client certificate is the credential)")
		}
	case AuthJWT:
		need("jwtFile", a.JWTFile)
		if a.Role == "" {
			bad("auth.role", "required with auth method jwt")
		}
	default:
		bad("auth.method", "unknown method %q (token, approle, cert or jwt; Kubernetes auth cannot work for a KMS plugin, which runs before the cluster's API)", a.Method)
	}
	return errors.Join(errs...)
}

func (v *Settings) address() string {
	if v.Address != "" {
		return v.Address
	}
	return os.Getenv(api.EnvVaultAddress)
}

// Method returns the auth method the settings describe.
func (v *Settings) Method() Method {
	a := v.Auth
	mount := strings.Trim(a.Mount, "/")
	if mount == "" {
		mount = a.Method
	}
	switch a.Method {
	case AuthAppRole:
		return AppRole{Mount: mount, RoleIDFile: a.RoleIDFile, SecretIDFile: a.SecretIDFile}
	case AuthCert:
		return Cert{Mount: mount, Role: a.Role}
	case AuthJWT:
		return JWT{Mount: mount, Role: a.Role, JWTFile: a.JWTFile}
	default:
		return TokenFile{Path: a.TokenFile}
	}
}

// NewClient returns a Vault client for the settings: the official client's
// defaults and VAULT_* variables, then the settings over them. transport,
// when set, carries every request (tests); TLS settings then do not apply.
func (v *Settings) NewClient(transport provider.Transport) (*api.Client, error) {
	cfg := api.DefaultConfig()
	if cfg.Error != nil {
		return nil, fmt.Errorf("vault: client configuration from the environment: %w", cfg.Error)
	}
	if v.Address != "" {
		cfg.Address = v.Address
	}
	cfg.MaxRetries = clientMaxRetries
	cfg.MinRetryWait, cfg.MaxRetryWait = 250*time.Millisecond, time.Second
	cfg.Timeout = DefaultTimeout
	if v.Timeout.Duration > 0 {
		cfg.Timeout = v.Timeout.Duration
	}
	// Clones (for logins) keep the namespace header.
	cfg.CloneHeaders = true
	if v.CAFile != "" || v.ClientCertFile != "" || v.TLSServerName != "" {
		if err := cfg.ConfigureTLS(&api.TLSConfig{
			CACert: v.CAFile, ClientCert: v.ClientCertFile, ClientKey: v.ClientKeyFile, TLSServerName: v.TLSServerName,
		}); err != nil {
			return nil, fmt.Errorf("vault: TLS settings: %w", err)
		}
	}
	if transport != nil {
		if hc, ok := transport.(*http.Client); ok {
			cfg.HttpClient = hc
		} else {
			cfg.HttpClient = &http.Client{Transport: transportFunc(transport.Do)}
		}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("vault: client: %w", err)
	}
	c.ClearToken() // a VAULT_TOKEN is read by the token method, not used as is
	if ns := strings.Trim(v.Namespace, "/"); ns != "" {
		c.SetNamespace(ns)
	}
	return c, nil
}

type transportFunc func(*http.Request) (*http.Response, error)

func (f transportFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// Open implements provider.Settings. It makes no network call; o.Create
// does not apply (the transit key must exist: the plugin's policy should
// not allow creating it).
func (v *Settings) Open(_ context.Context, o provider.OpenOptions) (provider.Provider, error) {
	return v.open(o)
}

func (v *Settings) open(o provider.OpenOptions) (*Provider, error) {
	c, err := v.NewClient(o.Transport)
	if err != nil {
		return nil, err
	}
	return New(Config{
		Client:  c,
		Mount:   v.TransitMount,
		KeyName: v.KeyName,
		Auth:    v.Method(),
		Timeout: v.Timeout.Duration,
	})
}

// Describe implements provider.Describer: Vault, the key and the auth
// method.
func (v *Settings) Describe() string {
	mount := strings.Trim(v.TransitMount, "/")
	if mount == "" {
		mount = DefaultMount
	}
	s := fmt.Sprintf("vault %s, key %s/keys/%s, auth %s", v.address(), mount, v.KeyName, v.Method().Name())
	if v.Namespace != "" {
		s += ", namespace " + v.Namespace
	}
	return s
}

// HostPaths implements provider.HostPather: the TLS and credential files,
// read only.
func (v *Settings) HostPaths() provider.HostPaths {
	a := v.Auth
	var hp provider.HostPaths
	n := 0
	for _, f := range []string{v.CAFile, v.ClientCertFile, v.ClientKeyFile, a.TokenFile, a.RoleIDFile, a.SecretIDFile, a.JWTFile} {
		if f != "" {
			hp.Read = append(hp.Read, provider.HostPath{Name: "vault-file-" + strconv.Itoa(n), Path: f})
			n++
		}
	}
	return hp
}
