//go:build !serveonly

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/install"
	"github.com/kms-plugin/kms-plugin/internal/logging"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

func runReencrypt(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return reencryptMain(ctx, args, stdout, stderr, rotateDeps{clients: realClients, dial: dialEtcd, crash: func() { os.Exit(crashExitCode) }})
}

// reencryptMain is `kms-plugin reencrypt`.
func reencryptMain(ctx context.Context, args []string, stdout, stderr io.Writer, deps rotateDeps) error {
	fs := flag.NewFlagSet("kms-plugin reencrypt", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin reencrypt [FLAGS]

Rewrites every object of the encrypted resources through kube-apiserver, so
that each is stored by the provider now first in its EncryptionConfiguration,
then proves from etcd that none is left otherwise: the reencrypt and verify
stages of 'kms-plugin rotate' on their own, with the same pace, progress,
Lease (a rotation and a re-encryption never run at once) and state
ConfigMap NAME-state (a run that stops resumes at the next run). No key is
touched.

  --target kms      after putting the kms provider first (migrating from
                    aescbc, or encrypting objects written before install):
                    every object under kms provider --provider-name and the
                    plugins' key_id (--expect-key-id, else every plugin's
                    /status, which must agree); an object under aescbc,
                    aesgcm, secretbox, another kms provider or key_id, or in
                    plaintext is not done
  --target off-kms  after 'kms-plugin uninstall' (its first stage) on every
                    node: no object stored by kms provider --provider-name,
                    as 'kms-plugin uninstall --finalize' then checks

Objects etcd already holds as the target wants are skipped. Without
--etcd-endpoints every object is rewritten and nothing is verified.

Exit codes: 0 completed; 1 failure (nothing lost; the next run resumes); 2
another rotation or re-encryption holds the Lease, or a bad flag or argument.

Test hook: `+CrashEnv+`=reencrypt:N (or reencrypt, verify)
exits with 137 after N objects were rewritten (after the stage completed).

Flags:
`)
		fs.PrintDefaults()
	}
	def := config.Default()
	logFormat := fs.String("log-format", def.Log.Format, "json or console")
	logLevel := fs.String("log-level", def.Log.Level, "debug, info, warn or error")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
	namespace := fs.String("namespace", rotation.DefaultNamespace, "namespace of the Lease and the state ConfigMap (rotate's)")
	name := fs.String("name", rotation.DefaultName, "Lease name, rotate's; the state ConfigMap is NAME-state")
	target := fs.String("target", string(rotation.TargetKMS), "kms (every object under the kms provider and the plugins' key_id) or off-kms (none stored by the kms provider)")
	expectKeyID := fs.String("expect-key-id", "", "with --target kms: the key_id every object should be under (default: the one every plugin reports)")
	res := addResourceFlags(fs)
	var pluginEndpoints listFlag
	fs.Var(&pluginEndpoints, "plugin-endpoints", "plugin HTTP bases, comma-separated, asked for the key_id with --target kms (default: every control-plane Node's InternalIP and --plugin-port)")
	pluginPort := fs.Int("plugin-port", rotation.DefaultPluginPort, "plugin HTTP port on discovered control-plane Nodes")
	plugin := addPluginFlags(fs)
	etcd := addEtcdFlags(fs, nil)
	rf := addRunFlags(fs, "how often to poll a held Lease (--wait) and migrations")
	metricsAddr := fs.String("metrics-addr", "", "HOST:PORT to serve the re-encryption's Prometheus metrics on /metrics while it runs (empty: none)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	tgt := rotation.ReencryptTarget(*target)
	switch tgt {
	case rotation.TargetKMS:
	case rotation.TargetOffKMS:
		if *expectKeyID != "" {
			fmt.Fprintf(stderr, "kms-plugin reencrypt: --expect-key-id applies to --target kms only (run 'kms-plugin reencrypt -h' for usage)\n")
			return errUsage
		}
	default:
		fmt.Fprintf(stderr, "kms-plugin reencrypt: --target %q: want kms or off-kms (run 'kms-plugin reencrypt -h' for usage)\n", *target)
		return errUsage
	}
	log, err := logging.New(stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush
	hooks, err := reencryptCrashHooks(os.Getenv(CrashEnv), deps.crash, log.Named("reencrypt"))
	if err != nil {
		return err
	}
	resources, err := reencryptResources(res, tgt)
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
	clientQPS, clientBurst := rf.clientRate()
	cc, err := deps.clients(*kubeconfig, nil, clientQPS, clientBurst)
	if err != nil {
		return err
	}
	ranger, closeEtcd, err := deps.dial(etcd)
	if err != nil {
		return err
	}
	defer closeEtcd()
	reg, stopMetrics, err := startMetrics(*metricsAddr)
	if err != nil {
		return err
	}
	defer stopMetrics()
	re, err := rotation.NewReencrypter(rotation.Config{
		Client: cc.client, Dynamic: cc.dynamic, REST: cc.rest,
		Namespace: *namespace, Name: *name,
		ProviderName: *res.providerName, Resources: resources,
		PluginEndpoints: pluginEndpoints, PluginPort: *pluginPort, PluginScheme: pluginScheme, HTTPClient: pluginHTTP,
		Etcd: ranger, EtcdPrefix: *etcd.prefix,
		Workers: *rf.workers, QPS: *rf.qps, Burst: *rf.burst, PageSize: *rf.pageSize,
		DryRun: *rf.dryRun, Wait: *rf.wait, Migration: rotation.Migration(*rf.migration), SVMStartTimeout: *rf.svmStart,
		LeaseDuration: *rf.leaseDuration, PollInterval: *rf.pollInterval,
		Logger: log.Named("reencrypt"), Progress: progressOut, ProgressInterval: progressInterval,
		Hooks: hooks,
	}, rotation.ReencryptOptions{Target: tgt, KeyID: *expectKeyID})
	if err == nil && reg != nil {
		err = re.RegisterMetrics(reg)
	}
	if err != nil {
		return err
	}
	result, err := re.Run(ctx)
	return reportRun(stdout, result, err)
}

// reencryptResources returns the resources: --resources, else those
// --encryption-config encrypts with --provider-name first (target kms) or
// holds it at all (target off-kms: after uninstall's first stage it is no
// longer first), else secrets.
func reencryptResources(f *resourceFlags, target rotation.ReencryptTarget) ([]string, error) {
	if target != rotation.TargetOffKMS || len(f.resources) > 0 || *f.encryptionConfig == "" {
		return f.list()
	}
	data, err := os.ReadFile(*f.encryptionConfig)
	if err != nil {
		return nil, fmt.Errorf("--encryption-config: %w", err)
	}
	rs, err := install.ProtectedResources(data, *f.providerName)
	if err != nil {
		return nil, fmt.Errorf("--encryption-config %s: %w", *f.encryptionConfig, err)
	}
	if len(rs) == 0 {
		return nil, fmt.Errorf("--encryption-config %s holds no kms provider %q: check --provider-name or name the resources with --resources", *f.encryptionConfig, *f.providerName)
	}
	for _, r := range rs {
		if strings.Contains(r, "*") {
			return nil, fmt.Errorf("--encryption-config %s holds %s for %q: name the resources with --resources", *f.encryptionConfig, *f.providerName, r)
		}
	}
	return rs, nil
}

// reencryptCrashHooks are crashHooks for the stages a re-encryption runs:
// reencrypt (or reencrypt:N) and verify.
func reencryptCrashHooks(env string, crash func(), log *zap.Logger) (rotation.Hooks, error) {
	cp, err := ParseCrashPoint(env)
	if err != nil {
		return rotation.Hooks{}, fmt.Errorf("%s: %w", CrashEnv, err)
	}
	if !cp.IsZero() && cp.Stage != rotation.StageReencrypt && cp.Stage != rotation.StageVerify {
		return rotation.Hooks{}, fmt.Errorf("%s: crash point %q: reencrypt runs the stages reencrypt and verify only", CrashEnv, env)
	}
	return crashHooks(env, crash, log)
}
