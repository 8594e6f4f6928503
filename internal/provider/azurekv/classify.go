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
	"strings"
	"syscall"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

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
