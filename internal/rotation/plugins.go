package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
)

// PluginTarget is one plugin's status endpoint.
type PluginTarget struct {
	// Node is the Node name when discovered, else the endpoint.
	Node string `json:"node"`
	// URL is the plugin's HTTP base; its status is at URL/status.
	URL string `json:"url"`
}

// PluginStatus is what one plugin answered.
type PluginStatus struct {
	PluginTarget
	// Status is the plugin's /status document; nil when Err is set.
	Status *admin.Status `json:"status,omitempty"`
	// Err says why the plugin could not be asked.
	Err string `json:"error,omitempty"`
}

// Healthy reports whether the plugin answered and is ready.
func (p PluginStatus) Healthy() bool { return p.Err == "" && p.Status != nil && p.Status.Ready }

// KeyID returns the plugin's key_id, or "" when it did not answer.
func (p PluginStatus) KeyID() string {
	if p.Status == nil {
		return ""
	}
	return p.Status.KeyID
}

// describe explains the plugin's state in a message.
func (p PluginStatus) describe() string {
	switch {
	case p.Err != "":
		return fmt.Sprintf("%s (%s) is down: %s", p.Node, p.URL, p.Err)
	case !p.Status.Ready:
		why := p.Status.LastError
		if why == "" {
			why = "its key store has not answered recently"
		}
		return fmt.Sprintf("%s (%s) is not ready: %s", p.Node, p.URL, why)
	default:
		return fmt.Sprintf("%s (%s) is on key_id hash %s (remote version %s)", p.Node, p.URL, p.Status.KeyIDHash, p.Status.RemoteVersion)
	}
}

// PluginSource finds and asks the plugins.
type PluginSource struct {
	// Client lists the control-plane Nodes when Endpoints is empty.
	Client kubernetes.Interface
	// Endpoints are explicit plugin HTTP bases.
	Endpoints []string
	// Port is the plugins' HTTP port on discovered Nodes.
	Port int
	// HTTP asks them.
	HTTP *http.Client
}

// Targets lists the plugins: Endpoints, or every control-plane Node's
// InternalIP at Port.
func (s PluginSource) Targets(ctx context.Context) ([]PluginTarget, error) {
	if len(s.Endpoints) > 0 {
		out := make([]PluginTarget, 0, len(s.Endpoints))
		for _, ep := range s.Endpoints {
			ep = strings.TrimRight(ep, "/")
			if !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
				return nil, fmt.Errorf("plugin endpoint %q: want http://HOST:PORT", ep)
			}
			out = append(out, PluginTarget{Node: ep, URL: ep})
		}
		return out, nil
	}
	if s.Client == nil {
		return nil, errors.New("no plugin endpoints and no cluster to discover them in")
	}
	nodes, err := s.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: ControlPlaneLabel})
	if err != nil {
		return nil, fmt.Errorf("list control-plane Nodes (label %s): %w", ControlPlaneLabel, err)
	}
	if len(nodes.Items) == 0 {
		return nil, fmt.Errorf("no Node is labelled %s; name the plugins with --plugin-endpoints", ControlPlaneLabel)
	}
	port := s.Port
	if port == 0 {
		port = DefaultPluginPort
	}
	var out []PluginTarget
	for _, n := range nodes.Items {
		ip := nodeIP(&n)
		if ip == "" {
			return nil, fmt.Errorf("control-plane Node %s has no InternalIP address; name the plugins with --plugin-endpoints", n.Name)
		}
		out = append(out, PluginTarget{Node: n.Name, URL: "http://" + net.JoinHostPort(ip, strconv.Itoa(port))})
	}
	return out, nil
}

func nodeIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP && a.Address != "" {
			return a.Address
		}
	}
	return ""
}

// Ask gets every target's /status, concurrently.
func (s PluginSource) Ask(ctx context.Context, targets []PluginTarget) []PluginStatus {
	hc := s.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	out := make([]PluginStatus, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = PluginStatus{PluginTarget: t}
			st, err := getStatus(ctx, hc, t.URL)
			if err != nil {
				out[i].Err = err.Error()
				return
			}
			out[i].Status = st
		}()
	}
	wg.Wait()
	return out
}

func getStatus(ctx context.Context, hc *http.Client, base string) (*admin.Status, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /status: %s", resp.Status)
	}
	var st admin.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("GET /status: not a kms-plugin status document: %w", err)
	}
	if st.KeyIDHash == "" && st.KeyID != "" {
		st.KeyIDHash = envelope.KeyIDHash(st.KeyID)
	}
	return &st, nil
}
