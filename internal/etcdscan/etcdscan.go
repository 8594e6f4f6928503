// Package etcdscan reads what kube-apiserver stored in etcd and tells how
// each value is encrypted: which provider, and for KMS v2 which key_id (from
// the EncryptedObject's clear fields). It finds the objects a kms provider
// still protects (uninstall) and counts objects per resource, provider and
// key_id (rotation's verify). It pages through key ranges at a single
// revision, holding one page of values in memory at a time, and never
// writes.
package etcdscan

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultPageSize is how many keys a Range call returns at most.
const DefaultPageSize = 100

// KeyValue is one stored object.
type KeyValue struct {
	Key   []byte
	Value []byte
}

// Ranger reads one page of the key range [start, end) at revision rev (0:
// the latest), at most limit keys, and tells whether more follow and at
// which revision it read.
type Ranger interface {
	Range(ctx context.Context, start, end string, rev, limit int64) (kvs []KeyValue, more bool, revision int64, err error)
}

// Scanner scans key prefixes through a Ranger.
type Scanner struct {
	r        Ranger
	pageSize int64
}

// New returns a Scanner reading pages of pageSize keys (0 means
// DefaultPageSize).
func New(r Ranger, pageSize int64) *Scanner {
	if pageSize <= 0 {
		pageSize = DefaultPageSize
	}
	return &Scanner{r: r, pageSize: pageSize}
}

