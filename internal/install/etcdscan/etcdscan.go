// Package etcdscan finds the objects kube-apiserver stored in etcd whose
// value starts with a given prefix, such as everything a kms provider
// encrypted ("k8s:enc:kms:v2:NAME:"). It pages through key ranges at a
// single revision, holding one page of values in memory at a time, and
// never writes.
package etcdscan

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
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
		rev   int64
	)
	for _, prefix := range keyPrefixes {
		if prefix == "" {
			return nil, 0, errors.New("etcdscan: empty key prefix")
		}
		start, end := prefix, clientv3.GetPrefixRangeEnd(prefix)
		for {
			kvs, more, r, err := s.r.Range(ctx, start, end, rev, s.pageSize)
			if err != nil {
				return nil, 0, fmt.Errorf("etcdscan: range %s: %w", prefix, err)
			}
			if rev == 0 {
				rev = r
			}
			for _, kv := range kvs {
				if strings.HasPrefix(string(kv.Value), string(valuePrefix)) {
					total++
					if len(keys) < limit {
						keys = append(keys, string(kv.Key))
					}
				}
			}
			if !more || len(kvs) == 0 {
				break
			}
			start = string(kvs[len(kvs)-1].Key) + "\x00"
		}
	}
	return keys, total, nil
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
