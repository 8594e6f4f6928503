// Package rotation tests `kms-plugin rotate`, `verify` and `status` end to
// end: on a 3-node control plane on loopback (3 etcd members over TLS, 3
// kube-apiservers, 3 plugins sharing a key of the in-repo Azure Key Vault
// test server) and on a single node with the local keyset. Each test starts
// its own control plane; the rotate runs are real processes of the plugin
// binary, killed by its fault-injection hook where a test says so.
//
// kube-apiserver asks its KMS plugin for Status once a minute, and on a
// /readyz probe when its cached answer is older than 20 s. The tests probe
// every kube-apiserver's /readyz every few seconds, as the kubelet does on a
// real node, so a new key_id is picked up within about 20 s.
package rotation

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// bins are the binaries every test runs.
var bins struct {
	plugin, apiserver, etcd, controllerManager string
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "e2e/rotation: "+format+"\n", args...)
		return 1
	}
	plugin, cleanup, err := cluster.PluginBinary(context.Background())
	if err != nil {
		return fail("kms-plugin binary: %v", err)
	}
	defer cleanup()
	bins.plugin = plugin
	if bins.apiserver, err = cluster.KubeAPIServerBinary(); err != nil {
		return fail("kube-apiserver binary: %v", err)
	}
	if bins.etcd, err = cluster.EtcdBinary(); err != nil {
		return fail("etcd binary: %v", err)
	}
	if bins.controllerManager, err = cluster.KubeControllerManagerBinary(); err != nil {
		return fail("kube-controller-manager binary: %v", err)
	}
	return m.Run()
}
