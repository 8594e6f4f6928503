package kvtest

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"time"
)

// Key types.
const (
	KeyTypeRSA    = "RSA"
	KeyTypeRSAHSM = "RSA-HSM"
	KeyTypeOctHSM = "oct-HSM"
)

// key is one named key and its versions, oldest first.
type key struct {
	name     string
	versions []*version
}

// version is one key version. Its material never changes; its attributes
// are guarded by Server.mu.
type version struct {
	id      string
	kty     string
	rsa     *rsa.PrivateKey
	aes     []byte
	ops     []string
	enabled bool
	created int64
	updated int64
	nbf     *int64
	exp     *int64
}

var keyNameRE = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)

// CreateKey creates a key (or a new version of it) of type kty
// (KeyTypeRSA, KeyTypeRSAHSM, KeyTypeOctHSM) and size in bits (0: 2048 for
// RSA, 256 for AES), and returns its versioned key ID.
func (s *Server) CreateKey(name, kty string, bits int) (string, error) {
	v, err := s.generate(kty, bits)
	if err != nil {
		return "", err
	}
	return s.addVersion(name, v)
}

// ImportKey adds a version holding material (*rsa.PrivateKey, or []byte
// for an AES key) to key name and returns its versioned key ID.
func (s *Server) ImportKey(name string, material any) (string, error) {
	v := &version{}
	switch m := material.(type) {
	case *rsa.PrivateKey:
		v.kty, v.rsa = KeyTypeRSA, m
		if s.opts.ManagedHSM {
			v.kty = KeyTypeRSAHSM
		}
	case []byte:
		if len(m) != 16 && len(m) != 24 && len(m) != 32 {
			return "", fmt.Errorf("kvtest: AES key of %d bytes", len(m))
		}
		v.kty, v.aes = KeyTypeOctHSM, append([]byte(nil), m...)
	default:
		return "", fmt.Errorf("kvtest: cannot import %T", material)
	}
	v.ops = defaultOps(v.kty)
	return s.addVersion(name, v)
}

// NewVersion creates a new version of key name of the same type and size as
// its newest one, as Key Vault's rotate does, and returns its key ID.
func (s *Server) NewVersion(name string) (string, error) {
	s.mu.Lock()
	k := s.keys[strings.ToLower(name)]
	var last *version
	if k != nil {
		last = k.versions[len(k.versions)-1]
	}
	s.mu.Unlock()
	if last == nil {
		return "", fmt.Errorf("kvtest: no key %q", name)
	}
	bits := len(last.aes) * 8
	if last.rsa != nil {
		bits = last.rsa.N.BitLen()
	}
	return s.CreateKey(name, last.kty, bits)
}

// SetEnabled enables or disables one version of key name ("" is the newest).
func (s *Server) SetEnabled(name, versionID string, enabled bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, _, status := s.findLocked(name, versionID)
	if status != 0 {
		return fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	v.enabled = enabled
	v.updated = time.Now().Unix()
	return nil
}

// KeyID returns the versioned key ID of a version of key name ("" is the
// newest).
func (s *Server) KeyID(name, versionID string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, k, status := s.findLocked(name, versionID)
	if status != 0 {
		return "", fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	return s.kid(k, v), nil
}

// VersionIDs lists the version IDs of key name, oldest first.
func (s *Server) VersionIDs(name string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		return nil
	}
	out := make([]string, len(k.versions))
	for i, v := range k.versions {
		out[i] = v.id
	}
	return out
}

// DeleteKey deletes key name and all its versions, as Key Vault's delete
// (then purge) does: every request for it answers 404 KeyNotFound.
func (s *Server) DeleteKey(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys[strings.ToLower(name)] == nil {
		return fmt.Errorf("kvtest: no key %q", name)
	}
	delete(s.keys, strings.ToLower(name))
	return nil
}

// SetValidity sets one version's not-before and expiry times ("" version:
// the newest); a nil time clears it.
func (s *Server) SetValidity(name, versionID string, notBefore, expires *time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, _, status := s.findLocked(name, versionID)
	if status != 0 {
		return fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	unix := func(t *time.Time) *int64 {
		if t == nil {
			return nil
		}
		u := t.Unix()
		return &u
	}
	v.nbf, v.exp = unix(notBefore), unix(expires)
	v.updated = time.Now().Unix()
	return nil
}

func defaultOps(kty string) []string {
	if kty == KeyTypeOctHSM {
		return []string{"encrypt", "decrypt", "wrapKey", "unwrapKey"}
	}
	return []string{"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
}

func (s *Server) generate(kty string, bits int) (*version, error) {
	v := &version{kty: kty, ops: defaultOps(kty)}
	switch kty {
	case KeyTypeRSA, KeyTypeRSAHSM:
		if bits == 0 {
			bits = 2048
		}
		if bits != 2048 && bits != 3072 && bits != 4096 {
			return nil, fmt.Errorf("kvtest: RSA key size %d", bits)
		}
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			return nil, err
		}
		v.rsa = k
	case KeyTypeOctHSM:
		if !s.opts.ManagedHSM {
			return nil, errors.New("kvtest: oct-HSM keys need a Managed HSM server")
		}
		if bits == 0 {
			bits = 256
		}
		if bits != 128 && bits != 192 && bits != 256 {
			return nil, fmt.Errorf("kvtest: AES key size %d", bits)
		}
		v.aes = make([]byte, bits/8)
		if _, err := rand.Read(v.aes); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("kvtest: unsupported key type %q", kty)
	}
	return v, nil
}

func (s *Server) addVersion(name string, v *version) (string, error) {
	if !keyNameRE.MatchString(name) {
		return "", fmt.Errorf("kvtest: invalid key name %q", name)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	v.id = hex.EncodeToString(id)
	v.enabled = true
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		k = &key{name: name}
		s.keys[strings.ToLower(name)] = k
	}
	// Creation times are whole seconds, as in Key Vault; keep them strictly
	// increasing so that "newest" is well defined.
	v.created = time.Now().Unix()
	if n := len(k.versions); n > 0 && v.created <= k.versions[n-1].created {
		v.created = k.versions[n-1].created + 1
	}
	v.updated = v.created
	k.versions = append(k.versions, v)
	return s.kid(k, v), nil
}

func (s *Server) kid(k *key, v *version) string {
	return "https://" + s.opts.VaultHost + "/keys/" + k.name + "/" + v.id
}

// findLocked returns the version versionID ("" for the newest) of key name,
// or an HTTP status.
func (s *Server) findLocked(name, versionID string) (*version, *key, int) {
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		return nil, nil, http.StatusNotFound
	}
	if versionID == "" {
		return k.versions[len(k.versions)-1], k, 0
	}
	for _, v := range k.versions {
		if strings.EqualFold(v.id, versionID) {
			return v, k, 0
		}
	}
	return nil, k, http.StatusNotFound
}
