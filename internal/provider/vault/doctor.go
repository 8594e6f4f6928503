package vault

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Doctor implements provider.Doctor: Vault's address and TLS, the login,
// the token's TTL and renewability, the key and its type, and the token's
// policy on the key's paths, in that order. kms-plugin doctor then makes a
// round trip with the returned provider.
func (v *Settings) Doctor(ctx context.Context, c provider.Checklist, o provider.OpenOptions) provider.Provider {
	p, err := v.open(o)
	if err != nil {
		c.Fail("settings", err, "fix the vault settings: the CA, client certificate and key files must exist and hold PEM")
		return nil
	}
	hctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	h, err := p.client.Sys().HealthWithContext(hctx)
	cancel()
	if err != nil {
		err = classify(ctx, opHealth, "sys/health", "", err)
		c.Fail("vault", err, Remedy(err))
		c.Skip("login, token, key, policy", "need Vault")
		return nil
	}
	switch {
	case !h.Initialized:
		err := &Error{Op: opHealth, Path: "sys/health", Kind: provider.ErrUnavailable, Message: "Vault is not initialized"}
		c.Fail("vault", err, "initialize Vault (vault operator init) and unseal it")
		return nil
	case h.Sealed:
		err := &Error{Op: opHealth, Path: "sys/health", Kind: provider.ErrUnavailable, Message: "Vault is sealed"}
		c.Fail("vault", err, Remedy(err))
		return nil
	}
	role := "active"
	if h.Standby {
		role = "standby (requests are forwarded to the active node)"
	}
	c.OK("vault", fmt.Sprintf("%s answers: version %s, unsealed, %s", p.Address(), h.Version, role))

	if err := p.session.ensure(ctx); err != nil {
		c.Fail("login", err, Remedy(err))
		c.Skip("token, key, policy", "need a token")
		return nil
	}
	ti := p.Token()
	c.OK("login", "logged in with "+ti.Method)
	switch {
	case ti.TTL == 0:
		c.OK("token", "the token has no TTL (it never expires); prefer a token with a TTL and a renewable policy")
	case !ti.Renewable && ti.Method == AuthToken:
		c.Fail("token", fmt.Errorf("the token is not renewable and expires in %s", ti.TTL.Round(time.Second)),
			"create a renewable token (vault token create -policy=kms-plugin -period=24h -orphan), or use approle, cert or jwt auth so the plugin can log in again by itself")
	case !ti.Renewable:
		c.OK("token", fmt.Sprintf("TTL %s, not renewable: the plugin logs in again at two thirds of it", ti.TTL.Round(time.Second)))
	default:
		c.OK("token", fmt.Sprintf("TTL %s, renewable: renewed at about two thirds of it", ti.TTL.Round(time.Second)))
	}

	st, err := p.readKey(ctx)
	if err != nil {
		c.Fail("key", err, Remedy(err))
		c.Skip("policy", "needs the key")
		return nil
	}
	detail := fmt.Sprintf("%s: type %s, latest version %d, min_decryption_version %d", p.keyPath, st.typ, st.latest, st.minDecryption)
	if st.minEncryption > 0 {
		detail += fmt.Sprintf(", min_encryption_version %d", st.minEncryption)
	}
	if st.autoRotate > 0 {
		detail += ", auto_rotate_period " + st.autoRotate.String()
	}
	c.OK("key", detail)

	if err := p.checkPolicy(ctx, c); err != nil {
		return nil
	}
	return p
}

// checkPolicy asks sys/capabilities-self what the token may do on the
// key's paths.
func (p *Provider) checkPolicy(ctx context.Context, c provider.Checklist) error {
	paths := []struct {
		path, capability string
		required         bool
	}{
		{p.cfg.Mount + "/encrypt/" + p.cfg.KeyName, "update", true},
		{p.cfg.Mount + "/decrypt/" + p.cfg.KeyName, "update", true},
		{p.keyPath, "read", true},
		{p.keyPath + "/rotate", "update", false},
		{p.keyPath + "/config", "update", false},
	}
	caps := map[string][]string{}
	for _, x := range paths {
		cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
		have, err := p.client.Sys().CapabilitiesSelfWithContext(cctx, x.path)
		cancel()
		if err != nil {
			err = classify(ctx, opCaps, "sys/capabilities-self", "", err)
			c.Fail("policy", err, "allow the token update on sys/capabilities-self (the default policy does), or check the policy by hand: "+PolicyHCL(p.cfg.Mount, p.cfg.KeyName))
			return err
		}
		caps[x.path] = have
	}
	var missing, optional []string
	for _, x := range paths {
		have := caps[x.path]
		if slices.Contains(have, "root") || slices.Contains(have, x.capability) {
			continue
		}
		if x.required {
			missing = append(missing, x.capability+" on "+x.path)
		} else {
			optional = append(optional, x.capability+" on "+x.path)
		}
	}
	if len(missing) > 0 {
		err := fmt.Errorf("%w: the token's policy lacks %s", provider.ErrPermissionDenied, strings.Join(missing, ", "))
		c.Fail("policy", err, "write this policy and attach it to the plugin's role or token: "+PolicyHCL(p.cfg.Mount, p.cfg.KeyName))
		return err
	}
	if enc := caps[p.cfg.Mount+"/encrypt/"+p.cfg.KeyName]; slices.Contains(enc, "create") || slices.Contains(enc, "root") {
		c.OK("policy", "encrypt, decrypt and read allowed; note: the token may also create keys through encrypt, so a deleted key would be made again by a Wrap: grant update only")
	} else {
		c.OK("policy", "encrypt, decrypt and read allowed")
	}
	if len(optional) > 0 {
		c.Skip("rotate", "the policy lacks "+strings.Join(optional, ", ")+": kms-plugin rotate cannot rotate or retire through this token (Vault's auto_rotate_period still works)")
	} else {
		c.OK("rotate", "rotate and config allowed")
	}
	return nil
}

