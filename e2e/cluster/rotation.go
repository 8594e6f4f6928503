package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Defaults of `kms-plugin rotate` the harness relies on.
const (
	RotationNamespace = "kube-system"
	RotationName      = "kms-plugin-rotation"
	// RotationCanary is the Secret rotate's converge stage writes.
	RotationCanary = "kms-plugin-rotation-canary"
	// EnvRotateCrashAfter is rotate's fault-injection hook: STAGE or
	// reencrypt:N; the process exits with 137 there.
	EnvRotateCrashAfter = "KMS_PLUGIN_ROTATE_CRASH_AFTER"
	// CrashExitCode is the exit status of a run stopped by the hook.
	CrashExitCode = 137
)

// VerifyReport is what `kms-plugin verify -o json` prints.
type VerifyReport struct {
	Resources     []VerifyResource `json:"resources"`
	ExpectedKeyID string           `json:"expectedKeyID"`
	Stale         int              `json:"stale"`
}

// VerifyResource counts one resource's stored objects.
type VerifyResource struct {
	Resource    string           `json:"resource"`
	Total       int              `json:"total"`
	Unencrypted int              `json:"unencrypted"`
	ByKey       []VerifyKeyCount `json:"byKey"`
}

// VerifyKeyCount counts the objects stored by one provider under one key_id.
type VerifyKeyCount struct {
	Provider  string `json:"provider"`
	KeyID     string `json:"keyID"`
	KeyIDHash string `json:"keyIDHash"`
	Count     int    `json:"count"`
}

// ParseVerifyReport decodes verify's JSON output.
func ParseVerifyReport(out []byte) (VerifyReport, error) {
	var r VerifyReport
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("verify -o json: %w in %q", err, out)
	}
	return r, nil
}

// Resource returns the counts of resource, if reported.
func (r VerifyReport) Resource(resource string) (VerifyResource, bool) {
	for _, x := range r.Resources {
		if x.Resource == resource {
			return x, true
		}
	}
	return VerifyResource{}, false
}

// RotateArgs are the flags of `kms-plugin rotate` that point it at this
// control plane: kubeconfig, every plugin's status endpoint (and, with
// HAConfig.AdminTLS, the client certificate that the plugins admit), every
// apiserver, etcd with its client certificate, the provider name and the
// encrypted resources. The key store flags come on top.
func (h *HA) RotateArgs() []string {
	args := []string{
		"rotate",
		"--kubeconfig", h.Kubeconfig,
		"--provider-name", h.ProviderName,
		"--resources", strings.Join(h.Resources, ","),
		"--plugin-endpoints", strings.Join(h.PluginEndpoints(), ","),
		"--apiserver-endpoints", strings.Join(h.APIServerEndpoints(), ","),
		"--log-format", "console",
	}
	args = append(args, h.PluginCertArgs()...)
	return append(args, h.EtcdArgs()...)
}

// VerifyArgs are the flags of `kms-plugin verify -o json` for this control
// plane's etcd, provider name and resources, and with HAConfig.AdminTLS
// the plugins' token (for --plugin-endpoints).
func (h *HA) VerifyArgs() []string {
	args := []string{
		"verify",
		"--provider-name", h.ProviderName,
		"--resources", strings.Join(h.Resources, ","),
		"-o", "json",
	}
	args = append(args, h.PluginTokenArgs()...)
	return append(args, h.EtcdArgs()...)
}

// RotationState is rotate's state ConfigMap NAME-state: the keys "stage"
// and "status", and the document under "state.json", of which the tests
// read the fields below.
type RotationState struct {
	Stage, Status string
	Doc           struct {
		Rotation *struct {
			ID         string    `json:"id"`
			StartedAt  time.Time `json:"startedAt"`
			Stage      string    `json:"stage"`
			Status     string    `json:"status"`
			OldKeyID   string    `json:"oldKeyID"`
			NewKeyID   string    `json:"newKeyID"`
			OldVersion string    `json:"oldVersion"`
			NewVersion string    `json:"newVersion"`
			Migration  string    `json:"migration"`
			Stages     []struct {
				Stage      string     `json:"stage"`
				Status     string     `json:"status"`
				StartedAt  *time.Time `json:"startedAt"`
				FinishedAt *time.Time `json:"finishedAt"`
				Error      string     `json:"error"`
			} `json:"stages"`
			Progress []struct {
				Resource         string `json:"resource"`
				Listed           int64  `json:"listed"`
				Rewritten        int64  `json:"rewritten"`
				SkippedCurrent   int64  `json:"skippedCurrent"`
				SkippedDeleted   int64  `json:"skippedDeleted"`
				ConflictsRetried int64  `json:"conflictsRetried"`
				Failed           int64  `json:"failed"`
				Done             bool   `json:"done"`
			} `json:"progress"`
			Retired   []string `json:"retired"`
			LastError string   `json:"lastError"`
			Runs      int      `json:"runs"`
		} `json:"rotation"`
		LastCompleted *struct {
			ID         string    `json:"id"`
			StartedAt  time.Time `json:"startedAt"`
			FinishedAt time.Time `json:"finishedAt"`
			OldKeyID   string    `json:"oldKeyID"`
			NewKeyID   string    `json:"newKeyID"`
			Rewritten  int64     `json:"rewritten"`
			Retired    []string  `json:"retired"`
			Verified   bool      `json:"verified"`
		} `json:"lastCompleted"`
	}
	// JSON is the raw document, for messages.
	JSON string
}

// StageDurations returns, for a rotation that one run completed, how long
// each stage took: from the previous stage's finish (the rotation's start
// for the first) to its own. The stages run one after the other, so this
// adds only the state save in between to each; it does not rely on the
// stages' startedAt.
func (s *RotationState) StageDurations() map[string]time.Duration {
	out := map[string]time.Duration{}
	if s == nil || s.Doc.Rotation == nil {
		return out
	}
	prev := s.Doc.Rotation.StartedAt
	for _, r := range s.Doc.Rotation.Stages {
		if r.FinishedAt == nil {
			continue
		}
		out[r.Stage] = r.FinishedAt.Sub(prev)
		prev = *r.FinishedAt
	}
	return out
}

// Rewritten sums the objects the current rotation rewrote.
func (s *RotationState) Rewritten() int64 {
	if s == nil || s.Doc.Rotation == nil {
		return 0
	}
	var n int64
	for _, p := range s.Doc.Rotation.Progress {
		n += p.Rewritten
	}
	return n
}

// RotationState reads rotate's state ConfigMap (NAME-state in namespace);
// nil and no error when it does not exist yet.
func (h *HA) RotationState(ctx context.Context, namespace, name string) (*RotationState, error) {
	cm, err := h.Client.CoreV1().ConfigMaps(namespace).Get(ctx, name+"-state", metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("get state ConfigMap %s/%s-state: %w", namespace, name, err)
	}
	st := &RotationState{Stage: cm.Data["stage"], Status: cm.Data["status"], JSON: cm.Data["state.json"]}
	if err := json.Unmarshal([]byte(st.JSON), &st.Doc); err != nil {
		return nil, fmt.Errorf("state ConfigMap %s/%s-state: state.json: %w", namespace, name, err)
	}
	return st, nil
}

// Parallel calls f(i) for i in [0, n) on workers goroutines and returns the
// first error (after which the remaining calls are skipped).
func Parallel(n, workers int, f func(i int) error) error {
	var next atomic.Int64
	var once sync.Once
	var first error
	var failed atomic.Bool
	var wg sync.WaitGroup
	for range max(1, workers) {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					failed.Store(true)
				}
			}
		})
	}
	wg.Wait()
	return first
}
