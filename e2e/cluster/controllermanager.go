package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// KubeControllerManagerVersion is the kube-controller-manager
// e2e/tools/build.sh builds (from the same module as kube-apiserver).
const KubeControllerManagerVersion = KubeAPIServerVersion

// EnvKubeControllerManagerBin names the kube-controller-manager binary.
const EnvKubeControllerManagerBin = "KUBE_CONTROLLER_MANAGER_BIN"

// KubeControllerManagerBinary returns $KUBE_CONTROLLER_MANAGER_BIN or, when
// unset, the one e2e/tools/build.sh caches. The binary must exist.
func KubeControllerManagerBinary() (string, error) {
	return cachedBinary(EnvKubeControllerManagerBin, "kube-controller-manager-"+KubeControllerManagerVersion)
}

// ControllerManager is a kube-controller-manager that runs the storage
// version migrator (and the garbage collector, which the migrator needs)
// against one kube-apiserver.
type ControllerManager struct {
	proc *Process
}

// StartControllerManager starts kube-controller-manager with the admin
// kubeconfig and waits until it holds its leader Lease
// (kube-system/kube-controller-manager), as on a kubeadm node.
func StartControllerManager(ctx context.Context, binary, dir, kubeconfig string, client kubernetes.Interface) (*ControllerManager, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	cm := &ControllerManager{proc: &Process{
		Name:         "kube-controller-manager",
		Path:         binary,
		TermSignalOK: true,
		LogPath:      filepath.Join(dir, "kube-controller-manager.log"),
		Args: []string{
			"--kubeconfig=" + kubeconfig,
			"--authentication-kubeconfig=" + kubeconfig,
			"--authorization-kubeconfig=" + kubeconfig,
			"--bind-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", port),
			"--controllers=garbage-collector-controller,storage-version-migrator-controller",
			"--leader-elect=true",
			"--profiling=false",
			"--v=2",
		},
	}}
	if err := cm.proc.Start(); err != nil {
		return nil, err
	}
	err = waitUntil(ctx, cm.proc, 2*time.Minute, 200*time.Millisecond, "kube-controller-manager to hold its leader Lease", func(ctx context.Context) (bool, error) {
		l, err := client.CoordinationV1().Leases("kube-system").Get(ctx, "kube-controller-manager", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != "", nil
	})
	if err != nil {
		_ = cm.proc.Stop()
		return nil, fmt.Errorf("%w\n%s", err, cm.proc.LogTail(30))
	}
	return cm, nil
}

// Process is the kube-controller-manager process.
func (c *ControllerManager) Process() *Process { return c.proc }

// Stop stops kube-controller-manager.
func (c *ControllerManager) Stop() error { return c.proc.Stop() }
