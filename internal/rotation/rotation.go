// Package rotation rotates the key that protects etcd, end to end, as a
// resumable state machine: preflight, rotate, converge, re-encrypt, verify,
// retire (DESIGN.md section 6).
//
// Its promise: at every point of a run, and after a run dies at any point,
// every stored object stays readable. A key version is only ever disabled
// (never deleted) after a scan of etcd shows that no object depends on it,
// and the next run resumes where the last one stopped. The state lives in a
// ConfigMap in the cluster, and a coordination.k8s.io Lease keeps two runs
// from overlapping.
package rotation

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Stage is one step of a rotation.
type Stage string

// The stages, in order.
const (
	StagePreflight Stage = "preflight"
	StageRotate    Stage = "rotate"
	StageConverge  Stage = "converge"
	StageReencrypt Stage = "reencrypt"
	StageVerify    Stage = "verify"
	StageRetire    Stage = "retire"
	// StageDone marks a finished rotation.
	StageDone Stage = "done"
)

// stages lists the stages in the order a rotation runs them.
var stages = []Stage{StagePreflight, StageRotate, StageConverge, StageReencrypt, StageVerify, StageRetire}

// Stages returns the stages in the order a rotation runs them.
func Stages() []Stage { return append([]Stage(nil), stages...) }

// Migration selects how stored objects are rewritten.
type Migration string

// Migrations.
const (
	// MigrationAuto uses StorageVersionMigration when the cluster serves
	// storagemigration.k8s.io, falling back to updates when no migration
	// controller picks the migration up; else updates.
	MigrationAuto Migration = "auto"
	// MigrationUpdate rewrites every object with a no-op update.
	MigrationUpdate Migration = "update"
	// MigrationSVM creates one StorageVersionMigration per resource.
	MigrationSVM Migration = "storageversionmigration"
)

// Outcome is how a run ended without error.
type Outcome string

// Outcomes.
const (
	OutcomeCompleted Outcome = "completed"
	OutcomeNotDue    Outcome = "not-due"
	OutcomeDryRun    Outcome = "dry-run"
)

// Result is what a successful Run did.
type Result struct {
	Outcome Outcome
	// Message says what happened in one line ("not due: ...").
	Message string
	// Plan lists what a dry run would do.
	Plan []string
	// State is the state after the run.
	State *State
}

// Runner runs rotations. Its Config, set by New, is the one every stage
// and the dry run read.
type Runner struct {
	cfg Config
	log *zap.Logger
	// cur is the run in progress, for metrics.
	cur atomic.Pointer[run]
}

// now is the clock's time in UTC.
func (r *Runner) now() time.Time { return r.cfg.Now().UTC() }

// New checks cfg and returns a Runner.
func New(cfg Config) (*Runner, error) {
	if cfg.Provider == nil {
		return nil, errors.New("rotation: no provider")
	}
	return newRunner(cfg)
}

// newRunner checks cfg, but for its Provider (a re-encryption needs none),
// and fills in the defaults.
func newRunner(cfg Config) (*Runner, error) {
	if cfg.Client == nil {
		return nil, errors.New("rotation: no Kubernetes client")
	}
	if cfg.Dynamic == nil && !cfg.DryRun {
		return nil, errors.New("rotation: no dynamic client")
	}
	cfg.APIServers = append([]APIServer(nil), cfg.APIServers...)
	cfg.Resources = append([]string(nil), cfg.Resources...)
	cfg.PluginEndpoints = append([]string(nil), cfg.PluginEndpoints...)
	def := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	def(&cfg.Namespace, DefaultNamespace)
	def(&cfg.Name, DefaultName)
	def(&cfg.ProviderName, DefaultProviderName)
	def(&cfg.EtcdPrefix, DefaultEtcdPrefix)
	if len(cfg.Resources) == 0 {
		cfg.Resources = []string{"secrets"}
	}
	for _, r := range cfg.Resources {
		if r == "" || strings.ContainsAny(r, "*/ ") {
			return nil, fmt.Errorf("rotation: resource %q: name each resource (such as secrets or widgets.example.com); wildcards are not supported", r)
		}
	}
	if cfg.PluginPort == 0 {
		cfg.PluginPort = DefaultPluginPort
	}
	switch cfg.PluginScheme {
	case "":
		cfg.PluginScheme = "http"
	case "http", "https":
	default:
		return nil, fmt.Errorf("rotation: plugin scheme %q: want http or https", cfg.PluginScheme)
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 5 * time.Second}
	}
	durDef := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	durDef(&cfg.ConvergeTimeout, DefaultConvergeTimeout)
	durDef(&cfg.ConvergeWait, DefaultConvergeWait)
	durDef(&cfg.LeaseDuration, DefaultLeaseDuration)
	durDef(&cfg.PollInterval, DefaultPollInterval)
	durDef(&cfg.SVMStartTimeout, DefaultSVMStartTimeout)
	durDef(&cfg.ProgressInterval, 10*time.Second)
	if cfg.MinAge < 0 {
		return nil, errors.New("rotation: negative minimum age")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.QPS <= 0 {
		cfg.QPS = DefaultQPS
	}
	if cfg.Burst <= 0 {
		cfg.Burst = max(1, int(cfg.QPS))
	}
	if cfg.PageSize <= 0 {
		cfg.PageSize = DefaultPageSize
	}
	if cfg.Keep < 0 {
		return nil, errors.New("rotation: negative keep count")
	}
	switch cfg.Migration {
	case "":
		cfg.Migration = MigrationUpdate
	case MigrationAuto, MigrationUpdate, MigrationSVM:
	default:
		return nil, fmt.Errorf("rotation: migration %q: want auto, update or storageversionmigration", cfg.Migration)
	}
	if cfg.Identity == "" {
		cfg.Identity = DefaultIdentity()
	}
	if cfg.HolderGone == nil {
		cfg.HolderGone = holderGone
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Runner{cfg: cfg, log: cfg.Logger}, nil
}

// RegisterMetrics registers the rotation's metrics on reg: the stage and
// the re-encryption's object counts per resource and outcome, read at every
// scrape.
func (r *Runner) RegisterMetrics(reg prometheus.Registerer) error {
	if err := reg.Register(collector{cur: &r.cur}); err != nil {
		return fmt.Errorf("rotation: metrics: %w", err)
	}
	return nil
}

// DefaultIdentity is HOST/PIDNS/PID, which lets a run on the same host
// take over the Lease of a process that died.
func DefaultIdentity() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s/%s/%d", host, pidNamespace(), os.Getpid())
}

// HumanDuration formats d for people: "3d", "5h", "12m", "40s".
func HumanDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	switch {
	case d >= 48*time.Hour:
		days := d.Hours() / 24
		if days == float64(int64(days)) {
			return fmt.Sprintf("%dd", int64(days))
		}
		return fmt.Sprintf("%.1fd", days)
	case d >= 2*time.Hour:
		return fmt.Sprintf("%dh", int64(d.Hours()))
	case d >= 2*time.Minute:
		return fmt.Sprintf("%dm", int64(d.Minutes()))
	default:
		return fmt.Sprintf("%ds", int64(d.Seconds()))
	}
}
