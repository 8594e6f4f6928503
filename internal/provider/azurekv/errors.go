package azurekv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// operation is one kind of call to the vault or to the identity provider,
// with the permission it needs.
type operation struct {
	name   string // as in messages: "get", "wrapKey", ...
	policy string // Key Vault access policy key permission
	action string // Azure RBAC data action, after Microsoft.KeyVault/{vaults|managedHsm}/
}

var (
	opGet    = operation{"get", "get", "keys/read"}
	opList   = operation{"list", "list", "keys/read"}
	opWrap   = operation{"wrapKey", "wrapKey", "keys/wrap/action"}
	opUnwrap = operation{"unwrapKey", "unwrapKey", "keys/unwrap/action"}
	opRotate = operation{"rotate", "rotate", "keys/rotate/action"}
	opUpdate = operation{"update", "update", "keys/update/action"}
	opToken  = operation{name: "token"}
	opProbe  = operation{name: "probe"}
)

// Error is a failed call to Key Vault, Managed HSM or the identity provider.
// It wraps one of the provider error values (Kind) when one applies, so
// errors.Is(err, provider.ErrPermissionDenied) and friends work, and it
// carries what an operator needs to fix the problem. It never holds a token
// or a secret.
type Error struct {
	// Op is the failed operation: get, list, wrapKey, unwrapKey, rotate,
	// update, token (getting an access token) or probe.
	Op string
	// Vault is the vault's host name (with its port, unless 443).
	Vault string
	// Key is the key name the call used.
	Key string
	// Version is the key ID (versioned) the call used, if any.
	Version string
	// Status is the HTTP status of the answer, 0 when there was none.
	Status int
	// Code and InnerCode are Key Vault's error codes (Forbidden,
	// KeyDisabled, ForbiddenByRbac, ...) or Entra's (invalid_client and
	// the AADSTS number).
	Code, InnerCode string
	// Message is the server's explanation, shortened, on one line.
	Message string
	// Permission names what a 403 lacked: the access policy permission
	// ("keys/unwrapKey") and the RBAC data action.
	Permission, RBACAction string
	// HSM is set when the vault is a Managed HSM.
	HSM bool
	// Kind is provider.ErrPermissionDenied, ErrKeyNotFound, ErrKeyDisabled,
	// ErrUnavailable, ErrInvalidCiphertext, or nil.
	Kind error
	// Err is the underlying error.
	Err error

	retryAfter time.Duration
}

// RetryAfter is how long until the circuit breaker lets a call through
// again when this failure opened it, or 0 (no hint). A caller that polls
// on a timer (the plugin's envelope) waits that long rather than its own
// retry interval.
func (e *Error) RetryAfter() time.Duration { return e.retryAfter }

// Error implements error.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("azurekv: ")
	b.WriteString(e.Op)
	// A key that is missing altogether is not a missing key version.
	keyMissing := e.Version == "" && e.Key != "" && errors.Is(e.Kind, provider.ErrKeyNotFound)
	switch {
	case e.Version != "":
		b.WriteString(" with version ")
		b.WriteString(e.Version)
	case e.Vault != "" && e.Op != "token" && !keyMissing:
		b.WriteString(" on ")
		b.WriteString(e.Vault)
	}
	switch {
	case keyMissing:
		fmt.Fprintf(&b, ": key %s not found in vault https://%s", e.Key, e.Vault)
	case e.Kind != nil:
		b.WriteString(": ")
		b.WriteString(e.Kind.Error())
	}
	if e.Permission != "" {
		fmt.Fprintf(&b, ": the identity lacks key permission %s (access policy) or data action %s (RBAC)", e.Permission, e.RBACAction)
	}
	switch {
	case e.Status != 0:
		fmt.Fprintf(&b, ": HTTP %d", e.Status)
		if e.Code != "" {
			b.WriteString(" " + e.Code)
		}
		if e.InnerCode != "" {
			b.WriteString(" (" + e.InnerCode + ")")
		}
		if e.Message != "" {
			b.WriteString(": " + e.Message)
		}
	case e.Message != "":
		b.WriteString(": " + e.Message)
	case e.Err != nil:
		b.WriteString(": " + oneLine(e.Err.Error(), 300))
	}
	return b.String()
}

// Unwrap returns Kind and Err.
func (e *Error) Unwrap() []error {
	var out []error
	if e.Kind != nil {
		out = append(out, e.Kind)
	}
	if e.Err != nil {
		out = append(out, e.Err)
	}
	return out
}

// errCircuitOpen is returned, wrapped with provider.ErrUnavailable, while
// the circuit breaker fails calls fast (see circuitOpenError).
var errCircuitOpen = errors.New("circuit open")

