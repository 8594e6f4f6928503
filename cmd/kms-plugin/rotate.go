//go:build !serveonly

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/logging"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// leaseHeldExitCode is rotate's exit code when another run holds the Lease.
const leaseHeldExitCode = 2

// clusterClients are the clients rotate and status use.
type clusterClients struct {
	client     kubernetes.Interface
	dynamic    dynamic.Interface
	rest       rest.Interface // nil in tests: rotate rewrites through dynamic
	apiservers []rotation.APIServer
	// apiserver builds a client of one apiserver, https://HOST:PORT, with
	// the same credentials and CA: rotate writes the canary through each
	// apiserver of the kubernetes EndpointSlices when none is named.
	apiserver func(host string) (kubernetes.Interface, error)
}

// clientFactory builds the clients from --kubeconfig and the apiserver
// endpoints; tests replace it.
type clientFactory func(kubeconfig string, apiserverEndpoints []string, qps float32, burst int) (*clusterClients, error)

func realClients(kubeconfig string, apiserverEndpoints []string, qps float32, burst int) (*clusterClients, error) {
	rc, err := restConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	rc.UserAgent = "kms-plugin/" + version
	rc.QPS, rc.Burst = qps, burst
	out := &clusterClients{}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	out.client, out.rest = cs, cs.CoreV1().RESTClient()
	if out.dynamic, err = dynamic.NewForConfig(rc); err != nil {
		return nil, err
	}
	one := func(host string) (kubernetes.Interface, error) {
		c := rest.CopyConfig(rc)
		c.Host = host
		return kubernetes.NewForConfig(c)
	}
	for _, ep := range apiserverEndpoints {
		cs, err := one(ep)
		if err != nil {
			return nil, fmt.Errorf("apiserver endpoint %s: %w", ep, err)
		}
		out.apiservers = append(out.apiservers, rotation.APIServer{Name: ep, Client: cs})
	}
	// One apiserver behind an address from the kubernetes EndpointSlices,
	// with the kubeconfig's (or the service account's) credentials and
	// CA, whose serving certificate names the apiserver's IP as kubeadm
	// issues it. Only with a CA of its own: the addresses come from the
	// cluster, and the credentials must go nowhere a certificate of
	// another CA (or none) would accept them.
	if tc := rc.TLSClientConfig; !tc.Insecure && (len(tc.CAData) > 0 || tc.CAFile != "") {
		out.apiserver = one
	}
	return out, nil
}

func runRotate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return rotateMain(ctx, args, stdout, stderr, rotateDeps{clients: realClients, dial: dialEtcd, crash: func() { os.Exit(crashExitCode) }})
}

// rotateDeps are what tests replace: the cluster clients, etcd and the
// crash hook's exit.
type rotateDeps struct {
	clients clientFactory
	dial    func(*etcdFlags) (etcdscan.Ranger, func(), error)
	crash   func()
}

