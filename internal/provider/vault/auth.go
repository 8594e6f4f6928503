package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Method is one way to log in to Vault. Implementations read their secrets
// (token, secret ID, JWT) from files at each login, so a rotated file is
// used without a restart, and keep nothing but the resulting token, in
// memory.
type Method interface {
	// Name is token, approle, cert or jwt.
	Name() string
	// Login returns the token's secret (Auth set). c has the configured
	// address, TLS and namespace and no token.
	Login(ctx context.Context, c *api.Client) (*api.Secret, error)
}

// TokenFile is token auth: a token read from a file (or, with no file,
// from VAULT_TOKEN as the official client does). Its TTL and renewability
// come from a lookup-self.
type TokenFile struct {
	// Path is the token file; empty reads VAULT_TOKEN.
	Path string
}

// Name implements Method.
func (TokenFile) Name() string { return "token" }

// Login implements Method: it reads the token and looks it up.
func (t TokenFile) Login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	var token string
	if t.Path == "" {
		token = strings.TrimSpace(os.Getenv(api.EnvVaultToken))
		if token == "" {
			return nil, &Error{Op: opLogin, Kind: provider.ErrPermissionDenied, Message: "no token file configured and VAULT_TOKEN is empty"}
		}
	} else {
		var err error
		if token, err = readSecretFile(t.Path, "token"); err != nil {
			return nil, &Error{Op: opLogin, Kind: provider.ErrPermissionDenied, Err: err, Message: err.Error()}
		}
	}
	c.SetToken(token)
	s, err := c.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		return nil, classify(ctx, opLookup, "auth/token/lookup-self", "", err)
	}
	if s == nil || s.Data == nil {
		return nil, &Error{Op: opLookup, Path: "auth/token/lookup-self", Kind: provider.ErrUnavailable, Message: "empty answer"}
	}
	ttl, _ := s.TokenTTL()
	renewable, _ := s.TokenIsRenewable()
	return &api.Secret{Auth: &api.SecretAuth{
		ClientToken:   token,
		Renewable:     renewable,
		LeaseDuration: int(ttl / time.Second),
	}}, nil
}

// AppRole is AppRole auth: a role ID and a secret ID, each from a file.
type AppRole struct {
	Mount, RoleIDFile, SecretIDFile string
}

// Name implements Method.
func (AppRole) Name() string { return "approle" }

// Login implements Method.
func (a AppRole) Login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	roleID, err := readSecretFile(a.RoleIDFile, "AppRole role ID")
	if err != nil {
		return nil, &Error{Op: opLogin, Kind: provider.ErrPermissionDenied, Err: err, Message: err.Error()}
	}
	secretID, err := readSecretFile(a.SecretIDFile, "AppRole secret ID")
	if err != nil {
		return nil, &Error{Op: opLogin, Kind: provider.ErrPermissionDenied, Err: err, Message: err.Error()}
	}
	return login(ctx, c, "auth/"+a.Mount+"/login", map[string]any{"role_id": roleID, "secret_id": secretID})
}

// Cert is TLS certificate auth: the client certificate of the TLS
// settings, and optionally the name of the cert role to use.
type Cert struct {
	Mount, Role string
}

// Name implements Method.
func (Cert) Name() string { return "cert" }

// Login implements Method.
func (a Cert) Login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	data := map[string]any{}
	if a.Role != "" {
		data["name"] = a.Role
	}
	return login(ctx, c, "auth/"+a.Mount+"/login", data)
}

// JWT is JWT auth: a token from a file (a projected service account token
// from another cluster, a workload identity token) and a role.
type JWT struct {
	Mount, Role, JWTFile string
}

// Name implements Method.
func (JWT) Name() string { return "jwt" }

// Login implements Method.
func (a JWT) Login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	jwt, err := readSecretFile(a.JWTFile, "JWT")
	if err != nil {
		return nil, &Error{Op: opLogin, Kind: provider.ErrPermissionDenied, Err: err, Message: err.Error()}
	}
	return login(ctx, c, "auth/"+a.Mount+"/login", map[string]any{"role": a.Role, "jwt": jwt})
}

func login(ctx context.Context, c *api.Client, path string, data map[string]any) (*api.Secret, error) {
	s, err := c.Logical().WriteWithContext(ctx, path, data)
	if err != nil {
		e := classify(ctx, opLogin, path, "", err)
		var ve *Error
		if errors.As(e, &ve) && ve.Status == 400 {
			// A refused login (wrong secret ID, unknown role) is a 400.
			ve.Kind = provider.ErrPermissionDenied
		}
		return nil, e
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return nil, &Error{Op: opLogin, Path: path, Kind: provider.ErrUnavailable, Message: "the answer holds no token"}
	}
	return s, nil
}

// Token lifecycle defaults.
const (
	minLoginWait = time.Second
	maxLoginWait = 5 * time.Second
)

// tokenState is the token in use.
type tokenState struct {
	token     string
	renewable bool
	ttl       time.Duration
	expiry    time.Time // zero: never expires
	obtained  time.Time
}

