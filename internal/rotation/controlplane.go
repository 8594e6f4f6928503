package rotation

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The kubernetes Service's EndpointSlices, which kube-apiserver keeps
// listing every apiserver (with --endpoint-reconciler-type=lease, the
// default).
const (
	KubernetesNamespace = "default"
	KubernetesService   = "kubernetes"
)

// controlPlane is what the cluster itself says about its control plane,
// apart from the plugin endpoints a run was given.
type controlPlane struct {
	// nodes are the names of the Nodes labelled ControlPlaneLabel, sorted;
	// nodesErr says why they could not be listed.
	nodes    []string
	nodesErr error
	// apiservers are the apiservers (HOST:PORT) the kubernetes
	// EndpointSlices in namespace default list, sorted; apiserversErr says
	// why they could not be listed.
	apiservers    []string
	apiserversErr error
}

// readControlPlane lists the control-plane Nodes (when nodes) and the
// apiservers of the kubernetes EndpointSlices (when apiservers). A list
// that fails leaves its error in the answer, not in a return value: each
// caller decides what a missing count means.
func readControlPlane(ctx context.Context, client kubernetes.Interface, nodes, apiservers bool) controlPlane {
	var cp controlPlane
	if nodes {
		cp.nodes, cp.nodesErr = controlPlaneNodes(ctx, client)
	}
	if apiservers {
		cp.apiservers, cp.apiserversErr = kubernetesEndpoints(ctx, client)
	}
	return cp
}

func controlPlaneNodes(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	list, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: ControlPlaneLabel})
	if err != nil {
		return nil, fmt.Errorf("list Nodes labelled %s: %w", ControlPlaneLabel, err)
	}
	var names []string
	for _, n := range list.Items {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return names, nil
}

// kubernetesEndpoints returns the apiservers, HOST:PORT, that the
// EndpointSlices of the kubernetes Service in namespace default list
// (label kubernetes.io/service-name=kubernetes), sorted. Endpoints that
// are not ready are included: an apiserver that is starting still serves
// the keys it has. A cluster whose apiservers do not maintain the slice
// (--endpoint-reconciler-type=none) answers none. With slices of several
// address types (dual stack), the type with the most addresses counts.
func kubernetesEndpoints(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	list, err := client.DiscoveryV1().EndpointSlices(KubernetesNamespace).List(ctx,
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + KubernetesService})
	if err != nil {
		return nil, fmt.Errorf("list the EndpointSlices of Service %s/%s: %w", KubernetesNamespace, KubernetesService, err)
	}
	byType := map[discoveryv1.AddressType][]string{}
	for _, es := range list.Items {
		port := slicePort(es.Ports)
		for _, ep := range es.Endpoints {
			for _, a := range ep.Addresses {
				hp := net.JoinHostPort(a, strconv.Itoa(int(port)))
				if !slices.Contains(byType[es.AddressType], hp) {
					byType[es.AddressType] = append(byType[es.AddressType], hp)
				}
			}
		}
	}
	var out []string
	for _, t := range []discoveryv1.AddressType{discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6, discoveryv1.AddressTypeFQDN} {
		if len(byType[t]) > len(out) {
			out = byType[t]
		}
	}
	slices.Sort(out)
	return out, nil
}

// slicePort is the port named https, else the first one, else 443.
func slicePort(ports []discoveryv1.EndpointPort) int32 {
	port := int32(0)
	for _, p := range ports {
		switch {
		case p.Port == nil:
		case p.Name != nil && *p.Name == "https":
			return *p.Port
		case port == 0:
			port = *p.Port
		}
	}
	if port == 0 {
		return 443
	}
	return port
}

// sharingInput is what decideSharing decides from.
type sharingInput struct {
	// store is the key store's Name; nodeLocal whether its key material
	// is local to each node (provider.NodeLocal).
	store     string
	nodeLocal bool
	// shared is Config.LocalKeysetShared.
	shared bool
	// targets are the plugins the run asks; explicit when they are
	// Config.PluginEndpoints rather than discovered Nodes.
	targets  []PluginTarget
	explicit bool
	// cp counts the control plane; read only for a node-local store that
	// nobody asserted is shared.
	cp controlPlane
}

