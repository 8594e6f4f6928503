package rotation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// canaryResource is secrets or configmaps, whichever the rotation covers.
func (r *Runner) canaryResource() string { return canaryResourceOf(r.cfg.Resources) }

// canaryResourceOf is secrets or configmaps, whichever of resources has
// it first in that order, or "".
func canaryResourceOf(resources []string) string {
	for _, res := range []string{"secrets", "configmaps"} {
		if slices.Contains(resources, res) {
			return res
		}
	}
	return ""
}

// writesCanary reports whether converge proves the apiservers with the
// canary (it needs etcd to read it back, and a canary resource).
func (r *Runner) writesCanary() bool { return r.cfg.Etcd != nil && r.canaryResource() != "" }

// discoversAPIServers reports whether preflight finds the apiservers the
// canary is written through in the kubernetes EndpointSlices.
func (r *Runner) discoversAPIServers() bool {
	return r.writesCanary() && len(r.cfg.APIServers) == 0 && r.cfg.APIServerClient != nil
}

// probeTimeout bounds preflight's request to each apiserver.
const probeTimeout = 10 * time.Second

// canaryAPIServers returns the apiservers converge writes the canary
// through, each of which answered a GET /version: Config.APIServers;
// else, when discovering, one client per apiserver cp found in the
// kubernetes EndpointSlices; else Client alone. An apiserver that does not
// answer stops the run here, before the key changes, since converge could
// not prove it later.
func (r *Runner) canaryAPIServers(ctx context.Context, cp controlPlane) ([]APIServer, error) {
	apis := r.cfg.APIServers
	def := []APIServer{{Name: "default", Client: r.cfg.Client}}
	if !r.writesCanary() {
		return def, nil
	}
	if len(apis) == 0 {
		if !r.discoversAPIServers() {
			return def, nil
		}
		if cp.apiserversErr != nil || len(cp.apiservers) == 0 {
			why := "they list no apiserver (are the apiservers run with --endpoint-reconciler-type=none?)"
			if cp.apiserversErr != nil {
				why = cp.apiserversErr.Error()
			}
			r.log.Warn("cannot find the apiservers in the kubernetes EndpointSlices, so the canary proves the kubeconfig's server only; name every apiserver with --apiserver-endpoints",
				zap.String("service", KubernetesNamespace+"/"+KubernetesService), zap.String("why", why))
			return def, nil
		}
		for _, hp := range cp.apiservers {
			host := "https://" + hp
			c, err := r.cfg.APIServerClient(host)
			if err != nil {
				return nil, fmt.Errorf("apiserver %s (from the %s/%s EndpointSlices): %w", host, KubernetesNamespace, KubernetesService, err)
			}
			apis = append(apis, APIServer{Name: host, Client: c})
		}
	}
	var down []string
	for _, a := range apis {
		if err := probe(ctx, a); err != nil {
			down = append(down, fmt.Sprintf("%s: %v", a.Name, err))
		}
	}
	if len(down) > 0 {
		return nil, fmt.Errorf("converge writes the canary through every apiserver, and not every one answers, nothing was changed: %s; check it, or name the apiservers rotate can reach with --apiserver-endpoints", strings.Join(down, "; "))
	}
	return apis, nil
}

// probe asks a for GET /version, which every authenticated client may.
func probe(ctx context.Context, a APIServer) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	d := a.Client.Discovery()
	if rc := d.RESTClient(); rc != nil {
		return rc.Get().AbsPath("/version").Do(ctx).Error()
	}
	_, err := d.ServerVersion()
	return err
}

// nudgeReadyz asks a's /readyz. kube-apiserver asks its KMS plugins for
// their Status (and so learns a new key_id) when a health check runs and
// its cached answer is older than 20 s, else only once a minute; kubelets
// probing /readyz every second keep that at 20 s, and so does this on
// clusters whose probes are slower. The answer does not matter.
func nudgeReadyz(ctx context.Context, a APIServer) {
	rc := a.Client.Discovery().RESTClient()
	if rc == nil {
		return
	}
	_ = rc.Get().AbsPath("/readyz").Do(ctx).Error()
}

