package rotation

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// StateKey is the ConfigMap key holding the state as JSON. The keys
// "stage" and "status" repeat the current stage for kubectl users.
const StateKey = "state.json"

// SchemaVersion is the version of the State JSON written now.
const SchemaVersion = 1

// State is everything the rotation keeps between runs, as stored in the
// ConfigMap NAME-state. Every field is public information: key IDs are
// opaque hashes, versions are key-store version names.
type State struct {
	SchemaVersion int `json:"schemaVersion"`
	// Rotation is the rotation in progress, or the last one.
	Rotation *Rotation `json:"rotation,omitempty"`
	// LastCompleted describes the last completed rotation.
	LastCompleted *Completed `json:"lastCompleted,omitempty"`
	// LastVerify holds the counts of the last verify.
	LastVerify *Report `json:"lastVerify,omitempty"`
	// Reencryption is the `kms-plugin reencrypt` run in progress, or the
	// last one: the re-encrypt and verify stages on their own.
	Reencryption *Rotation `json:"reencryption,omitempty"`
	// LastReencryptVerify holds the counts of its last verify.
	LastReencryptVerify *Report `json:"lastReencryptVerify,omitempty"`
	// VersionHistory lists the provider versions rotations made current,
	// oldest first (at most 64): it orders versions for the keep count
	// where the store records no creation time.
	VersionHistory []string `json:"versionHistory,omitempty"`
}

// RunStatus is the status of a rotation or a stage.
type RunStatus string

// Statuses.
const (
	StatusPending   RunStatus = "pending"
	StatusRunning   RunStatus = "running"
	StatusCompleted RunStatus = "completed"
	StatusFailed    RunStatus = "failed"
	StatusSkipped   RunStatus = "skipped"
)

// Rotation is one rotation, from preflight to retire.
type Rotation struct {
	ID string `json:"id"`
	// Stage is the stage running, failed or last completed; "done" at the
	// end.
	Stage  Stage     `json:"stage"`
	Status RunStatus `json:"status"`
	// Provider is the key store kind (its provider.Provider Name, such as
	// local or azurekeyvault); ProviderName the EncryptionConfiguration's
	// kms provider name.
	Provider     string `json:"provider"`
	ProviderName string `json:"providerName"`
	OldKeyID     string `json:"oldKeyID,omitempty"`
	NewKeyID     string `json:"newKeyID,omitempty"`
	OldVersion   string `json:"oldVersion,omitempty"`
	NewVersion   string `json:"newVersion,omitempty"`
	// Migration is how objects were rewritten: update or
	// storageversionmigration.
	Migration  string        `json:"migration,omitempty"`
	StartedAt  time.Time     `json:"startedAt"`
	FinishedAt *time.Time    `json:"finishedAt,omitempty"`
	Stages     []StageRecord `json:"stages"`
	// Progress is the re-encryption's, per resource.
	Progress []ResourceProgress `json:"progress,omitempty"`
	// Retired lists the versions the retire stage disabled.
	Retired   []string `json:"retired,omitempty"`
	LastError string   `json:"lastError,omitempty"`
	// Holder is the identity of the run working on it now or last.
	Holder string `json:"holder,omitempty"`
	// Runs counts the processes that worked on this rotation.
	Runs int `json:"runs"`
	// Target is what a re-encryption (State.Reencryption) rewrites
	// toward: kms (every object under NewKeyID of ProviderName) or off-kms
	// (none stored by ProviderName). Empty for rotations.
	Target ReencryptTarget `json:"target,omitempty"`
}

// StageRecord is one stage of a rotation.
type StageRecord struct {
	Stage      Stage      `json:"stage"`
	Status     RunStatus  `json:"status"`
	StartedAt  *time.Time `json:"startedAt,omitempty"`
	FinishedAt *time.Time `json:"finishedAt,omitempty"`
	Error      string     `json:"error,omitempty"`
	Note       string     `json:"note,omitempty"`
}

// ResourceProgress counts the re-encryption of one resource.
type ResourceProgress struct {
	Resource string `json:"resource"`
	// Listed objects, of which Rewritten were updated, SkippedCurrent were
	// already under the new key (per etcd), SkippedDeleted were deleted
	// meanwhile and Failed could not be rewritten. ConflictsRetried counts
	// updates retried after a conflict.
	Listed           int64 `json:"listed"`
	Rewritten        int64 `json:"rewritten"`
	SkippedCurrent   int64 `json:"skippedCurrent"`
	SkippedDeleted   int64 `json:"skippedDeleted"`
	ConflictsRetried int64 `json:"conflictsRetried"`
	Failed           int64 `json:"failed"`
	// Estimate is the object count the apiserver announced, when it did.
	Estimate int64 `json:"estimate,omitempty"`
	Done     bool  `json:"done"`
	// Continue resumes the LIST after the last finished page.
	Continue string `json:"continue,omitempty"`
	// Migration names the StorageVersionMigration used, if any.
	Migration string `json:"migration,omitempty"`
}