// classify turns an error from azkeys or azidentity into an *Error. parent
// is the caller's context: when it ended, the caller gave up and the error
// says so instead of blaming the vault.
func (p *Provider) classify(parent context.Context, op operation, name, version string, err error) error {
	if err == nil {
		return nil
	}
	if perr := parent.Err(); perr != nil {
		return fmt.Errorf("azurekv: %s: %w", op.name, perr)
	}
	e := &Error{Op: op.name, Vault: p.vaultHost, Key: name, Version: version, HSM: p.hsm, Err: err}
	var re *azcore.ResponseError
	var afe *azidentity.AuthenticationFailedError
	var fe *fileError
	switch {
	case errors.As(err, &fe):
		// A credential file that no longer passes its checks.
		e.Op, e.Kind, e.Message = opToken.name, provider.ErrPermissionDenied, fe.Error()
	case errors.As(err, &afe):
		e.Op = opToken.name
		classifyToken(e, afe.RawResponse, afe.Error())
	case errors.As(err, &re):
		e.Status = re.StatusCode
		e.Code, e.InnerCode, e.Message = vaultErrorBody(re.RawResponse)
		if e.Code == "" {
			e.Code = re.ErrorCode
		}
		classifyStatus(e, op)
	case isNetworkError(err):
		e.Kind = provider.ErrUnavailable
		e.Message = networkMessage(err)
	case errors.Is(err, context.DeadlineExceeded):
		e.Kind = provider.ErrUnavailable
		e.Message = "no answer in time"
	case credentialErrorRE.MatchString(err.Error()) || strings.Contains(err.Error(), "AdditionallyAllowedTenants"):
		// azidentity's credentialUnavailableError is unexported: a
		// credential that cannot even try (no identity on this VM, no
		// token file) names itself at the start of its message.
		e.Op = opToken.name
		classifyToken(e, nil, err.Error())
	default:
		e.Message = oneLine(err.Error(), 300)
	}
	return e
}

// classifyStatus sets Kind and Permission from a vault answer's status.
func classifyStatus(e *Error, op operation) {
	switch s := e.Status; {
	case s == http.StatusUnauthorized:
		e.Kind = provider.ErrPermissionDenied
		if e.Message == "" {
			e.Message = "the vault refused the access token"
		}
	case s == http.StatusForbidden && isDisabled(e):
		e.Kind = provider.ErrKeyDisabled
	case s == http.StatusForbidden:
		e.Kind = provider.ErrPermissionDenied
		if e.InnerCode != "ForbiddenByFirewall" && e.InnerCode != "ForbiddenByConnection" && op.policy != "" {
			e.Permission = "keys/" + op.policy
			kind := "vaults"
			if e.HSM {
				kind = "managedHsm"
			}
			e.RBACAction = "Microsoft.KeyVault/" + kind + "/" + op.action
		}
	case s == http.StatusNotFound:
		e.Kind = provider.ErrKeyNotFound
	case s == http.StatusBadRequest && op == opUnwrap:
		e.Kind = provider.ErrInvalidCiphertext
	case s == http.StatusRequestTimeout || s == http.StatusTooManyRequests || s >= 500:
		e.Kind = provider.ErrUnavailable
	}
}

func isDisabled(e *Error) bool {
	m := strings.ToLower(e.Message)
	return e.InnerCode == "KeyDisabled" || strings.Contains(m, "disabled key") || strings.Contains(m, "key is disabled")
}

