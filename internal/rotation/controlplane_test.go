package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// countingStore is the cluster's local keyset that counts Rotate calls.
type countingStore struct {
	*local.Provider
	rotates atomic.Int64
}

func (s *countingStore) Rotate(ctx context.Context) (string, error) {
	s.rotates.Add(1)
	return s.Provider.Rotate(ctx)
}

// sharedStore is the local keyset presented as a store every node shares
// (as a vault is): not provider.NodeLocal.
type sharedStore struct{ *local.Provider }

func (sharedStore) NodeLocal() bool { return false }

var (
	_ provider.Rotator = (*countingStore)(nil)
	_ provider.Rotator = sharedStore{}
)

// addControlPlaneNodes registers Nodes labelled as the control plane.
func addControlPlaneNodes(t *testing.T, c *cluster, names ...string) {
	t.Helper()
	for i, n := range names {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{ControlPlaneLabel: ""}},
			Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("10.0.0.%d", i+1)}}},
		}
		if _, err := c.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// addKubernetesEndpointSlice writes the EndpointSlice kube-apiserver keeps
// for the kubernetes Service, listing addrs on port 6443.
func addKubernetesEndpointSlice(t *testing.T, c *cluster, name string, addrs ...string) {
	t.Helper()
	port, proto, portName := int32(6443), corev1.ProtocolTCP, "https"
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port, Protocol: &proto}},
	}
	for _, a := range addrs {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}})
	}
	if _, err := c.client.DiscoveryV1().EndpointSlices("default").Create(context.Background(), es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// forbid makes the fake apiserver refuse verb on resource, as RBAC would.
func forbid(c *cluster, verb, resource string) {
	c.client.PrependReactor(verb, resource, func(a k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: a.GetResource().Group, Resource: resource}, "",
			errors.New(`User "system:serviceaccount:kube-system:kms-plugin-rotation" cannot `+verb+` resource "`+resource+`"`))
	})
}

// TestLocalRefusedOnSeveralControlPlaneNodes attacks the node-local
// refusal that counted only --plugin-endpoints: the shipped CronJob names
// one plugin (its own node's, on loopback), so a control plane of three
// nodes with a keyset file each looked like a single node, and rotate
// added a key to one node's keyset only. The nodes are counted from the
// cluster (control-plane Nodes, the kubernetes EndpointSlice); any count
// above one refuses before anything changes, and so does a count that
// cannot be made.
func TestLocalRefusedOnSeveralControlPlaneNodes(t *testing.T) {
	for _, tt := range []struct {
		name  string
		setup func(t *testing.T, c *cluster)
		want  []string
	}{
		{
			name:  "three control-plane Nodes",
			setup: func(t *testing.T, c *cluster) { addControlPlaneNodes(t, c, "cp-a", "cp-b", "cp-c") },
			want:  []string{"refusing to rotate the local provider: the control plane has 3 nodes (cp-a, cp-b, cp-c)", "--plugin-endpoints names 1 plugin", "--local-keyset-shared"},
		},
		{
			name: "three apiservers in the kubernetes EndpointSlice, no Node labelled",
			setup: func(t *testing.T, c *cluster) {
				addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1", "10.0.0.2", "10.0.0.3")
			},
			want: []string{"refusing to rotate the local provider: the control plane has 3 apiservers (10.0.0.1:6443, 10.0.0.2:6443, 10.0.0.3:6443)"},
		},
		{
			name: "one Node labelled, two apiservers",
			setup: func(t *testing.T, c *cluster) {
				addControlPlaneNodes(t, c, "cp-a")
				addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1", "10.0.0.2")
			},
			want: []string{"the control plane has 1 node (cp-a) and 2 apiservers (10.0.0.1:6443, 10.0.0.2:6443)"},
		},
		{
			name:  "Nodes cannot be listed",
			setup: func(t *testing.T, c *cluster) { forbid(c, "list", "nodes") },
			want:  []string{"refusing to rotate the local provider: cannot count the control-plane nodes", "forbidden", "list on nodes"},
		},
		{
			name:  "EndpointSlices cannot be listed",
			setup: func(t *testing.T, c *cluster) { forbid(c, "list", "endpointslices") },
			want:  []string{"refusing to rotate the local provider: cannot count the control-plane nodes", "endpointslices"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 3, plugins: 1})
			store := &countingStore{Provider: c.provider}
			tt.setup(t, c)
			before, err := os.ReadFile(c.keyset)
			if err != nil {
				t.Fatal(err)
			}
			for _, dry := range []bool{false, true} {
				cfg := c.config()
				cfg.Provider, cfg.DryRun = store, dry
				_, err := runOnce(t, c.runner(cfg))
				var se *StageError
				if !errors.As(err, &se) || se.Stage != StagePreflight {
					t.Fatalf("dry run %v: %v; want a preflight refusal", dry, err)
				}
				for _, w := range tt.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("dry run %v: refusal %q does not say %q", dry, err, w)
					}
				}
			}
			if n := store.rotates.Load(); n != 0 {
				t.Errorf("the key store was rotated %d times", n)
			}
			after, err := os.ReadFile(c.keyset)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(before, after) {
				t.Errorf("the keyset file changed")
			}
			if n := c.writes.Load(); n != 0 {
				t.Errorf("%d objects rewritten", n)
			}
		})
	}
}

