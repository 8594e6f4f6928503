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
	"unicode"

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
	// URL is the plugin's HTTP base; its status is at URL/status and its
	// refresh at URL/refresh.
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
	// Port is the plugins' HTTP port on discovered Nodes, and Scheme the
	// scheme of their URLs: http (the default), or https when the plugins
	// serve TLS.
	Port   int
	Scheme string
	// HTTP asks them.
	HTTP *http.Client
}

// pluginSource is the PluginSource of the Runner's Config.
func (r *Runner) pluginSource() PluginSource {
	return PluginSource{Client: r.cfg.Client, Endpoints: r.cfg.PluginEndpoints, Port: r.cfg.PluginPort, Scheme: r.cfg.PluginScheme, HTTP: r.cfg.HTTPClient}
}

// Targets lists the plugins: Endpoints, or every control-plane Node's
// InternalIP at Port, over Scheme.
func (s PluginSource) Targets(ctx context.Context) ([]PluginTarget, error) {
	if len(s.Endpoints) > 0 {
		out := make([]PluginTarget, 0, len(s.Endpoints))
		for _, ep := range s.Endpoints {
			ep = strings.TrimRight(ep, "/")
			if !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
				return nil, fmt.Errorf("plugin endpoint %q: want http://HOST:PORT or https://HOST:PORT", ep)
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
	scheme := s.Scheme
	if scheme == "" {
		scheme = "http"
	}
	var out []PluginTarget
	for _, n := range nodes.Items {
		ip := nodeIP(&n)
		if ip == "" {
			return nil, fmt.Errorf("control-plane Node %s has no InternalIP address; name the plugins with --plugin-endpoints", n.Name)
		}
		out = append(out, PluginTarget{Node: n.Name, URL: scheme + "://" + net.JoinHostPort(ip, strconv.Itoa(port))})
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
	return s.each(ctx, targets, func(ctx context.Context, hc *http.Client, t PluginTarget) (*admin.Status, error) {
		return askPlugin(ctx, hc, http.MethodGet, t.URL, "/status")
	})
}

// Refresh asks every target, concurrently, to re-read its key store's
// current version now (POST URL/refresh) instead of at its next poll, and
// returns what each answered: its /status document after the refresh, or
// Err. Err is advisory: a plugin without the endpoint (404, older than this
// tool), one that refreshed moments ago (429) or one whose key store failed
// (503) still picks up the new version at its next poll, so callers should go
// on waiting with Ask rather than stop.
func (s PluginSource) Refresh(ctx context.Context, targets []PluginTarget) []PluginStatus {
	return s.each(ctx, targets, func(ctx context.Context, hc *http.Client, t PluginTarget) (*admin.Status, error) {
		st, err := askPlugin(ctx, hc, http.MethodPost, t.URL, "/refresh")
		var ae *answerError
		if !errors.As(err, &ae) {
			return st, err
		}
		switch ae.code {
		case http.StatusNotFound:
			return nil, fmt.Errorf("%w: the plugin has no /refresh endpoint (older than this tool); it picks up the new key version at its next poll", ae)
		case http.StatusTooManyRequests:
			wait := ""
			if ae.retryAfter != "" {
				wait = fmt.Sprintf(" (Retry-After %s s)", ae.retryAfter)
			}
			return nil, fmt.Errorf("%w: the plugin refreshed moments ago and limits how often it asks its key store%s", ae, wait)
		default:
			if ae.body != "" {
				return nil, fmt.Errorf("%w: %s", ae, ae.body)
			}
			return nil, ae
		}
	})
}

// each runs ask for every target concurrently and collects the answers in
// the targets' order.
func (s PluginSource) each(ctx context.Context, targets []PluginTarget, ask func(context.Context, *http.Client, PluginTarget) (*admin.Status, error)) []PluginStatus {
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
			st, err := ask(ctx, hc, t)
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

// answerError is a plugin's answer other than 200.
type answerError struct {
	method, path string
	code         int
	status       string // "503 Service Unavailable"
	retryAfter   string // the Retry-After header, if any
	body         string // the first line of a plain-text body, shortened
}

func (e *answerError) Error() string {
	msg := fmt.Sprintf("%s %s: %s", e.method, e.path, e.status)
	switch e.code {
	case http.StatusUnauthorized:
		msg += ": the plugin's admin port admits a client certificate of its CA or its bearer token (--plugin-ca-file with --plugin-cert-file and --plugin-key-file, or --plugin-token-file)"
	case http.StatusForbidden:
		msg += ": the plugin does not admit this client certificate's identity (its CommonName)"
	}
	return msg
}

// maxErrorBody bounds how much of a plugin's plain-text error is quoted.
const maxErrorBody = 300

// askPlugin sends method to base+path and parses the /status document the
// plugin answers with (GET /status and POST /refresh answer the same one).
// An answer other than 200 is an *answerError.
func askPlugin(ctx context.Context, hc *http.Client, method, base, path string) (*admin.Status, error) {
	req, err := http.NewRequestWithContext(ctx, method, base+path, nil)
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
		return nil, fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		ae := &answerError{method: method, path: path, code: resp.StatusCode, status: resp.Status, retryAfter: resp.Header.Get("Retry-After")}
		if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
			ae.body = firstLine(body, maxErrorBody)
		}
		return nil, ae
	}
	var st admin.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("%s %s: not a kms-plugin status document: %w", method, path, err)
	}
	if st.KeyIDHash == "" && st.KeyID != "" {
		st.KeyIDHash = envelope.KeyIDHash(st.KeyID)
	}
	return &st, nil
}

// firstLine returns b's first line, trimmed and cut to at most n bytes of
// printable text.
func firstLine(b []byte, n int) string {
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return -1
	}, strings.TrimSpace(line))
	if len(line) > n {
		line = strings.ToValidUTF8(line[:n], "") + "..."
	}
	return line
}
