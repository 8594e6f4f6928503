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
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider"
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

// Stages lists the stages in the order a rotation runs them.
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

// Defaults.
const (
	DefaultNamespace       = "kube-system"
	DefaultName            = "kms-plugin-rotation"
	DefaultProviderName    = "kms-plugin"
	DefaultPluginPort      = 8787
	DefaultEtcdPrefix      = "/registry"
	DefaultConvergeTimeout = 10 * time.Minute
	DefaultConvergeWait    = 3 * time.Minute
	DefaultWorkers         = 32
	DefaultQPS             = 1000
	DefaultPageSize        = 500
	DefaultLeaseDuration   = 60 * time.Second
	DefaultPollInterval    = 250 * time.Millisecond
	DefaultSVMStartTimeout = 2 * time.Minute
	// CanaryName is the Secret that converge writes through every
	// apiserver and reads back raw from etcd.
	CanaryName = "kms-plugin-rotation-canary"
	// ControlPlaneLabel selects the Nodes whose plugins are asked.
	ControlPlaneLabel = "node-role.kubernetes.io/control-plane"
)

// APIServer is one kube-apiserver reached directly, for the canary.
type APIServer struct {
	// Name identifies it in messages, such as its URL.
	Name string
	// Client talks to this apiserver only.
	Client kubernetes.Interface
}

// Config configures a Runner. Zero values are safe defaults, except where
// a field says it is required.
type Config struct {
	// Client reaches the cluster: state ConfigMap, Lease, Nodes, the canary
	// and discovery. Required.
	Client kubernetes.Interface
	// Dynamic creates StorageVersionMigrations, and rewrites objects when
	// REST is nil. Required unless DryRun.
	Dynamic dynamic.Interface
	// REST rewrites objects: each is listed and written back as the JSON
	// the apiserver sent, never decoded, so no field is lost and little
	// CPU is spent. Any REST client of the cluster will do (requests use
	// absolute paths). Nil: Dynamic does.
	REST rest.Interface
	// APIServers are the apiservers the canary is written through; empty
	// means Client only, under the name "default".
	APIServers []APIServer
	// Namespace holds the Lease (Name) and the state ConfigMap (Name +
	// "-state") and the canary Secret. Default kube-system.
	Namespace, Name string

	// Provider is the key store the plugins use, built from the same
	// configuration. Required. Rotate needs provider.Rotator; retire needs
	// provider.Retirer and provider.VersionLister.
	Provider provider.Provider
	// ProviderName is the kms provider's name in the EncryptionConfiguration
	// (stored values start with k8s:enc:kms:v2:NAME:). Default kms-plugin.
	ProviderName string
	// Resources are rewritten and verified. Default: secrets.
	Resources []string

	// PluginEndpoints are the plugins' HTTP bases (GET BASE/status). Empty:
	// every Node labelled node-role.kubernetes.io/control-plane, at its
	// InternalIP and PluginPort (default 8787).
	PluginEndpoints []string
	PluginPort      int
	// HTTPClient asks the plugins. Default: 5 s timeout.
	HTTPClient *http.Client

	// Etcd reads stored values: canary, skipping objects already under the
	// new key, and verify. Nil: the canary becomes a wait of ConvergeWait,
	// every object is rewritten, and verify and retire are skipped.
	Etcd etcdscan.Ranger
	// EtcdPrefix is kube-apiserver's --etcd-prefix. Default /registry.
	EtcdPrefix string

	// MinAge: no new rotation starts before this long after the last
	// completed one (or the current version's creation time).
	MinAge time.Duration
	// ConvergeTimeout bounds converge. Default 10m.
	ConvergeTimeout time.Duration
	// ConvergeWait is waited when there is no etcd to read the canary
	// from. Default 3m (three Status polls of kube-apiserver).
	ConvergeWait time.Duration
	// Workers, QPS and Burst bound the rewriting. Defaults 8, 200, QPS.
	Workers int
	QPS     float64
	Burst   int
	// PageSize is the LIST page size. Default 500.
	PageSize int64
	// Keep is how many versions older than the current one stay enabled.
	Keep int
	// DryRun reports what a run would do and changes nothing.
	DryRun bool
	// Wait waits for a Lease held by another run instead of failing.
	Wait bool
	// Migration selects how objects are rewritten. Default update.
	Migration Migration
	// SVMStartTimeout is how long a StorageVersionMigration may show no
	// condition before auto falls back to updates. Default 2m.
	SVMStartTimeout time.Duration
	// LocalKeysetShared asserts that every node's plugin reads the same
	// local keyset file (shared storage), which allows rotating the local
	// provider with more than one plugin.
	LocalKeysetShared bool

	// LeaseDuration is the Lease's duration; it is renewed every third.
	// Default 60s.
	LeaseDuration time.Duration
	// PollInterval paces polling of plugins, canary, Lease and migrations.
	// Default 5s.
	PollInterval time.Duration
	// Identity names this run in the Lease. Default HOST/PIDNS/PID.
	Identity string
	// HolderGone reports whether the process named by a Lease holder
	// identity is known to be gone (then its Lease is taken over at once
	// instead of at expiry). Default: same host and PID namespace, and no
	// such process.
	HolderGone func(identity string) bool

	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger receives progress. Default: no logging.
	Logger *zap.Logger
	// Progress, when set (a terminal), shows a progress bar of the
	// re-encryption; else progress goes to Logger every ProgressInterval
	// (default 10s).
	Progress         io.Writer
	ProgressInterval time.Duration

	// CrashAfter and Crash are a test hook: at CrashAfter the runner calls
	// Crash (the command exits with 137 there). If Crash returns, Run
	// returns ErrCrashed at once, leaving the Lease and state as a killed
	// process would.
	CrashAfter CrashPoint
	Crash      func()
}

