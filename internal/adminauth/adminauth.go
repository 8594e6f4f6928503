// Package adminauth decides who may talk to the plugin's admin HTTP
// endpoint and proves to its clients that they talk to the plugin: it
// issues the certificates (signed by the cluster CA), builds the TLS
// configurations of the server and of its clients (kms-plugin rotate,
// status, verify), and checks the credential a request presents, a client
// certificate or a bearer token kept in a file. Certificates, keys and
// tokens are re-read when their files change, so renewing them needs no
// restart. It never logs, returns or labels a token or a private key.
package adminauth

import "errors"

// DefaultClientName is the only client certificate CommonName the server
// admits when ServerConfig.ClientNames is empty.
const DefaultClientName = "kms-plugin-admin"

// Errors returned by Authenticator.Authenticate and TokenFile.Check. Each
// is wrapped with what was wrong, never with the credential itself; an
// HTTP server answers the first two with 401 and the third with 403.
var (
	// ErrNoCredential means the request carried neither a verified client
	// certificate nor an Authorization header.
	ErrNoCredential = errors.New("adminauth: no credential")
	// ErrBadCredential means the request carried a credential that is not
	// accepted: a malformed Authorization header or a wrong token.
	ErrBadCredential = errors.New("adminauth: credential not accepted")
	// ErrForbidden means the request proved an identity (a client
	// certificate verified against the client CA) that is not allowed.
	ErrForbidden = errors.New("adminauth: identity not allowed")
)