// waitCanary writes the canary through a until etcd shows it under the new
// key_id, within cctx (converge's timeout).
func (x *run) waitCanary(cctx, ctx context.Context, a APIServer, resource string) error {
	scanner := etcdscan.New(x.cfg.Etcd, 1)
	key := etcdscan.KeyPrefixes(x.cfg.EtcdPrefix, resource)[0] + x.cfg.Namespace + "/" + CanaryName
	newHash := envelope.KeyIDHash(x.rot.NewKeyID)
	last := ""
	for {
		nudgeReadyz(cctx, a)
		got, err := x.writeCanary(cctx, a, resource, scanner, key)
		var perm *permanentError
		switch {
		case errors.As(err, &perm):
			return err
		case err == nil && got == x.rot.NewKeyID:
			x.log.Info("apiserver encrypts with the new key_id", zap.String("apiserver", a.Name))
			return nil
		case err != nil:
			last = err.Error()
			x.log.Info("canary write failed; retrying", zap.String("apiserver", a.Name), zap.Error(err))
		default:
			last = fmt.Sprintf("it still encrypts with key_id hash %s", envelope.KeyIDHash(got))
			x.log.Info("waiting for the apiserver to pick up the new key_id", zap.String("apiserver", a.Name),
				zap.String("canaryKeyIDHash", envelope.KeyIDHash(got)), zap.String("want", newHash))
		}
		if err := sleep(cctx, x.cfg.PollInterval); err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("apiserver %s did not pick up the new key_id (hash %s) within %s: %s; kube-apiserver asks the plugin for its Status at most every 20 s (once a minute without /readyz probes), check its logs", a.Name, newHash, x.cfg.ConvergeTimeout, last)
		}
	}
}

// writeCanary writes the canary through a, then reads its key_id from etcd.
func (x *run) writeCanary(ctx context.Context, a APIServer, resource string, sc *etcdscan.Scanner, key string) (string, error) {
	data := map[string]string{"apiserver": a.Name, "written": x.now().Format(time.RFC3339Nano), "rotation": x.rot.ID}
	meta := metav1.ObjectMeta{Name: CanaryName, Namespace: x.cfg.Namespace,
		Labels: map[string]string{"app.kubernetes.io/name": "kms-plugin", "app.kubernetes.io/component": "rotation-canary"}}
	var err error
	switch resource {
	case "secrets":
		secrets := a.Client.CoreV1().Secrets(x.cfg.Namespace)
		var s *corev1.Secret
		s, err = secrets.Get(ctx, CanaryName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = secrets.Create(ctx, &corev1.Secret{ObjectMeta: meta, StringData: data}, metav1.CreateOptions{FieldManager: FieldManager})
		case err == nil:
			s.StringData = data
			_, err = secrets.Update(ctx, s, metav1.UpdateOptions{FieldManager: FieldManager})
		}
	default:
		cms := a.Client.CoreV1().ConfigMaps(x.cfg.Namespace)
		var c *corev1.ConfigMap
		c, err = cms.Get(ctx, CanaryName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: data}, metav1.CreateOptions{FieldManager: FieldManager})
		case err == nil:
			c.Data = data
			_, err = cms.Update(ctx, c, metav1.UpdateOptions{FieldManager: FieldManager})
		}
	}
	if err != nil {
		return "", fmt.Errorf("write canary %s %s/%s through %s: %w", resource, x.cfg.Namespace, CanaryName, a.Name, err)
	}
	raw, ok, err := sc.Get(ctx, key)
	if err != nil {
		return "", err // etcdscan names the key
	}
	if !ok {
		return "", &permanentError{fmt.Errorf("the canary written through %s is not in etcd at %s: check --etcd-prefix and --etcd-endpoints", a.Name, key)}
	}
	e, err := etcdscan.Classify(raw)
	if err != nil {
		return "", &permanentError{fmt.Errorf("canary at %s: %w", key, err)}
	}
	if e.Kind != etcdscan.KindKMSv2 || e.Provider != x.cfg.ProviderName {
		how := "in clear"
		if e.Encrypted() {
			how = fmt.Sprintf("by %s provider %q", e.Kind, e.Provider)
		}
		return "", &permanentError{fmt.Errorf("the canary written through %s is stored %s, not by kms provider %q: check --provider-name, and that the EncryptionConfiguration encrypts %s with it first", a.Name, how, x.cfg.ProviderName, resource)}
	}
	return e.KeyID, nil
}