// TestSeveralControlPlaneNodesAllowed: the node count stops only a
// node-local store whose sharing nobody asserted.
func TestSeveralControlPlaneNodesAllowed(t *testing.T) {
	for _, tt := range []struct {
		name  string
		setup func(t *testing.T, c *cluster, cfg *Config)
	}{
		{"local, shared keyset asserted", func(t *testing.T, c *cluster, cfg *Config) {
			addControlPlaneNodes(t, c, "cp-a", "cp-b", "cp-c")
			cfg.LocalKeysetShared = true
		}},
		{"local, shared keyset asserted, Nodes cannot be listed", func(t *testing.T, c *cluster, cfg *Config) {
			forbid(c, "list", "nodes")
			forbid(c, "list", "endpointslices")
			cfg.LocalKeysetShared = true
		}},
		{"shared store on three nodes", func(t *testing.T, c *cluster, cfg *Config) {
			addControlPlaneNodes(t, c, "cp-a", "cp-b", "cp-c")
			addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1", "10.0.0.2", "10.0.0.3")
			cfg.Provider = sharedStore{c.provider}
		}},
		{"shared store, nothing can be listed", func(t *testing.T, c *cluster, cfg *Config) {
			forbid(c, "list", "nodes")
			forbid(c, "list", "endpointslices")
			cfg.Provider = sharedStore{c.provider}
		}},
		{"local on a single node", func(t *testing.T, c *cluster, cfg *Config) {
			addControlPlaneNodes(t, c, "cp-a")
			addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1")
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 3, plugins: 1})
			cfg := c.config()
			tt.setup(t, c, &cfg)
			_, _, old := c.versions()
			if _, err := runOnce(t, c.runner(cfg)); err != nil {
				t.Fatal(err)
			}
			checkRotated(t, c, old)
		})
	}
}

// TestCanaryThroughEveryDiscoveredAPIServer attacks a converge that proved
// only the apiserver behind the kubeconfig's address (often a load
// balancer, or one node): without --apiserver-endpoints the canary is
// written through every apiserver of the kubernetes EndpointSlice, so one
// that lags on the old key_id holds the rewrite back until it catches up.
func TestCanaryThroughEveryDiscoveredAPIServer(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3})
	addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1", "10.0.0.2", "10.0.0.3")
	old := c.storeKeyID()
	var mu sync.Mutex
	writes := map[string]int{}
	cfg := c.config()
	cfg.Provider = sharedStore{c.provider}
	cfg.APIServerClient = func(host string) (kubernetes.Interface, error) {
		api := k8sfakeClient(c)
		c.addCanaryReactor(api, func() string {
			mu.Lock()
			defer mu.Unlock()
			writes[host]++
			if host == "https://10.0.0.2:6443" && writes[host] < 4 {
				return old // lags on the old key_id for three writes
			}
			return c.storeKeyID()
		})
		return api, nil
	}
	if _, err := runOnce(t, c.runner(cfg)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, h := range []string{"https://10.0.0.1:6443", "https://10.0.0.2:6443", "https://10.0.0.3:6443"} {
		if writes[h] == 0 {
			t.Errorf("no canary written through %s (writes %v)", h, writes)
		}
	}
	if writes["https://10.0.0.2:6443"] < 4 {
		t.Errorf("canary written %d times through the lagging apiserver; want at least 4", writes["https://10.0.0.2:6443"])
	}
	if note := c.state().Rotation.stage(StageConverge).Note; !strings.Contains(note, "3 apiservers") {
		t.Errorf("converge note %q; want 3 apiservers", note)
	}
}