// session keeps a token: it logs in on first use, renews the token with
// the Vault client's LifetimeWatcher (at about two thirds of its TTL, its
// schedule), and logs in again when renewal fails or the token nears its
// maximum TTL, or when Vault refuses the token. Failed logins back off
// (1 s doubling to 5 s) so a refusing Vault is not asked in a hot loop.
type session struct {
	client *api.Client // the provider's client; its token is set here
	method Method
	now    func() time.Time

	mu        sync.Mutex // serializes logins and the fields below
	gen       uint64     // login generation
	stopGen   chan struct{}
	loginErr  error // the last login's failure, nil after a success
	loginWait time.Duration
	nextLogin time.Time // no login before this after a failure
	// trouble is set while renewal failed and so did the login after it;
	// atomic so that metrics and polls never wait for a login in flight.
	trouble atomic.Pointer[error]

	cur    atomic.Pointer[tokenState]
	kick   chan struct{}
	closed chan struct{}
	once   sync.Once
	wg     sync.WaitGroup

	logins, loginFailures, renewals, renewFailures atomic.Uint64
	lastRenewal                                    atomic.Int64 // unix nanoseconds
}

func newSession(client *api.Client, m Method, now func() time.Time) *session {
	return &session{client: client, method: m, now: now, kick: make(chan struct{}, 1), closed: make(chan struct{})}
}

// ensure makes sure a token that has not expired is in use, logging in if
// needed (subject to the login backoff).
func (s *session) ensure(ctx context.Context) error {
	if st := s.cur.Load(); st != nil && (st.expiry.IsZero() || s.now().Before(st.expiry)) {
		return nil
	}
	return s.login(ctx, s.gen0())
}

func (s *session) gen0() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// refused is called when Vault refused the token of generation gen: it
// logs in again unless another login already replaced that token.
func (s *session) refused(ctx context.Context, gen uint64) error {
	return s.login(ctx, gen)
}

// login logs in unless a login after generation seen already succeeded.
func (s *session) login(ctx context.Context, seen uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return errors.New("vault: provider closed")
	default:
	}
	if s.gen != seen && s.loginErr == nil && s.cur.Load() != nil {
		return nil // someone else logged in meanwhile
	}
	now := s.now()
	if s.loginErr != nil && now.Before(s.nextLogin) {
		return fmt.Errorf("%w (login retried in %s)", s.loginErr, s.nextLogin.Sub(now).Round(100*time.Millisecond))
	}
	lc, err := s.client.Clone()
	if err != nil {
		return fmt.Errorf("vault: login: %w", err)
	}
	lc.ClearToken()
	secret, err := s.method.Login(ctx, lc)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("vault: login: %w", ctx.Err())
		}
		s.loginFailures.Add(1)
		s.loginWait = min(max(2*s.loginWait, minLoginWait), maxLoginWait)
		s.nextLogin = now.Add(s.loginWait)
		s.loginErr = fmt.Errorf("vault: %s login failed: %w", s.method.Name(), err)
		if s.cur.Load() != nil {
			// A token was in use: its renewal stopped (refused, failed, or
			// at its max TTL) and it cannot be replaced.
			s.setTrouble(fmt.Errorf("vault: token renewal stopped and the login to replace the token failed: %w", err))
		}
		return s.loginErr
	}
	s.logins.Add(1)
	st := stateOf(secret, s.now())
	prev := s.cur.Load()
	s.client.SetToken(st.token)
	s.cur.Store(st)
	s.gen++
	s.loginErr, s.loginWait = nil, 0
	s.setTrouble(nil)
	if prev != nil && prev.token == st.token && !st.renewable && st.ttl > 0 {
		// A token file still holding the same non-renewable token: the
		// login made no progress, and the token runs out.
		s.setTrouble(errors.New("vault: token renewal impossible: the token is not renewable and its file holds no new token"))
	}
	if s.stopGen != nil {
		close(s.stopGen)
	}
	s.stopGen = make(chan struct{})
	s.wg.Add(1)
	go s.supervise(s.gen, s.stopGen, secret)
	return nil
}

func stateOf(secret *api.Secret, now time.Time) *tokenState {
	ttl := time.Duration(secret.Auth.LeaseDuration) * time.Second
	st := &tokenState{token: secret.Auth.ClientToken, renewable: secret.Auth.Renewable, ttl: ttl, obtained: now}
	if ttl > 0 {
		st.expiry = now.Add(ttl)
	}
	return st
}