// FindPrefixed returns how many keys under keyPrefixes hold a value that
// starts with valuePrefix, and the first limit of them. Every prefix is
// read at the revision of the first page, so the answer is one consistent
// snapshot.
func (s *Scanner) FindPrefixed(ctx context.Context, keyPrefixes []string, valuePrefix []byte, limit int) ([]string, int, error) {
	var (
		keys  []string
		total int
	)
	_, err := s.Scan(ctx, keyPrefixes, 0, func(kv KeyValue) error {
		if strings.HasPrefix(string(kv.Value), string(valuePrefix)) {
			total++
			if len(keys) < limit {
				keys = append(keys, string(kv.Key))
			}
		}
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return keys, total, nil
}

// Scan calls fn with every key-value under keyPrefixes, prefix by prefix in
// key order, all read at revision rev (0: the revision of the first page).
// It returns the revision it read at. An error from fn stops the scan and is
// returned as is.
func (s *Scanner) Scan(ctx context.Context, keyPrefixes []string, rev int64, fn func(KeyValue) error) (int64, error) {
	for _, prefix := range keyPrefixes {
		if prefix == "" {
			return rev, errors.New("etcdscan: empty key prefix")
		}
		if err := s.scanRange(ctx, prefix, clientv3.GetPrefixRangeEnd(prefix), &rev, fn); err != nil {
			return rev, err
		}
	}
	return rev, nil
}

// ScanRange is Scan over the key range [start, end).
func (s *Scanner) ScanRange(ctx context.Context, start, end string, rev int64, fn func(KeyValue) error) (int64, error) {
	err := s.scanRange(ctx, start, end, &rev, fn)
	return rev, err
}

func (s *Scanner) scanRange(ctx context.Context, start, end string, rev *int64, fn func(KeyValue) error) error {
	from := start
	for {
		kvs, more, r, err := s.r.Range(ctx, start, end, *rev, s.pageSize)
		if err != nil {
			return fmt.Errorf("etcdscan: range %s: %w", from, err)
		}
		if *rev == 0 {
			*rev = r
		}
		for _, kv := range kvs {
			if err := fn(kv); err != nil {
				return err
			}
		}
		if !more || len(kvs) == 0 {
			return nil
		}
		start = string(kvs[len(kvs)-1].Key) + "\x00"
	}
}

// Get returns the value stored at key, at the latest revision, and whether
// it exists.
func (s *Scanner) Get(ctx context.Context, key string) ([]byte, bool, error) {
	kvs, _, _, err := s.r.Range(ctx, key, key+"\x00", 0, 1)
	if err != nil {
		return nil, false, fmt.Errorf("etcdscan: get %s: %w", key, err)
	}
	if len(kvs) == 0 || string(kvs[0].Key) != key {
		return nil, false, nil
	}
	return kvs[0].Value, true, nil
}

// KeyPrefixes returns the etcd key prefixes under which kube-apiserver
// stores resource ("secrets", "deployments.apps", "widgets.example.com"):
// /registry/RESOURCE/ for the core group, and both /registry/RESOURCE/ and
// /registry/GROUP/RESOURCE/ for other groups (built-in and custom resources
// differ). etcdPrefix is kube-apiserver's --etcd-prefix ("/registry").
func KeyPrefixes(etcdPrefix, resource string) []string {
	base := path.Clean("/"+etcdPrefix) + "/"
	name, group, _ := strings.Cut(resource, ".")
	out := []string{base + name + "/"}
	if group != "" {
		out = append(out, base+group+"/"+name+"/")
	}
	return out
}

// KeyCount is how many objects of a resource are stored one way.
type KeyCount struct {
	Kind     Kind   `json:"kind"`
	Provider string `json:"provider"`
	KeyID    string `json:"keyID"`
	Count    int    `json:"count"`
}

// ResourceCount is how a resource's objects are stored.
type ResourceCount struct {
	Resource string `json:"resource"`
	// Total counts every object; Unencrypted those no provider encrypted.
	Total       int `json:"total"`
	Unencrypted int `json:"unencrypted"`
	// Malformed counts KMS v2 values whose EncryptedObject did not parse;
	// they are also in ByKey with an empty KeyID.
	Malformed int `json:"malformed,omitempty"`
	// ByKey counts encrypted objects per kind, provider and key ID, most
	// numerous first.
	ByKey []KeyCount `json:"byKey"`
}

// CountResource counts the objects of resource at revision rev (0: the
// latest) and returns the revision it read at. visit, when not nil, sees
// every object's key and encryption.
func (s *Scanner) CountResource(ctx context.Context, etcdPrefix, resource string, rev int64, visit func(key []byte, e Encryption)) (ResourceCount, int64, error) {
	rc := ResourceCount{Resource: resource}
	type group struct {
		kind            Kind
		provider, keyID string
	}
	counts := map[group]int{}
	rev, err := s.Scan(ctx, KeyPrefixes(etcdPrefix, resource), rev, func(kv KeyValue) error {
		e, err := Classify(kv.Value)
		if err != nil {
			rc.Malformed++
		}
		rc.Total++
		if !e.Encrypted() {
			rc.Unencrypted++
		} else {
			counts[group{e.Kind, e.Provider, e.KeyID}]++
		}
		if visit != nil {
			visit(kv.Key, e)
		}
		return nil
	})
	if err != nil {
		return rc, rev, err
	}
	rc.ByKey = make([]KeyCount, 0, len(counts))
	for g, n := range counts {
		rc.ByKey = append(rc.ByKey, KeyCount{Kind: g.kind, Provider: g.provider, KeyID: g.keyID, Count: n})
	}
	slices.SortFunc(rc.ByKey, func(a, b KeyCount) int {
		if a.Count != b.Count {
			return b.Count - a.Count
		}
		return strings.Compare(string(a.Kind)+a.Provider+"\x00"+a.KeyID, string(b.Kind)+b.Provider+"\x00"+b.KeyID)
	})
	return rc, rev, nil
}

// Config says how to reach etcd.
type Config struct {
	// Endpoints are etcd's client URLs; https ones use the TLS files.
	Endpoints []string
	// CAFile, CertFile and KeyFile are the etcd CA and a client
	// certificate, such as kube-apiserver's own.
	CAFile, CertFile, KeyFile string
	// DialTimeout bounds connecting; 0 means 10s.
	DialTimeout time.Duration
}

// Etcd is a Ranger over an etcd client.
type Etcd struct {
	client *clientv3.Client
}

var _ Ranger = (*Etcd)(nil)

// Dial connects to etcd. The caller closes the result.
func Dial(cfg Config) (*Etcd, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcdscan: no etcd endpoint")
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	var tlsCfg *tls.Config
	for _, ep := range cfg.Endpoints {
		if strings.HasPrefix(ep, "https://") {
			var err error
			if tlsCfg, err = loadTLS(cfg); err != nil {
				return nil, err
			}
			break
		}
	}
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         tlsCfg,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcdscan: connect to %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	return &Etcd{client: c}, nil
}

func loadTLS(cfg Config) (*tls.Config, error) {
	t := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcdscan: etcd CA: %w", err)
		}
		t.RootCAs = x509.NewCertPool()
		if !t.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcdscan: etcd CA %s: no PEM certificate", cfg.CAFile)
		}
	}
	if cfg.CertFile != "" || cfg.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcdscan: etcd client certificate: %w", err)
		}
		t.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

// Range implements Ranger.
func (e *Etcd) Range(ctx context.Context, start, end string, rev, limit int64) ([]KeyValue, bool, int64, error) {
	opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(limit)}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	resp, err := e.client.Get(ctx, start, opts...)
	if err != nil {
		return nil, false, 0, err
	}
	kvs := make([]KeyValue, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		kvs[i] = KeyValue{Key: kv.Key, Value: kv.Value}
	}
	return kvs, resp.More, resp.Header.Revision, nil
}

// Close closes the connection.
func (e *Etcd) Close() error { return e.client.Close() }