// TestDiscoveredAPIServerDownStopsPreflight: an apiserver that the
// EndpointSlice lists but rotate cannot reach (a serving certificate
// without its IP, a firewall) stops the run before the key changes, since
// converge could never prove it.
func TestDiscoveredAPIServerDownStopsPreflight(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 3})
	addKubernetesEndpointSlice(t, c, "kubernetes", "10.0.0.1", "10.0.0.2")
	store := &countingStore{Provider: c.provider}
	cfg := c.config()
	cfg.Provider, cfg.LocalKeysetShared = store, true
	cfg.APIServerClient = func(host string) (kubernetes.Interface, error) {
		api := k8sfakeClient(c)
		if host == "https://10.0.0.2:6443" {
			api.PrependReactor("get", "version", func(k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, errors.New("x509: certificate is valid for 10.0.0.9, not 10.0.0.2")
			})
		}
		return api, nil
	}
	_, err := runOnce(t, c.runner(cfg))
	var se *StageError
	if !errors.As(err, &se) || se.Stage != StagePreflight || !strings.Contains(err.Error(), "https://10.0.0.2:6443: x509") || !strings.Contains(err.Error(), "--apiserver-endpoints") {
		t.Fatalf("run: %v; want a preflight failure naming the apiserver that does not answer", err)
	}
	if n := store.rotates.Load(); n != 0 {
		t.Errorf("the key store was rotated %d times", n)
	}
}

// TestUnreadableEndpointSliceFallsBack: without the EndpointSlices (RBAC,
// or apiservers that do not maintain them), the canary goes through the
// kubeconfig's server, as before, and a shared store still rotates.
func TestUnreadableEndpointSliceFallsBack(t *testing.T) {
	for _, tt := range []struct {
		name  string
		setup func(c *cluster)
	}{
		{"forbidden", func(c *cluster) { forbid(c, "list", "endpointslices") }},
		{"none", func(c *cluster) {}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{secrets: 3})
			tt.setup(c)
			cfg := c.config()
			cfg.Provider = sharedStore{c.provider}
			cfg.APIServerClient = func(host string) (kubernetes.Interface, error) {
				return nil, fmt.Errorf("no apiserver should be built, asked for %s", host)
			}
			if _, err := runOnce(t, c.runner(cfg)); err != nil {
				t.Fatal(err)
			}
			if note := c.state().Rotation.stage(StageConverge).Note; !strings.Contains(note, "1 apiserver (default;") {
				t.Errorf("converge note %q; want the one default apiserver", note)
			}
		})
	}
}

// TestKubernetesEndpoints reads the slices as kube-apiserver writes them,
// and as dual-stack clusters and mirrors might: the https port, IPv6 in
// brackets, each address once, and the address type with the most.
func TestKubernetesEndpoints(t *testing.T) {
	port, other := int32(6443), int32(80)
	https, web := "https", "web"
	c := k8sfake.NewClientset(
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &web, Port: &other}, {Name: &https, Port: &port}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.2"}}, {Addresses: []string{"10.0.0.1"}}, {Addresses: []string{"10.0.0.2"}}},
		},
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes-v6", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv6,
			Ports:       []discoveryv1.EndpointPort{{Port: &port}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"fd00::1"}}},
		},
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "other", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "other"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.9.9.9"}}},
		},
	)
	got, err := kubernetesEndpoints(context.Background(), c)
	if want := []string{"10.0.0.1:6443", "10.0.0.2:6443"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("endpoints %v, %v; want %v", got, err, want)
	}
	six := k8sfake.NewClientset(&discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv6,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"fd00::1"}}},
	})
	if got, err := kubernetesEndpoints(context.Background(), six); err != nil || !slices.Equal(got, []string{"[fd00::1]:443"}) {
		t.Errorf("IPv6 endpoints %v, %v; want [fd00::1]:443", got, err)
	}
}
