package cluster

import (
	"context"
	"fmt"
	"os"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"
)

// ApplyRBAC creates, or replaces, the ServiceAccounts, ClusterRoles,
// ClusterRoleBindings, Roles and RoleBindings of a multi-document
// manifest, as `kubectl apply -f` would; other kinds (the CronJob) are
// skipped.
func ApplyRBAC(ctx context.Context, client kubernetes.Interface, manifest []byte) error {
	for _, doc := range strings.Split(string(manifest), "\n---\n") {
		var head struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			return fmt.Errorf("manifest: %w", err)
		}
		var err error
		switch head.Kind {
		case "ServiceAccount":
			var o corev1.ServiceAccount
			if err = yaml.UnmarshalStrict([]byte(doc), &o); err == nil {
				err = apply(ctx, client.CoreV1().ServiceAccounts(o.Namespace), &o)
			}
		case "ClusterRole":
			var o rbacv1.ClusterRole
			if err = yaml.UnmarshalStrict([]byte(doc), &o); err == nil {
				err = apply(ctx, client.RbacV1().ClusterRoles(), &o)
			}
		case "ClusterRoleBinding":
			var o rbacv1.ClusterRoleBinding
			if err = yaml.UnmarshalStrict([]byte(doc), &o); err == nil {
				err = apply(ctx, client.RbacV1().ClusterRoleBindings(), &o)
			}
		case "Role":
			var o rbacv1.Role
			if err = yaml.UnmarshalStrict([]byte(doc), &o); err == nil {
				err = apply(ctx, client.RbacV1().Roles(o.Namespace), &o)
			}
		case "RoleBinding":
			var o rbacv1.RoleBinding
			if err = yaml.UnmarshalStrict([]byte(doc), &o); err == nil {
				err = apply(ctx, client.RbacV1().RoleBindings(o.Namespace), &o)
			}
		}
		if err != nil {
			return fmt.Errorf("manifest: %s: %w", head.Kind, err)
		}
	}
	return nil
}

// objectClient is the part of a typed client apply uses.
type objectClient[T interface {
	*E
	metav1.Object
}, E any] interface {
	Create(context.Context, T, metav1.CreateOptions) (T, error)
	Update(context.Context, T, metav1.UpdateOptions) (T, error)
	Get(context.Context, string, metav1.GetOptions) (T, error)
}

// apply creates o, or replaces the object of its name.
func apply[T interface {
	*E
	metav1.Object
}, E any](ctx context.Context, c objectClient[T, E], o T) error {
	_, err := c.Create(ctx, o, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		return err
	}
	cur, err := c.Get(ctx, o.GetName(), metav1.GetOptions{})
	if err != nil {
		return err
	}
	o.SetResourceVersion(cur.GetResourceVersion())
	_, err = c.Update(ctx, o, metav1.UpdateOptions{})
	return err
}

// WriteServiceAccountKubeconfig writes a kubeconfig for a's URL and CA
// with an hour's token of the ServiceAccount namespace/name (a
// TokenRequest), as the service account's pod would use in the cluster.
func WriteServiceAccountKubeconfig(ctx context.Context, client kubernetes.Interface, a *APIServer, namespace, name, path string) error {
	secs := int64(3600)
	tr, err := client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token of ServiceAccount %s/%s: %w", namespace, name, err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: a.URL, CertificateAuthorityData: a.CA}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: name}
	cfg.CurrentContext = "e2e"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return err
	}
	return os.Chmod(path, 0o600)
}
