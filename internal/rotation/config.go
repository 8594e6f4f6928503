package rotation

import (
	"io"
	"net/http"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider"
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
	// CanaryName is the object that converge writes through every
	// apiserver and reads back raw from etcd: a Secret, or a ConfigMap
	// when secrets are not among the resources.
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
	// Client reaches the cluster: state ConfigMap, Lease, Nodes, the
	// kubernetes EndpointSlices, the canary and discovery; Permissions
	// lists every request it makes. Required.
	Client kubernetes.Interface
	// Dynamic creates StorageVersionMigrations, and rewrites objects when
	// REST is nil. Required unless DryRun.
	Dynamic dynamic.Interface
	// REST rewrites objects: each is listed and written back as the JSON
	// the apiserver sent, never decoded, so no field is lost and little
	// CPU is spent. Any REST client of the cluster will do (requests use
	// absolute paths). Nil: Dynamic does.
	REST rest.Interface
	// APIServers are the apiservers the canary is written through. Empty:
	// with APIServerClient, every apiserver that the EndpointSlices of
	// Service KubernetesService in namespace KubernetesNamespace list;
	// else, or when they cannot be read or list none, Client only, under
	// the name "default".
	APIServers []APIServer
	// APIServerClient builds a client of the one apiserver at host
	// (https://HOST:PORT, from the EndpointSlices) with Client's
	// credentials and CA. Optional.
	APIServerClient func(host string) (kubernetes.Interface, error)
	// Namespace holds the Lease (named Name), the state ConfigMap (Name +
	// "-state") and the canary. Defaults DefaultNamespace (kube-system) and
	// DefaultName (kms-plugin-rotation).
	Namespace, Name string

	// Provider is the key store the plugins use, built from the same
	// configuration. Required. Rotate needs provider.Rotator; retire needs
	// provider.Retirer and provider.VersionLister. A provider.NodeLocal
	// store is refused with more than one plugin unless LocalKeysetShared.
	Provider provider.Provider
	// ProviderName is the kms provider's name in the EncryptionConfiguration
	// (stored values start with k8s:enc:kms:v2:NAME:). Default
	// DefaultProviderName (kms-plugin).
	ProviderName string
	// Resources are rewritten and verified. Default: secrets.
	Resources []string

	// PluginEndpoints are the plugins' HTTP bases (GET BASE/status). Empty:
	// every Node labelled node-role.kubernetes.io/control-plane, at its
	// InternalIP and PluginPort (default DefaultPluginPort, 8787), over
	// PluginScheme (http, or https when the plugins serve TLS).
	PluginEndpoints []string
	PluginPort      int
	PluginScheme    string
	// HTTPClient asks the plugins, and presents the credential their admin
	// port asks for (adminauth.HTTPClient). Default: 5 s timeout, no
	// credential.
	HTTPClient *http.Client

	// Etcd reads stored values: canary, skipping objects already under the
	// new key, and verify. Nil: the canary becomes a wait of ConvergeWait,
	// every object is rewritten, and verify and retire are skipped.
	Etcd etcdscan.Ranger
	// EtcdPrefix is kube-apiserver's --etcd-prefix. Default
	// DefaultEtcdPrefix (/registry).
	EtcdPrefix string

	// MinAge: no new rotation starts before this long after the last
	// completed one (or the current version's creation time). 0: every
	// run rotates.
	MinAge time.Duration
	// ConvergeTimeout bounds converge. Default DefaultConvergeTimeout
	// (10m).
	ConvergeTimeout time.Duration
	// ConvergeWait is waited when there is no etcd to read the canary
	// from. Default DefaultConvergeWait (3m, three Status polls of
	// kube-apiserver).
	ConvergeWait time.Duration
	// Workers, QPS and Burst bound the rewriting. Defaults DefaultWorkers
	// (32), DefaultQPS (1000) and, for Burst, QPS.
	Workers int
	QPS     float64
	Burst   int
	// PageSize is the LIST page size. Default DefaultPageSize (500).
	PageSize int64
	// Keep is how many versions older than the current one stay enabled.
	// Default 0.
	Keep int
	// DryRun reports what a run would do and changes nothing.
	DryRun bool
	// Wait waits for a Lease held by another run instead of failing.
	Wait bool
	// Migration selects how objects are rewritten. Default MigrationUpdate.
	Migration Migration
	// SVMStartTimeout is how long a StorageVersionMigration may show no
	// condition before auto falls back to updates. Default
	// DefaultSVMStartTimeout (2m).
	SVMStartTimeout time.Duration
	// LocalKeysetShared asserts that every node's plugin reads the same
	// key material (for the local provider, the same keyset file on shared
	// storage), which allows rotating a provider.NodeLocal store on a
	// control plane of several nodes. Without it such a store is refused
	// when there is more than one plugin to ask, more than one Node
	// labelled ControlPlaneLabel, or more than one apiserver in the
	// kubernetes EndpointSlices, and when the Nodes or the EndpointSlices
	// cannot be listed.
	LocalKeysetShared bool

	// LeaseDuration is the Lease's duration; it is renewed every third.
	// Default DefaultLeaseDuration (60s).
	LeaseDuration time.Duration
	// PollInterval paces polling of plugins, canary, a held Lease and
	// migrations. Default DefaultPollInterval (250ms).
	PollInterval time.Duration
	// Identity names this run in the Lease. Default HOST/PIDNS/PID
	// (DefaultIdentity).
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

	// Hooks are test hooks. The zero value has none.
	Hooks Hooks
}

// Hooks let a test stop a run at a chosen point, as if the process were
// killed there. A hook that returns a non-nil error stops Run at once: Run
// returns that error as it is, records nothing more in the state and
// leaves the Lease held, exactly as a killed process would, and the next
// run resumes. Return ErrCrashed unless the test needs an error of its
// own. Nil hooks are not called.
type Hooks struct {
	// AfterStage is called right after stage s was persisted as completed
	// (or skipped), before the next stage starts.
	AfterStage func(s Stage) error
	// AfterRewrites is called each time the re-encrypt stage rewrote an
	// object, with n the number of objects it rewrote so far in this run
	// (all resources together). It is called from the rewriting workers,
	// so possibly from several goroutines at once.
	AfterRewrites func(n int64) error
}

// afterStage calls the AfterStage hook, if any.
func (h Hooks) afterStage(s Stage) error {
	if h.AfterStage == nil {
		return nil
	}
	return h.AfterStage(s)
}

// afterRewrites calls the AfterRewrites hook, if any.
func (h Hooks) afterRewrites(n int64) error {
	if h.AfterRewrites == nil {
		return nil
	}
	return h.AfterRewrites(n)
}