// rotateMain is `kms-plugin rotate`.
func rotateMain(ctx context.Context, args []string, stdout, stderr io.Writer, deps rotateDeps) (err error) {
	fs := flag.NewFlagSet("kms-plugin rotate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin rotate [FLAGS]

Rotates the key that protects etcd, end to end: preflight (every plugin
healthy and on the same key), rotate (a new key version in the key store),
converge (every plugin and every apiserver on the new key), reencrypt
(rewrite every object of the encrypted resources), verify (count objects per
key in etcd) and retire (disable old versions nothing depends on). State is
kept in the ConfigMap NAME-state and a Lease keeps two runs apart; a run
that stops resumes at the next run.

Exit codes: 0 rotation completed or not due; 1 failure (keys intact; the
next run resumes); 2 another run holds the Lease, or a bad flag or
argument.

Test hook: `+CrashEnv+`=STAGE (or reencrypt:N) exits with 137 right after
STAGE completed (after N objects were rewritten).

Flags:
`)
		fs.PrintDefaults()
	}
	loadConfig := configFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
	namespace := fs.String("namespace", rotation.DefaultNamespace, "namespace of the Lease, the state ConfigMap and the canary")
	name := fs.String("name", rotation.DefaultName, "Lease name; the state ConfigMap is NAME-state")
	minAge := fs.Duration("min-age", 0, "rotate only when the last rotation (or the current key version) is at least this old; 0 rotates every run")
	res := addResourceFlags(fs)
	var pluginEndpoints, apiEndpoints listFlag
	fs.Var(&pluginEndpoints, "plugin-endpoints", "plugin HTTP bases, comma-separated, such as http://127.0.0.1:8787 or https://10.0.0.1:8787 (default: every control-plane Node's InternalIP and --plugin-port)")
	pluginPort := fs.Int("plugin-port", rotation.DefaultPluginPort, "plugin HTTP port on discovered control-plane Nodes")
	plugin := addPluginFlags(fs)
	fs.Var(&apiEndpoints, "apiserver-endpoints", "kube-apiserver URLs, comma-separated, to write the canary through each (default: every apiserver the kubernetes EndpointSlices in namespace default list, else the kubeconfig's server)")
	etcd := addEtcdFlags(fs, nil)
	convergeTimeout := fs.Duration("converge-timeout", rotation.DefaultConvergeTimeout, "how long converge waits for every plugin and apiserver")
	convergeWait := fs.Duration("converge-wait", rotation.DefaultConvergeWait, "without etcd: how long to wait for the apiservers after every plugin reports the new key")
	rf := addRunFlags(fs, "how often to poll plugins, the canary and migrations")
	keep := fs.Int("keep", 1, "old key versions kept enabled besides the current one")
	metricsAddr := fs.String("metrics-addr", "", "HOST:PORT to serve the rotation's Prometheus metrics on /metrics while it runs (empty: none)")
	metricsFile := fs.String("metrics-textfile", "", "when the run ends, write its outcome and the rotation state as Prometheus metrics to this file (atomically), for node_exporter's textfile collector, such as /var/lib/node_exporter/textfile_collector/kms-plugin-rotate.prom (empty: none)")
	shared := fs.Bool("local-keyset-shared", false, "local provider on several control-plane nodes: assert that every node reads the same keyset file (shared storage)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	// With --metrics-textfile, a run leaves its outcome in the file
	// whatever stops it from here on.
	var mf metricsFileRun
	if *metricsFile != "" {
		defer func() { err = mf.write(ctx, *metricsFile, *namespace, *name, *minAge, err) }()
	}
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	log, err := logging.New(stderr, cfg.Log.Format, cfg.Log.Level)
	if err != nil {
		return err
	}
	mf.log = log.Named("rotate")
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush
	hooks, err := crashHooks(os.Getenv(CrashEnv), deps.crash, log.Named("rotate"))
	if err != nil {
		return err
	}
	resources, err := res.list()
	if err != nil {
		return err
	}
	progressOut, progressInterval, err := rf.progressOutput(stderr)
	if err != nil {
		return err
	}

	pluginHTTP, pluginScheme, err := plugin.client()
	if err != nil {
		return err
	}
	store, err := rotationProvider(ctx, cfg)
	if err != nil {
		return err
	}
	clientQPS, clientBurst := rf.clientRate()
	cc, err := deps.clients(*kubeconfig, apiEndpoints, clientQPS, clientBurst)
	if err != nil {
		return err
	}
	mf.client = cc.client
	ranger, closeEtcd, err := deps.dial(etcd)
	if err != nil {
		return err
	}
	defer closeEtcd()
	if len(apiEndpoints) == 0 && cc.apiserver == nil && ranger != nil {
		log.Named("rotate").Warn("the kubeconfig trusts no CA of its own (insecure-skip-tls-verify, or the system roots), so the canary proves its server only, not each apiserver of the kubernetes EndpointSlices (their addresses come from the cluster, and the credentials must not go to whoever answers them); name the apiservers with --apiserver-endpoints")
	}
	reg, stopMetrics, err := startMetrics(*metricsAddr)
	if err != nil {
		return err
	}
	defer stopMetrics()
	r, err := rotation.New(rotation.Config{
		Client: cc.client, Dynamic: cc.dynamic, REST: cc.rest, APIServers: cc.apiservers, APIServerClient: cc.apiserver,
		Namespace: *namespace, Name: *name,
		Provider: store, ProviderName: *res.providerName, Resources: resources,
		PluginEndpoints: pluginEndpoints, PluginPort: *pluginPort, PluginScheme: pluginScheme, HTTPClient: pluginHTTP,
		Etcd: ranger, EtcdPrefix: *etcd.prefix,
		MinAge: *minAge, ConvergeTimeout: *convergeTimeout, ConvergeWait: *convergeWait,
		Workers: *rf.workers, QPS: *rf.qps, Burst: *rf.burst, PageSize: *rf.pageSize, Keep: *keep,
		DryRun: *rf.dryRun, Wait: *rf.wait, Migration: rotation.Migration(*rf.migration), SVMStartTimeout: *rf.svmStart,
		LocalKeysetShared: *shared, LeaseDuration: *rf.leaseDuration, PollInterval: *rf.pollInterval,
		Logger: log.Named("rotate"), Progress: progressOut, ProgressInterval: progressInterval,
		Hooks: hooks,
	})
	if err == nil && reg != nil {
		err = r.RegisterMetrics(reg)
	}
	if err != nil {
		return err
	}
	result, err := r.Run(ctx)
	mf.result = result
	return reportRun(stdout, result, err)
}

// runFlags are the flags rotate and reencrypt share: the pace of the
// rewrites, the Lease, the migration and the progress output.
type runFlags struct {
	workers                               *int
	qps                                   *float64
	burst                                 *int
	pageSize                              *int64
	dryRun, wait                          *bool
	migration, progress                   *string
	leaseDuration, pollInterval, svmStart *time.Duration
}

// addRunFlags adds the runFlags to fs; pollHelp says what --poll-interval
// polls.
func addRunFlags(fs *flag.FlagSet, pollHelp string) *runFlags {
	return &runFlags{
		workers:       fs.Int("workers", rotation.DefaultWorkers, "parallel rewrites"),
		qps:           fs.Float64("qps", rotation.DefaultQPS, "rewrites per second at most"),
		burst:         fs.Int("burst", 0, "rewrite burst (default: --qps)"),
		pageSize:      fs.Int64("page-size", rotation.DefaultPageSize, "objects per LIST page"),
		dryRun:        fs.Bool("dry-run", false, "show what a run would do; change nothing"),
		wait:          fs.Bool("wait", false, "wait for a Lease held by another run instead of exiting with code 2"),
		migration:     fs.String("migration", string(rotation.MigrationUpdate), "update, storageversionmigration or auto (auto: StorageVersionMigration where the cluster serves it and a controller runs it, else updates)"),
		progress:      fs.String("progress", "auto", "auto, bar or log: a progress bar on a terminal, else log lines"),
		leaseDuration: fs.Duration("lease-duration", rotation.DefaultLeaseDuration, "Lease duration; a crashed run's Lease is free after it (at once on the same host)"),
		pollInterval:  fs.Duration("poll-interval", rotation.DefaultPollInterval, pollHelp),
		svmStart:      fs.Duration("svm-start-timeout", rotation.DefaultSVMStartTimeout, "with --migration auto: fall back to updates when no controller starts a StorageVersionMigration within this"),
	}
}

// clientRate returns the QPS and burst of the cluster clients: twice the
// rewrites' (at least 50 and 100), so that polls and LISTs keep room.
func (f *runFlags) clientRate() (float32, int) {
	return float32(max(50, 2**f.qps)), max(100, 2**f.burst, 2*int(*f.qps))
}

// progressOutput returns, from --progress, where the progress bar goes
// (nil: no bar) and the interval of the progress log lines.
func (f *runFlags) progressOutput(stderr io.Writer) (io.Writer, time.Duration, error) {
	var out io.Writer
	switch *f.progress {
	case "auto":
		if isTerminal(stderr) {
			out = stderr
		}
	case "bar":
		out = stderr
	case "log":
	default:
		return nil, 0, fmt.Errorf("--progress %q: want auto, bar or log", *f.progress)
	}
	if out != nil {
		return out, time.Hour, nil // the bar replaces the log lines
	}
	return nil, 10 * time.Second, nil
}

// reportRun returns the error of a run (exit code 2 when another run holds
// the Lease) or prints its plan and message.
func reportRun(stdout io.Writer, result *rotation.Result, err error) error {
	var held *rotation.LeaseHeldError
	switch {
	case errors.As(err, &held):
		return &exitError{code: leaseHeldExitCode, err: err}
	case err != nil:
		return err
	}
	for _, line := range result.Plan {
		fmt.Fprintln(stdout, line)
	}
	fmt.Fprintln(stdout, result.Message)
	return nil
}

// startMetrics serves a new registry on addr/metrics until stop is called;
// with no addr it returns a nil registry and a stop that does nothing.
func startMetrics(addr string) (reg *prometheus.Registry, stop func(), err error) {
	if addr == "" {
		return nil, func() {}, nil
	}
	reg = prometheus.NewRegistry()
	stop, err = serveMetrics(addr, reg)
	if err != nil {
		return nil, nil, err
	}
	return reg, stop, nil
}

// serveMetrics serves reg on addr/metrics until stop is called.
func serveMetrics(addr string, reg *prometheus.Registry) (stop func(), err error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

// rotationProvider builds the key store from the plugin's configuration.
// Unlike serve, it never creates key material: rotate must change the
// material the plugin uses.
func rotationProvider(ctx context.Context, cfg config.Config) (provider.Provider, error) {
	p, err := registry.Builtin().Open(ctx, cfg, provider.OpenOptions{})
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w (rotate changes the plugin's keyset: give it the plugin's --config or --local-keyset)", err)
	}
	return p, err
}

// joinOr joins ss, or returns none when empty.
func joinOr(ss []string, none string) string {
	if len(ss) == 0 {
		return none
	}
	return strings.Join(ss, ", ")
}