// decideSharing refuses a store whose key material is local to each node
// (provider.NodeLocal) on a control plane of several nodes, unless the
// operator asserted that every node reads the same material, and
// otherwise says how the nodes share the key. Several nodes means several
// plugins to ask, or more than one control-plane Node, or more than one
// apiserver in the kubernetes EndpointSlices; a count that could not be
// made refuses too, since a single node cannot be told from a control
// plane whose other nodes are invisible to this run. The dry run and the
// real run both decide through it.
func decideSharing(in sharingInput) (string, error) {
	if !in.nodeLocal {
		return fmt.Sprintf("%s: every node unwraps through the same key store, so each new version is usable on every node as soon as it exists", in.store), nil
	}
	const why = "each node keeps its own keyset file, so a new key made here would exist on one node only, and the other apiservers could not read what it encrypts"
	const fix = "Use a shared key store (azurekeyvault), or, if every node reads the same keyset file (shared storage), pass --local-keyset-shared"
	if in.shared {
		return fmt.Sprintf("%s provider with a shared keyset file (--local-keyset-shared)", in.store), nil
	}
	if len(in.targets) > 1 {
		return "", fmt.Errorf("refusing to rotate the %s provider with %d plugins (%s): %s. %s", in.store, len(in.targets), targetNames(in.targets), why, fix)
	}
	cp := in.cp
	var failed []string
	if cp.nodesErr != nil {
		failed = append(failed, cp.nodesErr.Error())
	}
	if cp.apiserversErr != nil {
		failed = append(failed, cp.apiserversErr.Error())
	}
	if len(failed) > 0 {
		return "", fmt.Errorf("refusing to rotate the %s provider: cannot count the control-plane nodes (%s), so this may be one of several nodes, each with its own keyset file, and a new key made here would exist on this one only. "+
			"Grant rotate list on nodes and on endpointslices in namespace %s (manifests/rotation-cronjob.yaml), or, if every node reads the same keyset file (shared storage), pass --local-keyset-shared",
			in.store, strings.Join(failed, "; "), KubernetesNamespace)
	}
	plugins := fmt.Sprintf("rotate found %s (%s)", plural(len(in.targets), "plugin"), targetNames(in.targets))
	if in.explicit {
		plugins = fmt.Sprintf("--plugin-endpoints names %s (%s)", plural(len(in.targets), "plugin"), targetNames(in.targets))
	}
	if len(cp.nodes) > 1 || len(cp.apiservers) > 1 {
		return "", fmt.Errorf("refusing to rotate the %s provider: the control plane has %s, but %s: %s. %s", in.store, describeControlPlane(cp), plugins, why, fix)
	}
	if len(cp.nodes) == 0 && len(cp.apiservers) == 0 {
		return fmt.Sprintf("%s provider on one node: no Node is labelled %s and the %s/%s EndpointSlices list no apiserver, so this relies on %s",
			in.store, ControlPlaneLabel, KubernetesNamespace, KubernetesService, plugins), nil
	}
	return fmt.Sprintf("%s provider on a single control-plane node (%s)", in.store, describeControlPlane(cp)), nil
}

// describeControlPlane says what cp counted: "3 nodes (a, b, c) and 3
// apiservers (10.0.0.1:6443, ...)".
func describeControlPlane(cp controlPlane) string {
	var parts []string
	if len(cp.nodes) > 0 {
		parts = append(parts, fmt.Sprintf("%s (%s)", plural(len(cp.nodes), "node"), strings.Join(cp.nodes, ", ")))
	}
	if len(cp.apiservers) > 0 {
		parts = append(parts, fmt.Sprintf("%s (%s)", plural(len(cp.apiservers), "apiserver"), strings.Join(cp.apiservers, ", ")))
	}
	return strings.Join(parts, " and ")
}

// plural is "1 node" or "3 nodes".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