// Completed is the summary of a completed rotation.
type Completed struct {
	ID         string    `json:"id"`
	StartedAt  time.Time `json:"startedAt"`
	FinishedAt time.Time `json:"finishedAt"`
	OldKeyID   string    `json:"oldKeyID"`
	NewKeyID   string    `json:"newKeyID"`
	OldVersion string    `json:"oldVersion"`
	NewVersion string    `json:"newVersion"`
	Rewritten  int64     `json:"rewritten"`
	Retired    []string  `json:"retired,omitempty"`
	// Verified is false when there was no etcd to verify with (and
	// nothing was retired).
	Verified bool `json:"verified"`
}

// stage returns the record of s, adding it when missing.
func (r *Rotation) stage(s Stage) *StageRecord {
	for i := range r.Stages {
		if r.Stages[i].Stage == s {
			return &r.Stages[i]
		}
	}
	r.Stages = append(r.Stages, StageRecord{Stage: s, Status: StatusPending})
	return &r.Stages[len(r.Stages)-1]
}

// done reports whether stage s completed (or was skipped) in r.
func (r *Rotation) done(s Stage) bool {
	for _, rec := range r.Stages {
		if rec.Stage == s {
			return rec.Status == StatusCompleted || rec.Status == StatusSkipped
		}
	}
	return false
}

// started reports whether stage s ever started in r.
func (r *Rotation) started(s Stage) bool {
	for _, rec := range r.Stages {
		if rec.Stage == s {
			return rec.StartedAt != nil
		}
	}
	return false
}

// reset marks stages as pending again.
func (r *Rotation) reset(ss ...Stage) {
	for i := range r.Stages {
		if slices.Contains(ss, r.Stages[i].Stage) {
			r.Stages[i] = StageRecord{Stage: r.Stages[i].Stage, Status: StatusPending}
		}
	}
}

// progress returns the progress record of resource, adding it when missing.
func (r *Rotation) progress(resource string) *ResourceProgress {
	for i := range r.Progress {
		if r.Progress[i].Resource == resource {
			return &r.Progress[i]
		}
	}
	r.Progress = append(r.Progress, ResourceProgress{Resource: resource})
	return &r.Progress[len(r.Progress)-1]
}

// Rewritten sums the rewritten objects of every resource.
func (r *Rotation) Rewritten() int64 {
	var n int64
	for _, p := range r.Progress {
		n += p.Rewritten
	}
	return n
}

// InProgress reports whether a rotation is started and not completed.
func (s *State) InProgress() bool {
	return s.Rotation != nil && s.Rotation.Status != StatusCompleted
}

// stateStore reads and writes the state ConfigMap. It is not safe for
// concurrent use: a run's driver alone uses it.
type stateStore struct {
	client          kubernetes.Interface
	namespace, name string
	exists          bool // the ConfigMap exists
}

func (s *stateStore) configMapName() string { return s.name + "-state" }

// StateConfigMapName returns the name of the state ConfigMap of the Lease
// name.
func StateConfigMapName(name string) string { return name + "-state" }

// LoadState reads the state ConfigMap namespace/NAME-state. A missing
// ConfigMap is an empty state.
func LoadState(ctx context.Context, client kubernetes.Interface, namespace, name string) (*State, error) {
	s := &stateStore{client: client, namespace: namespace, name: name}
	return s.load(ctx)
}

func (s *stateStore) load(ctx context.Context) (*State, error) {
	cm, err := s.client.CoreV1().ConfigMaps(s.namespace).Get(ctx, s.configMapName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		s.exists = false
		return &State{SchemaVersion: SchemaVersion}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state ConfigMap %s/%s: %w", s.namespace, s.configMapName(), err)
	}
	s.exists = true
	st := &State{}
	raw, ok := cm.Data[StateKey]
	if !ok || raw == "" {
		return &State{SchemaVersion: SchemaVersion}, nil
	}
	if err := json.Unmarshal([]byte(raw), st); err != nil {
		return nil, fmt.Errorf("state ConfigMap %s/%s: %s: %w", s.namespace, s.configMapName(), StateKey, err)
	}
	if st.SchemaVersion > SchemaVersion {
		return nil, fmt.Errorf("state ConfigMap %s/%s has schema version %d; this kms-plugin knows up to %d: use a newer kms-plugin", s.namespace, s.configMapName(), st.SchemaVersion, SchemaVersion)
	}
	st.SchemaVersion = SchemaVersion
	return st, nil
}

// save writes st. The caller holds the Lease, so the write is
// unconditional: a concurrent change can only be a hand edit.
func (s *stateStore) save(ctx context.Context, st *State) error {
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{
			Name: s.configMapName(), Namespace: s.namespace,
			Labels: map[string]string{"app.kubernetes.io/name": "kms-plugin", "app.kubernetes.io/component": "rotation"},
		},
		Data: map[string]string{StateKey: string(data)},
	}
	if st.Rotation != nil {
		cm.Data["stage"] = string(st.Rotation.Stage)
		cm.Data["status"] = string(st.Rotation.Status)
	}
	cms := s.client.CoreV1().ConfigMaps(s.namespace)
	for attempt := 0; ; attempt++ {
		if s.exists {
			_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		} else {
			_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
		}
		switch {
		case err == nil:
			s.exists = true
			return nil
		case attempt < 2 && apierrors.IsNotFound(err):
			s.exists = false
		case attempt < 2 && apierrors.IsAlreadyExists(err):
			s.exists = true
		default:
			return fmt.Errorf("write state ConfigMap %s/%s: %w", s.namespace, s.configMapName(), err)
		}
	}
}
