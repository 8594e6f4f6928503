package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// VerifyConfig configures Verify.
type VerifyConfig struct {
	// Etcd is read, never written. Required.
	Etcd etcdscan.Ranger
	// EtcdPrefix is kube-apiserver's --etcd-prefix. Default /registry.
	EtcdPrefix string
	// Resources are counted. Default secrets.
	Resources []string
	// ProviderName is the kms provider's name. Default kms-plugin.
	ProviderName string
	// ExpectedKeyID is the key_id every object should be under. Empty:
	// count only; Stale stays 0.
	ExpectedKeyID string
	// Off checks the other way, as after uninstall's first stage: objects
	// stored by the kms v2 provider ProviderName, under any key_id, are
	// stale, and every other object (other providers, unencrypted) is
	// current. ExpectedKeyID is then ignored.
	Off bool
	// PageSize is the etcd page size. Default 100.
	PageSize int64
	// Samples is how many stale and unencrypted keys to name. Default 5.
	Samples int
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Report is what verify found in etcd. It is the JSON of `kms-plugin
// verify -o json` and of the state's lastVerify: add fields, never rename.
type Report struct {
	Resources         []ResourceReport `json:"resources"`
	ProviderName      string           `json:"providerName"`
	ExpectedKeyID     string           `json:"expectedKeyID"`
	ExpectedKeyIDHash string           `json:"expectedKeyIDHash,omitempty"`
	// Off: no object may be stored by ProviderName (VerifyConfig.Off).
	Off bool `json:"off,omitempty"`
	// Total counts every object; Current those under the expected key_id
	// of the provider; Stale the encrypted ones that are not (other key_ids,
	// other providers, malformed); Unencrypted those stored in clear.
	Total       int `json:"total"`
	Current     int `json:"current"`
	Stale       int `json:"stale"`
	Unencrypted int `json:"unencrypted"`
	// Revision is the etcd revision every count was read at.
	Revision           int64     `json:"revision"`
	At                 time.Time `json:"at"`
	StaleSamples       []string  `json:"staleSamples,omitempty"`
	UnencryptedSamples []string  `json:"unencryptedSamples,omitempty"`
}

// ResourceReport counts one resource.
type ResourceReport struct {
	Resource    string      `json:"resource"`
	Total       int         `json:"total"`
	Unencrypted int         `json:"unencrypted"`
	Stale       int         `json:"stale"`
	Malformed   int         `json:"malformed,omitempty"`
	ByKey       []KeyReport `json:"byKey"`
}

// KeyReport counts the objects of a resource under one provider and key_id.
type KeyReport struct {
	// Kind is kms/v2, kms/v1, aescbc, aesgcm, secretbox or unknown.
	Kind      string `json:"kind"`
	Provider  string `json:"provider"`
	KeyID     string `json:"keyID"`
	KeyIDHash string `json:"keyIDHash,omitempty"`
	Count     int    `json:"count"`
	// Current marks the expected provider and key_id.
	Current bool `json:"current"`
}

// Verify scans etcd and counts the objects of each resource per provider
// and key_id, at one revision.
func Verify(ctx context.Context, cfg VerifyConfig) (*Report, error) {
	if cfg.Etcd == nil {
		return nil, errors.New("verify: no etcd")
	}
	if cfg.EtcdPrefix == "" {
		cfg.EtcdPrefix = DefaultEtcdPrefix
	}
	if len(cfg.Resources) == 0 {
		cfg.Resources = []string{"secrets"}
	}
	if cfg.ProviderName == "" {
		cfg.ProviderName = DefaultProviderName
	}
	if cfg.Samples <= 0 {
		cfg.Samples = 5
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Off {
		cfg.ExpectedKeyID = ""
	}
	rep := &Report{ProviderName: cfg.ProviderName, ExpectedKeyID: cfg.ExpectedKeyID, ExpectedKeyIDHash: envelope.KeyIDHash(cfg.ExpectedKeyID), Off: cfg.Off, At: cfg.Now().UTC()}
	current := func(e etcdscan.Encryption) bool {
		if cfg.Off {
			return e.Kind != etcdscan.KindKMSv2 || e.Provider != cfg.ProviderName
		}
		return e.Kind == etcdscan.KindKMSv2 && e.Provider == cfg.ProviderName && e.KeyID == cfg.ExpectedKeyID
	}
	judged := cfg.ExpectedKeyID != "" || cfg.Off
	sc := etcdscan.New(cfg.Etcd, cfg.PageSize)
	var rev int64
	for _, res := range cfg.Resources {
		stale := 0
		rc, r, err := sc.CountResource(ctx, cfg.EtcdPrefix, res, rev, func(key []byte, e etcdscan.Encryption) {
			switch {
			case !e.Encrypted():
				if len(rep.UnencryptedSamples) < cfg.Samples {
					rep.UnencryptedSamples = append(rep.UnencryptedSamples, string(key))
				}
			case judged && !current(e):
				stale++
				if len(rep.StaleSamples) < cfg.Samples {
					rep.StaleSamples = append(rep.StaleSamples, string(key))
				}
			}
		})
		if err != nil {
			return nil, fmt.Errorf("verify %s: read etcd: %w", res, err)
		}
		rev = r
		rr := ResourceReport{Resource: res, Total: rc.Total, Unencrypted: rc.Unencrypted, Stale: stale, Malformed: rc.Malformed, ByKey: []KeyReport{}}
		for _, k := range rc.ByKey {
			kr := KeyReport{Kind: string(k.Kind), Provider: k.Provider, KeyID: k.KeyID, KeyIDHash: envelope.KeyIDHash(k.KeyID), Count: k.Count}
			kr.Current = judged && current(etcdscan.Encryption{Kind: k.Kind, Provider: k.Provider, KeyID: k.KeyID})
			if kr.Current {
				rep.Current += k.Count
			}
			rr.ByKey = append(rr.ByKey, kr)
		}
		rep.Resources = append(rep.Resources, rr)
		rep.Total += rc.Total
		rep.Unencrypted += rc.Unencrypted
		rep.Stale += stale
	}
	rep.Revision = rev
	return rep, nil
}

// verify is the verify stage: it counts stored objects per key_id; every
// object must be under the new key_id, or the next run re-encrypts again.
func (x *run) verify(ctx context.Context) (stageResult, error) {
	if x.cfg.Etcd == nil {
		return stageResult{skipped: true, note: "no etcd configured: cannot verify, so nothing will be retired"}, nil
	}
	rep, err := Verify(ctx, VerifyConfig{
		Etcd: x.cfg.Etcd, EtcdPrefix: x.cfg.EtcdPrefix, Resources: x.cfg.Resources,
		ProviderName: x.cfg.ProviderName, ExpectedKeyID: x.rot.NewKeyID, Now: x.cfg.Now,
	})
	if err != nil {
		return stageResult{}, err
	}
	x.st.LastVerify = rep
	if rep.Stale > 0 {
		// Go back to re-encryption on the next run.
		x.rot.reset(StageReencrypt)
		for i := range x.rot.Progress {
			x.rot.Progress[i].Done, x.rot.Progress[i].Continue = false, ""
		}
		return stageResult{}, fmt.Errorf("%d objects are not under the new key_id (hash %s), such as %s; the next run re-encrypts them and verifies again",
			rep.Stale, envelope.KeyIDHash(rep.ExpectedKeyID), strings.Join(rep.StaleSamples, ", "))
	}
	note := fmt.Sprintf("%d objects, all under key_id hash %s", rep.Current, envelope.KeyIDHash(rep.ExpectedKeyID))
	if rep.Unencrypted > 0 {
		note += fmt.Sprintf("; %d not encrypted at all (such as %s): they do not depend on any key, and the next re-encryption encrypts them", rep.Unencrypted, strings.Join(rep.UnencryptedSamples, ", "))
	}
	return stageResult{note: note}, nil
}
