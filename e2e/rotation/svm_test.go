package rotation

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestRotateStorageVersionMigration rotates with --migration auto on a
// control plane that runs a real kube-controller-manager: rotate
// sees the migrator's controller alive (its leader Lease), creates one
// StorageVersionMigration per resource and waits until the controller has
// rewritten every object; verify then finds every Secret and ConfigMap
// under the new key_id, and every object reads back unchanged.
func TestRotateStorageVersionMigration(t *testing.T) {
	e := startEnv(t, envConfig{nodes: 1, resources: []string{"secrets", "configmaps"}})
	t.Cleanup(e.h.ProbeReadyz(3 * time.Second))
	ctx := context.Background()
	cm, err := cluster.StartControllerManager(ctx, bins.controllerManager, e.dir, e.h.Kubeconfig, e.h.Client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || testing.Verbose() {
			t.Logf("----- kube-controller-manager -----\n%s", cm.Process().LogTail(60))
		}
		if err := cm.Stop(); err != nil {
			t.Errorf("stop kube-controller-manager: %v", err)
		}
	})
	e.populate(t, []string{"svm-0", "svm-1"}, 150, 50)
	plugin := e.h.Nodes[0].Plugin
	v1 := e.keyID(t)
	e.checkStored(t, v1.KeyID)

	res := e.runRotate(t, 0, nil, "--provider", "local", "--local-keyset", plugin.Keyset, "--migration", "auto")
	t.Logf("rotate: exit 0 in %v: %s", res.Duration.Round(time.Millisecond), lastLine(string(res.Stderr)))
	st := e.state(t)
	if st == nil || st.Doc.Rotation == nil || st.Doc.Rotation.Migration != "storageversionmigration" {
		t.Fatalf("state %+v: want migration storageversionmigration (kube-controller-manager runs the migrator)", st)
	}
	t.Logf("stages: %v", st.StageDurations())
	for _, p := range st.Doc.Rotation.Progress {
		if !p.Done {
			t.Errorf("state: %s not done: %+v", p.Resource, p)
		}
	}
	if !strings.Contains(string(res.Stderr), "waiting for the StorageVersionMigration") {
		t.Errorf("rotate did not wait for a StorageVersionMigration:\n%s", tail(string(res.Stderr), 20))
	}

	// The controller, not rotate, did the rewriting: each resource has a
	// StorageVersionMigration that succeeded.
	dyn, err := dynamic.NewForConfig(e.h.Nodes[0].APIServer.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	var svms *unstructured.UnstructuredList
	for _, v := range []string{"v1", "v1beta1"} {
		gvr := schema.GroupVersionResource{Group: "storagemigration.k8s.io", Version: v, Resource: "storageversionmigrations"}
		if svms, err = dyn.Resource(gvr).List(ctx, metav1.ListOptions{}); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("list StorageVersionMigrations: %v", err)
	}
	succeeded := map[string]bool{}
	for _, s := range svms.Items {
		res, _, _ := unstructured.NestedString(s.Object, "spec", "resource", "resource")
		conds, _, _ := unstructured.NestedSlice(s.Object, "status", "conditions")
		for _, c := range conds {
			m, _ := c.(map[string]any)
			if m["type"] == "Succeeded" && m["status"] == "True" {
				succeeded[res] = true
			}
		}
	}
	for _, r := range []string{"secrets", "configmaps"} {
		if !succeeded[r] {
			t.Errorf("no succeeded StorageVersionMigration for %s among %d: %v", r, len(svms.Items), succeeded)
		}
	}

	v2 := e.keyID(t)
	if v2.KeyID == v1.KeyID {
		t.Fatalf("key_id %s unchanged by rotate", v1.KeyID)
	}
	e.checkVerifyClean(t, e.verify(t, v2.KeyID, 0, "--fail-on-stale"), v2.KeyID, map[string]int{"secrets": 300, "configmaps": 100})
	e.checkStored(t, v2.KeyID)
	e.checkAPIEverywhere(t)
	checkKeyset(t, plugin.Keyset, map[string]string{v1.RemoteVersion: "enabled", v2.RemoteVersion: "enabled *"})
	t.Logf("StorageVersionMigrations: %d, succeeded for %v", len(svms.Items), succeeded)
}