// Errors.
var (
	// ErrCrashed is returned by Run when the CrashAfter hook fired.
	ErrCrashed = errors.New("rotation: crashed at the test hook")
	// ErrLostLease stops a run whose Lease could not be renewed.
	ErrLostLease = errors.New("rotation: lost the Lease")
)

// LeaseHeldError is returned by Run when another run holds the Lease.
type LeaseHeldError struct {
	Namespace, Name string
	Holder          string
	RenewTime       time.Time
	Expires         time.Time
	Now             time.Time
}

func (e *LeaseHeldError) Error() string {
	msg := fmt.Sprintf("another rotation is running: Lease %s/%s is held by %s", e.Namespace, e.Name, e.Holder)
	if !e.RenewTime.IsZero() {
		msg += fmt.Sprintf(" (renewed %s ago, expires in %s)", HumanDuration(e.Now.Sub(e.RenewTime)), HumanDuration(e.Expires.Sub(e.Now)))
	}
	return msg + "; run again later or with --wait"
}

// StageError is a run that stopped at a stage. No key version was disabled
// that anything depends on, and the next run resumes at stage Resume.
type StageError struct {
	Stage  Stage
	Resume Stage
	Err    error
}

func (e *StageError) Error() string {
	resume := e.Resume
	if resume == "" {
		resume = e.Stage
	}
	return fmt.Sprintf("rotation stopped at stage %s: %v (all keys intact; the next run resumes at %s)", e.Stage, e.Err, resume)
}

func (e *StageError) Unwrap() error { return e.Err }

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

// Runner runs rotations.
type Runner struct {
	cfg Config
	log *zap.Logger
	// cur is the run in progress, for metrics.
	cur atomic.Pointer[run]
}

// New checks cfg and returns a Runner.
func New(cfg Config) (*Runner, error) {
	if cfg.Client == nil {
		return nil, errors.New("rotation: no Kubernetes client")
	}
	if cfg.Provider == nil {
		return nil, errors.New("rotation: no provider")
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

// CrashPoint names where the test hook fires: right after Stage was
// persisted as completed, or, with Objects > 0, once that many objects were
// rewritten in the re-encrypt stage.
type CrashPoint struct {
	Stage   Stage
	Objects int64
}

// IsZero reports whether no crash point is set.
func (c CrashPoint) IsZero() bool { return c.Stage == "" }

// ParseCrashPoint parses "STAGE" or "reencrypt:N".
func ParseCrashPoint(s string) (CrashPoint, error) {
	if s == "" {
		return CrashPoint{}, nil
	}
	name, n, hasN := strings.Cut(s, ":")
	st := Stage(name)
	valid := false
	for _, x := range stages {
		valid = valid || x == st
	}
	if !valid {
		return CrashPoint{}, fmt.Errorf("crash point %q: stage must be one of preflight, rotate, converge, reencrypt, verify, retire", s)
	}
	cp := CrashPoint{Stage: st}
	if hasN {
		if st != StageReencrypt {
			return CrashPoint{}, fmt.Errorf("crash point %q: an object count only applies to reencrypt", s)
		}
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v <= 0 {
			return CrashPoint{}, fmt.Errorf("crash point %q: %q is not a positive object count", s, n)
		}
		cp.Objects = v
	}
	return cp, nil
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
