package rotation

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// manifestsDir holds the shipped manifests, relative to this package.
const manifestsDir = "../../manifests"

// cronJobArgs returns the arguments of the rotate container of the
// CronJob in manifests/file, as the shipped manifest has them.
func cronJobArgs(t *testing.T, file string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(manifestsDir, file))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(data), "\n---\n") {
		var cj struct {
			Kind string `json:"kind"`
			Spec struct {
				JobTemplate struct {
					Spec struct {
						Template struct {
							Spec struct {
								Containers []struct {
									Name string   `json:"name"`
									Args []string `json:"args"`
								} `json:"containers"`
							} `json:"spec"`
						} `json:"template"`
					} `json:"spec"`
				} `json:"jobTemplate"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &cj); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if cj.Kind != "CronJob" {
			continue
		}
		for _, c := range cj.Spec.JobTemplate.Spec.Template.Spec.Containers {
			if len(c.Args) > 0 && c.Args[0] == "rotate" {
				return c.Args
			}
		}
	}
	t.Fatalf("%s: no CronJob with a rotate container", file)
	return nil
}

// swapNodePaths replaces the value of each --FLAG=VALUE of args that swap
// names (the node's paths and ports, which the harness has elsewhere) and
// keeps every other argument as it is. A flag of swap that args lack fails
// t: the test must follow the manifest.
func swapNodePaths(t *testing.T, args []string, swap map[string]string) []string {
	t.Helper()
	out := slices.Clone(args)
	seen := map[string]bool{}
	for i, a := range out {
		flag, _, ok := strings.Cut(a, "=")
		if v, swapped := swap[flag]; ok && swapped {
			out[i], seen[flag] = flag+"="+v, true
		}
	}
	for flag := range swap {
		if !seen[flag] {
			t.Fatalf("the CronJob's args %q have no %s=...; update the test with the manifest", args, flag)
		}
	}
	return out
}

// keysetState is a keyset file's bytes and its `kms-plugin keyset list`.
type keysetState struct {
	data []byte
	list string
}

func readKeyset(t *testing.T, path string) keysetState {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	list, err := cluster.RunPlugin(context.Background(), bins.plugin, "keyset", "list", "--local-keyset", path)
	if err != nil {
		t.Fatal(err)
	}
	return keysetState{data: data, list: list}
}

// TestRotateLocalRefusedWithCronJobArgs attacks the shipped CronJob on a
// control plane of three nodes with the local provider, each node with its
// own copy of one keyset file: the CronJob names only its own node's plugin
// (--plugin-endpoints=http://127.0.0.1:8787), so a refusal that counted
// plugin endpoints saw one node, and rotate added a key to that node's
// keyset alone, leaving whatever it re-encrypted unreadable on the other
// two. rotate runs with the manifest's exact arguments (only the node's
// paths and ports swapped for the harness's) and the manifest's own RBAC,
// as its ServiceAccount: it must exit non-zero naming the three nodes,
// and no keyset may gain a key. A ServiceAccount that may not list Nodes
// is refused too, rather than trusted with a count it cannot make.
func TestRotateLocalRefusedWithCronJobArgs(t *testing.T) {
	ctx := context.Background()
	e := startEnv(t, envConfig{nodes: 3, resources: []string{"secrets"}, keysetCopies: true})
	e.populate(t, []string{"cron-0"}, 30, 0)
	k1 := make([]cluster.PluginStatus, len(e.h.Nodes))
	for i, n := range e.h.Nodes {
		st, err := n.Plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		k1[i] = st
	}

	args := e.cronJobRotateArgs(ctx, t)
	t.Logf("rotate %s", strings.Join(args[1:], " "))

	run := func(t *testing.T, want ...string) {
		t.Helper()
		before := make([]keysetState, len(e.h.Nodes))
		for i, n := range e.h.Nodes {
			before[i] = readKeyset(t, n.Plugin.Keyset)
		}
		res, err := cluster.Command{Binary: bins.plugin, Args: args, Timeout: 3 * time.Minute, LogPath: e.rotateLog}.Run(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stderr := string(res.Stderr)
		t.Logf("exit %d in %v: %s", res.ExitCode, res.Duration.Round(time.Millisecond), lastLine(stderr))
		if res.ExitCode != 1 {
			t.Errorf("rotate with the CronJob's arguments on 3 nodes: exit %d; want 1 (refused)", res.ExitCode)
		}
		for _, w := range want {
			if !strings.Contains(stderr, w) {
				t.Errorf("rotate's error does not say %q:\n%s", w, tail(stderr, 20))
			}
		}
		for i, n := range e.h.Nodes {
			after := readKeyset(t, n.Plugin.Keyset)
			if after.list != before[i].list || !bytes.Equal(after.data, before[i].data) {
				t.Errorf("%s's keyset changed:\nbefore %s\nafter  %s", n.Name, before[i].list, after.list)
			}
			st, err := n.Plugin.Status(ctx)
			if err != nil || st.KeyID != k1[i].KeyID {
				t.Errorf("%s's plugin: %+v, %v; want it on key_id %s still", n.Name, st, err, k1[i].KeyID)
			}
		}
		if st := e.state(t); st != nil && (st.Stage != "preflight" || st.Doc.Rotation == nil || st.Doc.Rotation.NewVersion != "") {
			t.Errorf("state after the refusal: stage %q; want preflight, no new version: %s", st.Stage, st.JSON)
		}
		e.checkAPIEverywhere(t)
	}

	t.Run("ThreeNodes", func(t *testing.T) {
		run(t, "refusing to rotate the local provider: the control plane has 3 nodes (node-0, node-1, node-2)",
			"--plugin-endpoints names 1 plugin", "--local-keyset-shared")
	})
	t.Run("NodesNotListable", func(t *testing.T) {
		// The ClusterRole without its nodes rule: the count cannot be
		// made, and a node-local store is refused rather than trusted.
		cr, err := e.h.Client.RbacV1().ClusterRoles().Get(ctx, "kms-plugin-rotation", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cr.Rules = slices.DeleteFunc(cr.Rules, func(r rbacv1.PolicyRule) bool { return slices.Contains(r.Resources, "nodes") })
		if _, err := e.h.Client.RbacV1().ClusterRoles().Update(ctx, cr, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		// RBAC changes reach the authorizer through its informer.
		cluster.WaitFor(ctx, t, 30*time.Second, 200*time.Millisecond, "the rotation's ServiceAccount to lose list on nodes", func() error {
			allowed, err := canListNodes(ctx, e)
			if err != nil || allowed {
				return fmt.Errorf("still allowed (%v)", err)
			}
			return nil
		})
		run(t, "refusing to rotate the local provider: cannot count the control-plane nodes", "forbidden")
	})
}

// TestRotateWithCronJobRBAC runs the shipped CronJob's exact arguments on
// a single node as the CronJob's ServiceAccount, with the manifest's RBAC
// in a real kube-apiserver (--authorization-mode=RBAC): the rights cut down
// to what the stages need (no patch, no ConfigMaps cluster-wide, list on
// Nodes and the kubernetes EndpointSlices) must still carry a whole
// rotation through preflight, converge's canary, re-encryption, verify
// and retire.
func TestRotateWithCronJobRBAC(t *testing.T) {
	ctx := context.Background()
	e := startEnv(t, envConfig{nodes: 1, resources: []string{"secrets"}})
	t.Cleanup(e.h.ProbeReadyz(3 * time.Second))
	e.populate(t, []string{"rbac-0", "rbac-1"}, 60, 0)
	v1 := e.keyID(t)
	args := e.cronJobRotateArgs(ctx, t)
	res, err := cluster.Command{Binary: bins.plugin, Args: args, Timeout: 5 * time.Minute, LogPath: e.rotateLog}.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stderr := string(res.Stderr)
	if res.ExitCode != 0 || !strings.Contains(stderr, "rotation completed") || strings.Contains(stderr, "forbidden") {
		t.Fatalf("rotate as the CronJob's ServiceAccount: exit %d; want a completed rotation and nothing forbidden:\n%s", res.ExitCode, tail(stderr, 30))
	}
	t.Logf("rotate as the CronJob's ServiceAccount: exit 0 in %v: %s", res.Duration.Round(time.Millisecond), lastLine(stderr))
	v2 := e.keyID(t)
	if v2.KeyID == v1.KeyID {
		t.Fatalf("key_id %s unchanged by rotate", v1.KeyID)
	}
	st := e.state(t)
	if st == nil || st.Doc.LastCompleted == nil || !st.Doc.LastCompleted.Verified || st.Doc.LastCompleted.NewKeyID != v2.KeyID {
		t.Fatalf("state: %+v; want the rotation to %s completed and verified", st, v2.KeyID)
	}
	e.checkVerifyClean(t, e.verify(t, v2.KeyID, 0, "--fail-on-stale"), v2.KeyID, map[string]int{"secrets": 120})
	e.checkStored(t, v2.KeyID)
	e.checkAPIEverywhere(t)
	// --keep=1: the previous version stays enabled.
	checkKeyset(t, e.h.Nodes[0].Plugin.Keyset, map[string]string{v1.RemoteVersion: "enabled", v2.RemoteVersion: "enabled *"})
	// --metrics-textfile: the outcome the rotation alerts read.
	prom, err := os.ReadFile(filepath.Join(e.dir, "kms-plugin-rotate.prom"))
	if err != nil {
		t.Fatalf("the CronJob's --metrics-textfile: %v", err)
	}
	if !strings.Contains(string(prom), "kms_plugin_rotation_last_completed_timestamp_seconds") {
		t.Errorf("the CronJob's metrics file has no last-completed timestamp:\n%s", prom)
	}
}

// canListNodes asks the apiserver whether the rotation's ServiceAccount
// may list Nodes.
func canListNodes(ctx context.Context, e *env) (bool, error) {
	sar, err := e.h.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, subjectAccessReview("list", "nodes"), metav1.CreateOptions{})
	if err != nil {
		return false, err
	}
	return sar.Status.Allowed, nil
}

// subjectAccessReview asks about verb on resource for the rotation's
// ServiceAccount.
func subjectAccessReview(verb, resource string) *authorizationv1.SubjectAccessReview {
	return &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:               "system:serviceaccount:" + cluster.RotationNamespace + ":kms-plugin-rotation",
		Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + cluster.RotationNamespace, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: verb, Resource: resource},
	}}
}

// cronJobRotateArgs applies the shipped CronJob manifest's RBAC, writes a
// kubeconfig for its ServiceAccount and node-0's plugin config, and returns
// the CronJob's exact rotate arguments with only the node's paths and
// ports swapped for the harness's. In the cluster the Job uses its service
// account's in-cluster configuration; here the same account's token, in a
// kubeconfig.
func (e *env) cronJobRotateArgs(ctx context.Context, t *testing.T) []string {
	t.Helper()
	manifest, err := os.ReadFile(filepath.Join(manifestsDir, "rotation-cronjob.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cluster.ApplyRBAC(ctx, e.h.Client, manifest); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(e.dir, "rotation-sa.kubeconfig")
	if err := cluster.WriteServiceAccountKubeconfig(ctx, e.h.Client, e.h.Nodes[0].APIServer, cluster.RotationNamespace, "kms-plugin-rotation", kubeconfig); err != nil {
		t.Fatal(err)
	}
	n0 := e.h.Nodes[0]
	config := filepath.Join(e.dir, "node-0-plugin-config.yaml")
	if err := os.WriteFile(config, fmt.Appendf(nil, "provider: local\nlocal:\n  keysetPath: %s\n", n0.Plugin.Keyset), 0o600); err != nil {
		t.Fatal(err)
	}
	args := swapNodePaths(t, cronJobArgs(t, "rotation-cronjob.yaml"), map[string]string{
		"--config":            config,
		"--encryption-config": n0.EncryptionConfig,
		"--plugin-endpoints":  n0.Plugin.URL(),
		"--etcd-endpoints":    e.h.Etcd.Endpoints(),
		"--etcd-cacert":       e.h.Etcd.Client.CAFile,
		"--etcd-cert":         e.h.Etcd.Client.CertFile,
		"--etcd-key":          e.h.Etcd.Client.KeyFile,
		"--metrics-textfile":  filepath.Join(e.dir, "kms-plugin-rotate.prom"),
	})
	return append(args, "--kubeconfig", kubeconfig)
}
