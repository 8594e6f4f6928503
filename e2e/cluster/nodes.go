package cluster

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ControlPlaneLabel marks control-plane Nodes, as kubeadm labels them;
// rotate counts them before it rotates a node-local key store.
const ControlPlaneLabel = "node-role.kubernetes.io/control-plane"

// RegisterControlPlaneNodes creates one Node per name, labelled
// ControlPlaneLabel, with InternalIP 127.0.0.1, as each control-plane
// node's kubelet registers itself on a real cluster. The harness runs no
// kubelet, so without these the cluster would look like it has no node
// at all. Nodes that exist already are left as they are.
func RegisterControlPlaneNodes(ctx context.Context, client kubernetes.Interface, names ...string) error {
	for _, name := range names {
		n := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
				ControlPlaneLabel:        "",
				"kubernetes.io/hostname": name,
			}},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
				{Type: corev1.NodeHostName, Address: name},
			}},
		}
		if _, err := client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("register Node %s: %w", name, err)
		}
	}
	return nil
}
