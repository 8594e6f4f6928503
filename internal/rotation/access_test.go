package rotation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"
)

// grant is one verb on one object (name "" for any), as RBAC checks it.
type grant struct{ group, resource, namespace, name, verb string }

func (g grant) String() string {
	name := g.name
	if name == "" {
		name = "*"
	}
	ns := g.namespace
	if ns == "" {
		ns = "(cluster)"
	}
	return fmt.Sprintf("%s %s.%s %s/%s", g.verb, g.resource, g.group, ns, name)
}

// grants expands permissions into single grants.
func grants(ps []Permission) []grant {
	var out []grant
	for _, p := range ps {
		names := p.Names
		if len(names) == 0 {
			names = []string{""}
		}
		for _, n := range names {
			for _, v := range p.Verbs {
				out = append(out, grant{p.Group, p.Resource, p.Namespace, n, v})
			}
		}
	}
	return out
}

// allows reports whether gs let a request do g: the same verb on the same
// resource, in the same namespace or cluster-wide, by name or for any.
func allows(gs []grant, g grant) bool {
	for _, h := range gs {
		if h.group == g.group && h.resource == g.resource && h.verb == g.verb &&
			(h.namespace == "" || h.namespace == g.namespace) && (h.name == "" || h.name == g.name) {
			return true
		}
	}
	return false
}

// requestsOfRuns forgets the requests seen so far, runs run with cfg twice
// and then as a dry run (the second run finds the Lease, the state and the
// canary made by the first), and returns the requests of the three runs.
func requestsOfRuns(t *testing.T, c *cluster, cfg Config, run func(Config) (*Result, error)) []grant {
	t.Helper()
	c.client.ClearActions()
	c.dyn.ClearActions()
	var used []grant
	for _, dry := range []bool{false, false, true} {
		cfg.DryRun = dry
		if _, err := run(cfg); err != nil {
			t.Fatal(err)
		}
		used = append(used, requests(c)...)
		c.client.ClearActions()
		c.dyn.ClearActions()
	}
	return used
}

// requests returns what the fake apiserver saw, as grants (creates and
// lists without a name, as RBAC sees them), discovery left out.
func requests(c *cluster) []grant {
	var out []grant
	acts := append(c.client.Actions(), c.dyn.Actions()...)
	for _, a := range acts {
		res := a.GetResource()
		if res.Group == "" && slices.Contains([]string{"resource", "version", "group"}, res.Resource) {
			continue // discovery
		}
		g := grant{group: res.Group, resource: res.Resource, namespace: a.GetNamespace(), verb: a.GetVerb()}
		switch a := a.(type) {
		case k8stesting.GetAction:
			g.name = a.GetName()
		case k8stesting.DeleteAction:
			g.name = a.GetName()
		case k8stesting.UpdateAction:
			if m, ok := metaOf(a.GetObject()); ok {
				g.name = m.GetName()
			}
		}
		out = append(out, g)
	}
	c.mu.Lock()
	for _, r := range c.listed {
		out = append(out, grant{resource: r, verb: "list"})
	}
	c.listed = nil
	c.mu.Unlock()
	return out
}

// TestPermissionsAreWhatRunsUse runs rotations the ways the manifests
// configure them and checks both directions: every request a run makes is
// one Permissions lists (so an RBAC Role built from it lets the run
// through), and every permission it lists is used (so none is granted for
// nothing). The manifests' test checks their rules against Permissions.
func TestPermissionsAreWhatRunsUse(t *testing.T) {
	for _, tt := range []struct {
		name  string
		opts  PermissionOptions
		setup func(t *testing.T, c *cluster, cfg *Config)
	}{
		{
			name: "update with etcd, plugins found from the Nodes",
			opts: PermissionOptions{Resources: []string{"secrets", "configmaps"}, Migration: MigrationUpdate, Etcd: true},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				u, err := url.Parse(c.plugins[0].srv.URL)
				if err != nil {
					t.Fatal(err)
				}
				host, port, _ := net.SplitHostPort(u.Host)
				cfg.PluginEndpoints, cfg.PluginPort = nil, atoi(t, port)
				node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp-0", Labels: map[string]string{ControlPlaneLabel: ""}},
					Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: host}}}}
				if _, err := c.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
				c.beforeUpdate = conflictOnce(c, "secrets/ns0/s000")
			},
		},
		{
			name: "update without etcd",
			opts: PermissionOptions{Resources: []string{"secrets"}, Migration: MigrationUpdate},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				cfg.Etcd = nil
				cfg.Resources = []string{"secrets"}
				c.beforeUpdate = conflictOnce(c, "secrets/ns0/s000")
			},
		},
		{
			name: "storageversionmigration",
			opts: PermissionOptions{Resources: []string{"secrets"}, Migration: MigrationSVM, Etcd: true},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				serveSVM(c)
				c.svm = true
				cfg.Resources, cfg.Migration = []string{"secrets"}, MigrationSVM
			},
		},
		{
			name: "auto, falling back to updates, configmaps only",
			opts: PermissionOptions{Resources: []string{"configmaps"}, Migration: MigrationAuto, Etcd: true},
			setup: func(t *testing.T, c *cluster, cfg *Config) {
				serveSVM(c)
				holder, now, secs := "kcm-0", metav1.NewMicroTime(time.Now()), int32(3600)
				if _, err := c.client.CoordinationV1().Leases("kube-system").Create(context.Background(), &coordinationv1.Lease{
					ObjectMeta: metav1.ObjectMeta{Name: "kube-controller-manager", Namespace: "kube-system"},
					Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
				}, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
				cfg.Resources, cfg.Migration = []string{"configmaps"}, MigrationAuto
				c.beforeUpdate = conflictOnce(c, "configmaps/ns0/c000")
			},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 4, configmaps: 2})
			cfg := c.config()
			tt.setup(t, c, &cfg)
			used := requestsOfRuns(t, c, cfg, func(cfg Config) (*Result, error) { return runOnce(t, c.runner(cfg)) })
			allowed := grants(Permissions(tt.opts))
			var denied []string
			for _, g := range used {
				if !allows(allowed, g) && !slices.Contains(denied, g.String()) {
					denied = append(denied, g.String())
				}
			}
			if len(denied) > 0 {
				t.Errorf("requests that Permissions(%+v) does not grant:\n  %s", tt.opts, strings.Join(denied, "\n  "))
			}
			for _, g := range allowed {
				if !slices.ContainsFunc(used, func(u grant) bool { return allows([]grant{g}, u) }) {
					t.Errorf("Permissions grants %s, which no run used", g)
				}
			}
		})
	}
}

// conflictOnce makes the first update of key a conflict.
func conflictOnce(c *cluster, key string) func(string, int) error {
	done := false
	return func(k string, attempt int) error {
		if k != key || done {
			return nil
		}
		done = true
		c.touch(k)
		return apierrors.NewConflict(schema.GroupResource{Resource: strings.SplitN(k, "/", 2)[0]}, k, errors.New("modified"))
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