// PolicyHCL is the Vault policy the plugin needs on one transit key: read
// the key, encrypt and decrypt with it, and (for kms-plugin rotate) rotate
// it and change its minimum versions.
func PolicyHCL(mount, key string) string {
	if mount == "" {
		mount = DefaultMount
	}
	return fmt.Sprintf(`path "%[1]s/encrypt/%[2]s" { capabilities = ["update"] } `+
		`path "%[1]s/decrypt/%[2]s" { capabilities = ["update"] } `+
		`path "%[1]s/keys/%[2]s" { capabilities = ["read"] } `+
		`path "%[1]s/keys/%[2]s/rotate" { capabilities = ["update"] } `+
		`path "%[1]s/keys/%[2]s/config" { capabilities = ["update"] }`, mount, key)
}

// Remedy implements provider.Doctor with the package's Remedy.
func (v *Settings) Remedy(err error) string { return Remedy(err) }

// Remedy returns a concrete fix for an error of this package, or "".
func Remedy(err error) string {
	if err == nil {
		return ""
	}
	if errors.Is(err, errBackoff) {
		return "Vault failed several calls in a row, so calls are paused for a few seconds; fix the cause shown in the earlier errors (Vault sealed or down, network path)"
	}
	var fe *secretFileError
	if errors.As(err, &fe) {
		return fe.Fix
	}
	var e *Error
	if !errors.As(err, &e) {
		return ""
	}
	m := strings.ToLower(e.Message)
	switch {
	case strings.Contains(m, "tls certificate"):
		return "Vault's certificate is not trusted: set vault.caFile (--vault-ca-file) to the CA that signed it, and vault.tlsServerName when the address is not a name in the certificate"
	case strings.Contains(m, "vault is sealed"):
		return "Vault is sealed: unseal it (vault operator unseal, or check its auto-unseal); the plugin keeps serving from its cached keys meanwhile"
	case e.Op == opLogin || e.Op == opLookup:
		return loginRemedy(e)
	case e.Op == opRenew:
		return "the token could not be renewed and the login after it failed: check the auth method's credential files and that the auth role still exists; the plugin retries by itself"
	case errors.Is(e.Kind, provider.ErrPermissionDenied):
		return "the token's policy does not allow this: attach this policy to the plugin's token or role: " + PolicyHCL(mountOf(e.Path), keyOf(e.Path))
	case errors.Is(e.Kind, provider.ErrKeyNotFound) && e.Op == opRead:
		return "no such transit key: create it (vault write -f " + strings.Replace(e.Path, "/keys/", "/keys/", 1) + " type=aes256-gcm96), or fix vault.transitMount and vault.keyName"
	case errors.Is(e.Kind, provider.ErrKeyNotFound):
		return "the key version that wrapped this data does not exist in this transit key (deleted key, or data of another key): point the plugin at the key that holds it"
	case errors.Is(e.Kind, provider.ErrKeyDisabled):
		return "the key version is below the key's min_decryption_version: lower it (vault write MOUNT/keys/NAME/config min_decryption_version=N) if data still needs that version"
	case errors.Is(e.Kind, provider.ErrInvalidCiphertext):
		return "the wrapped key does not authenticate under this transit key: it was written through another key or Vault (a key deleted and made again under the same name is another key), or it is damaged; point the plugin at the key that wrote it"
	case errors.Is(e.Kind, provider.ErrUnavailable) && e.Status >= 500:
		return "Vault answered with a server error (sealed, no active node, overloaded): check vault status and its logs; the plugin keeps serving from its cached keys meanwhile"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return "cannot reach Vault: check vault.address (--vault-address, VAULT_ADDR), the network path and HTTPS_PROXY / NO_PROXY"
	}
	return ""
}

func loginRemedy(e *Error) string {
	switch {
	case e.Message != "" && strings.Contains(e.Message, "file"):
		return "fix the credential file named above (it must exist, be non-empty, mode 0600 or 0400, owned by the plugin's user or root)"
	case e.Status == 403 && e.Op == opLookup:
		return "Vault refused the token: it is revoked, expired or mistyped; write a valid token to the token file"
	case e.Status == 400 || e.Status == 403:
		return "Vault refused the login: check the role ID / secret ID (approle), the certificate and its cert role (cert), or the JWT and role (jwt), and the auth mount path (vault.auth.mount)"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return "cannot reach Vault to log in: check vault.address and the network path"
	}
	return "check the auth method's settings (vault.auth)"
}

func mountOf(path string) string {
	if i := strings.Index(path, "/encrypt/"); i > 0 {
		return path[:i]
	}
	if i := strings.Index(path, "/decrypt/"); i > 0 {
		return path[:i]
	}
	if i := strings.Index(path, "/keys/"); i > 0 {
		return path[:i]
	}
	return DefaultMount
}

func keyOf(path string) string {
	for _, sep := range []string{"/encrypt/", "/decrypt/", "/keys/"} {
		if i := strings.Index(path, sep); i >= 0 {
			k := path[i+len(sep):]
			k, _, _ = strings.Cut(k, "/")
			return k
		}
	}
	return "KEY"
}