// supervise renews the token of generation gen until it stops being
// renewable, then logs in again, retrying with backoff, until stop closes.
func (s *session) supervise(gen uint64, stop chan struct{}, secret *api.Secret) {
	defer s.wg.Done()
	st := s.cur.Load()
	if st == nil || st.ttl == 0 {
		return // a token that never expires (root, or no TTL) needs no care
	}
	renewErr := s.watch(stop, secret)
	select {
	case <-stop:
		return
	default:
	}
	if renewErr != nil {
		s.renewFailures.Add(1)
	}
	// The token cannot be kept: log in again, retrying with backoff.
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := s.login(ctx, gen)
		cancel()
		if err == nil {
			return
		}
		s.mu.Lock()
		if renewErr != nil {
			s.setTrouble(fmt.Errorf("vault: token renewal failed (%v) and so did the login after it: %w", renewErr, err))
		}
		wait := max(s.nextLogin.Sub(s.now()), minLoginWait/10)
		s.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-stop:
			t.Stop()
			return
		case <-s.closed:
			t.Stop()
			return
		case <-s.kick:
			t.Stop()
		case <-t.C:
		}
	}
}

// watch runs a LifetimeWatcher on the token until it ends (returning its
// error: nil when the token reached its maximum TTL or cannot be renewed
// on purpose) or stop closes. A non-renewable token is kept until two
// thirds of its TTL.
func (s *session) watch(stop chan struct{}, secret *api.Secret) error {
	st := s.cur.Load()
	if !st.renewable {
		t := time.NewTimer(max(st.expiry.Sub(s.now())*2/3, 0))
		defer t.Stop()
		select {
		case <-stop:
		case <-s.closed:
		case <-t.C:
		}
		return nil
	}
	w, err := s.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{
		Secret: secret,
		// Errors end the watcher, so a renewal that stops working is seen
		// at once, not when the token expires.
		RenewBehavior: api.RenewBehaviorErrorOnErrors,
	})
	if err != nil {
		return err
	}
	go w.Start()
	defer w.Stop()
	// The watcher treats a renewal refused with "permission denied" (a
	// policy without auth/token/renew-self, a revoked token) as a token that
	// cannot be renewed and only ends near expiry. A renewal missing at
	// three quarters of the TTL counts as failed, so the login after it
	// happens, and its failure shows, with a quarter of the TTL left.
	deadline := time.NewTimer(st.ttl * 3 / 4)
	defer deadline.Stop()
	for {
		select {
		case <-stop:
			return nil
		case <-s.closed:
			return nil
		case err := <-w.DoneCh():
			return err
		case <-deadline.C:
			return errors.New("no successful renewal by three quarters of the token's TTL")
		case r := <-w.RenewCh():
			if r == nil || r.Secret == nil || r.Secret.Auth == nil {
				continue
			}
			s.renewals.Add(1)
			s.lastRenewal.Store(s.now().UnixNano())
			next := *s.cur.Load()
			next.ttl = time.Duration(r.Secret.Auth.LeaseDuration) * time.Second
			next.expiry = s.now().Add(next.ttl)
			s.cur.Store(&next)
			deadline.Reset(next.ttl * 3 / 4)
			s.setTrouble(nil)
		}
	}
}

// problem returns the token trouble to report (renewal and the login after
// it failed), or nil.
func (s *session) problem() error {
	p := s.trouble.Load()
	if p == nil {
		return nil
	}
	if st := s.cur.Load(); st != nil && !st.expiry.IsZero() {
		return fmt.Errorf("%w; the current token expires at %s", *p, st.expiry.UTC().Format(time.RFC3339))
	}
	return *p
}

func (s *session) setTrouble(err error) {
	if err == nil {
		s.trouble.Store(nil)
		return
	}
	s.trouble.Store(&err)
}

// retryNow asks a supervisor waiting to log in again to try at once (Vault
// answered a call, so it is back).
func (s *session) retryNow() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// generation returns the current login generation.
func (s *session) generation() uint64 { return s.gen0() }

// close stops renewal. The token is left to expire: revoking it would
// cost a call and gain nothing for a token that lives in memory only.
func (s *session) close() {
	s.once.Do(func() {
		close(s.closed)
		s.mu.Lock()
		if s.stopGen != nil {
			close(s.stopGen)
			s.stopGen = nil
		}
		s.mu.Unlock()
	})
	s.wg.Wait()
}

// TokenInfo describes the token in use, for doctor and metrics. It holds
// no secret.
type TokenInfo struct {
	Method    string
	TTL       time.Duration
	Expiry    time.Time // zero: never expires, or no token yet
	Renewable bool
	Logins    uint64
	Renewals  uint64
	// RenewFailures counts renewals that failed (each followed by a login).
	RenewFailures uint64
	// Trouble is set while renewal and the login after it fail.
	Trouble error
}

func (s *session) info() TokenInfo {
	ti := TokenInfo{Method: s.method.Name(), Logins: s.logins.Load(), Renewals: s.renewals.Load(), RenewFailures: s.renewFailures.Load(), Trouble: s.problem()}
	if st := s.cur.Load(); st != nil {
		ti.TTL, ti.Expiry, ti.Renewable = st.ttl, st.expiry, st.renewable
	}
	return ti
}

// jsonInt reads a json.Number, float or string field as an int.
func jsonInt(v any) (int64, bool) {
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		return i, err == nil
	case float64:
		return int64(n), true
	case int:
		return int64(n), true
	case int64:
		return n, true
	}
	return 0, false
}