// vaultErrorBody reads Key Vault's {"error":{"code","message","innererror"}}.
func vaultErrorBody(resp *http.Response) (code, inner, message string) {
	if resp == nil {
		return "", "", ""
	}
	body, err := runtime.Payload(resp)
	if err != nil {
		return "", "", ""
	}
	var v struct {
		Error struct {
			Code       string `json:"code"`
			Message    string `json:"message"`
			InnerError *struct {
				Code string `json:"code"`
			} `json:"innererror"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &v) != nil {
		return "", "", oneLine(string(body), 200)
	}
	if v.Error.InnerError != nil {
		inner = v.Error.InnerError.Code
	}
	return v.Error.Code, inner, oneLine(v.Error.Message, 400)
}

var aadstsRE = regexp.MustCompile(`AADSTS(\d+)`)

// classifyToken classifies a failed token request from its HTTP answer.
func classifyToken(e *Error, resp *http.Response, text string) {
	if resp != nil {
		e.Status = resp.StatusCode
		if body, err := runtime.Payload(resp); err == nil {
			var v struct {
				Error       string `json:"error"`
				Description string `json:"error_description"`
			}
			if json.Unmarshal(body, &v) == nil {
				e.Code = v.Error
				e.Message = oneLine(firstLine(v.Description), 300)
			}
		}
	}
	if m := aadstsRE.FindStringSubmatch(e.Message + " " + text); m != nil {
		e.InnerCode = "AADSTS" + m[1]
	}
	switch s := e.Status; {
	case s == 0:
		// No answer: MSAL and azidentity wrap transport errors in text.
		if msg, ok := transportText(text); ok {
			e.Kind = provider.ErrUnavailable
			if e.Message == "" {
				e.Message = msg
			}
		} else {
			e.Kind = provider.ErrPermissionDenied
		}
		if e.Message == "" {
			e.Message = oneLine(text, 300)
		}
	case s == http.StatusRequestTimeout || s == http.StatusTooManyRequests || s >= 500:
		e.Kind = provider.ErrUnavailable
	default:
		e.Kind = provider.ErrPermissionDenied
	}
}

var credentialErrorRE = regexp.MustCompile(`\b[A-Za-z]+Credential: `)

// transportTexts are what a transport failure says once flattened into an
// error's text, as MSAL does, and what to tell a person instead; "" keeps
// the text, which names the host.
var transportTexts = []struct{ text, message string }{
	{"use of closed network connection", "the connection closed before an answer"},
	{"connection reset", "the connection was reset before an answer"},
	{"broken pipe", "the connection closed before an answer"},
	{"EOF", "the connection closed before an answer"},
	{"connection refused", ""},
	{"no such host", ""},
	{"network is unreachable", ""},
	{"no route to host", ""},
	{"TLS handshake", ""},
	{"timeout", ""},
	{"dial tcp", ""},
}

// transportText reports whether text describes a transport failure, with
// a human message for it ("": the text itself).
func transportText(text string) (string, bool) {
	for _, t := range transportTexts {
		if strings.Contains(text, t.text) {
			return t.message, true
		}
	}
	return "", false
}

func isNetworkError(err error) bool {
	var ne net.Error
	var dns *net.DNSError
	var op *net.OpError
	var cert *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	return errors.As(err, &ne) || errors.As(err, &dns) || errors.As(err, &op) || errors.As(err, &cert) ||
		errors.As(err, &ua) || errors.As(err, &hn) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.EPIPE)
}

func networkMessage(err error) string {
	var dns *net.DNSError
	var cert *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	switch {
	case errors.As(err, &dns):
		return "cannot resolve " + dns.Name + ": " + dns.Err
	case errors.As(err, &cert), errors.As(err, &ua), errors.As(err, &hn):
		return "TLS certificate not trusted: " + oneLine(err.Error(), 200)
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, net.ErrClosed), errors.Is(err, syscall.EPIPE):
		// net.ErrClosed: the transport closed the connection while a
		// request was on it (its peer or a proxy dropped it).
		return "connection closed without an answer"
	}
	if msg, ok := transportText(err.Error()); ok && msg != "" {
		return msg
	}
	return oneLine(err.Error(), 200)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\r\n")
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// oneLine joins lines and shortens s to at most n bytes.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(strings.ReplaceAll(strings.ReplaceAll(s, "\r", " "), "\n", " ")), " ")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

// Remedy returns a concrete fix, in one or two sentences, for an error
// returned by this package, or "" when it has none. kms-plugin doctor prints
// it under each failed check.
func Remedy(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, errCircuitOpen):
		return "the vault failed several calls in a row, so calls are paused for a while; fix the cause shown in the earlier errors (network path, vault outage, throttling)"
	case strings.Contains(err.Error(), "doesn't match the requested domain"):
		return "the vault's authentication challenge names another domain than vaultURL: use the vault's own URL (https://NAME.vault.azure.net), or set azure.disableChallengeResourceVerification for a custom domain you trust"
	case strings.Contains(err.Error(), "AdditionallyAllowedTenants"):
		return "the vault belongs to another tenant than the credential: set azure.credential.tenantID to the vault's tenant (kms-plugin doctor prints it), or use a vault of the credential's tenant"
	}
	var e *Error
	if !errors.As(err, &e) {
		return ""
	}
	vault := e.Vault
	name, _, _ := strings.Cut(vault, ".")
	switch {
	case e.Op == opToken.name:
		return tokenRemedy(e)
	case e.Status == http.StatusUnauthorized:
		return "the vault rejected the access token: the credential's tenant is probably not the vault's tenant (the vault names its tenant in its challenge); set azure.credential.tenantID to the vault's tenant, or use an identity of that tenant"
	case e.InnerCode == "ForbiddenByFirewall" || e.InnerCode == "ForbiddenByConnection":
		return "the vault's firewall refuses this node's address: add the node's subnet or public IP to the vault's network rules, or reach it through a private endpoint"
	case errors.Is(e.Kind, provider.ErrPermissionDenied) && e.Permission != "":
		if e.HSM {
			return fmt.Sprintf("grant the identity the Managed HSM local role \"Managed HSM Crypto Service Encryption User\" (or \"Managed HSM Crypto User\") on the key: az keyvault role assignment create --hsm-name %s --role \"Managed HSM Crypto User\" --assignee OBJECT_ID --scope /keys/KEY (missing: %s)", name, e.RBACAction)
		}
		return fmt.Sprintf("grant the identity %s: with Azure RBAC, the role \"Key Vault Crypto Service Encryption User\" (read, wrap, unwrap) or \"Key Vault Crypto User\" on the key or vault (az role assignment create --role \"Key Vault Crypto Service Encryption User\" --assignee OBJECT_ID --scope VAULT_RESOURCE_ID/keys/KEY); with access policies, key permissions get, wrapKey, unwrapKey (az keyvault set-policy --name %s --object-id OBJECT_ID --key-permissions get wrapKey unwrapKey)",
			e.Permission, name)
	case errors.Is(e.Kind, provider.ErrKeyDisabled):
		return fmt.Sprintf("the key version is disabled or expired: enable it (az keyvault key set-attributes --vault-name %s --name KEY --version VERSION --enabled true) or create a new version (az keyvault key rotate --vault-name %s --name KEY); versions that still wrap stored data must stay enabled", name, name)
	case errors.Is(e.Kind, provider.ErrKeyNotFound) && e.Op != opUnwrap.name:
		return fmt.Sprintf("no such key in %s: check azure.keyName and azure.vaultURL (az keyvault key list --vault-name %s); a Managed HSM URL is https://NAME.managedhsm.azure.net", vault, name)
	case errors.Is(e.Kind, provider.ErrKeyNotFound):
		return "the key version that wrapped this data no longer exists (or belongs to another vault): recover the deleted key (az keyvault key recover) or point the plugin at the vault that holds it"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return networkRemedy(e)
	}
	return ""
}

func networkRemedy(e *Error) string {
	m := e.Message
	switch {
	case strings.HasPrefix(m, "cannot resolve"):
		return fmt.Sprintf("DNS cannot resolve %s: check the spelling of azure.vaultURL; with a private endpoint, the privatelink.vaultcore.azure.net (or privatelink.managedhsm.azure.net) zone must be linked to the node's network", e.Vault)
	case strings.HasPrefix(m, "TLS certificate"):
		return "the vault's TLS certificate is not trusted: a TLS-inspecting proxy needs its CA in the node's trust store (or SSL_CERT_FILE); for Azure Stack Hub add the stamp's root CA"
	case e.Status == http.StatusTooManyRequests:
		return "the vault is throttling this identity: the plugin needs about one call a minute per node, so look for other clients of the same vault, or raise the poll interval"
	case e.Status >= 500:
		return "the vault answered with a server error: check Azure Service Health for Key Vault in the vault's region; the plugin keeps serving from its cached keys meanwhile"
	}
	host, port := e.Vault, "443"
	if h, p, err := net.SplitHostPort(e.Vault); err == nil {
		host, port = h, p
	}
	return fmt.Sprintf("cannot reach %s over HTTPS (port %s): check the network path (NSG, firewall, route), and HTTPS_PROXY / NO_PROXY if a proxy is required", host, port)
}

func tokenRemedy(e *Error) string {
	code, _ := strconv.Atoi(strings.TrimPrefix(e.InnerCode, "AADSTS"))
	var fe *fileError
	switch {
	case errors.As(e.Err, &fe):
		return fe.fix
	case code == 7000215:
		return "the client secret is wrong or expired: create a new secret for the app registration and write its value (not its ID) to the secret file"
	case code == 700016:
		return "the client ID is not an application of this tenant: check azure.credential.clientID and tenantID (and the cloud)"
	case code == 90002:
		return "the tenant does not exist in this cloud: check azure.credential.tenantID and azure.cloud / authorityHost"
	case code == 700024:
		return "Entra ID judged the client assertion's time range invalid: this node's clock is off; synchronize it (chronyc tracking, timedatectl)"
	case code == 70021:
		return "no federated identity credential matches the token: add one to the app or managed identity with the token's issuer and subject (system:serviceaccount:NAMESPACE:NAME) and audience api://AzureADTokenExchange"
	case code == 700027:
		return "the certificate is not registered on the app registration, or the key does not match it: upload the certificate's public part to the app registration"
	case strings.Contains(e.Message, "Identity not found"):
		return "the managed identity is not assigned to this VM, or its client/resource ID is wrong: assign it (az vm identity assign --identities RESOURCE_ID) and check azure.credential.clientID / resourceID"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return "the identity endpoint did not answer: for managed identity, IMDS (169.254.169.254) must be reachable and bypass any proxy (NO_PROXY=169.254.169.254); otherwise check the path to the authority host"
	}
	return "the identity provider refused the credential: check the credential settings shown above"
}
