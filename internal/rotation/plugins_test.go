package rotation

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sfake "k8s.io/client-go/kubernetes/fake"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
)

// refreshPlugin serves a plugin's real admin handler. refresh nil stands for
// a plugin older than /refresh.
func refreshPlugin(t *testing.T, refresh func(context.Context) error) (url string, stats *atomic.Pointer[envelope.Stats]) {
	t.Helper()
	stats = &atomic.Pointer[envelope.Stats]{}
	stats.Store(&envelope.Stats{Provider: "local", KeyID: "kp1.old", RemoteVersion: "1", Ready: true})
	s, err := admin.New(admin.Config{Addr: "127.0.0.1:0", Stats: func() envelope.Stats { return *stats.Load() }, Refresh: refresh})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	return srv.URL, stats
}

func TestPluginSourceRefresh(t *testing.T) {
	tests := []struct {
		name string
		// plugin starts the plugin and returns its URL.
		plugin     func(t *testing.T) string
		wantKeyID  string
		wantErrHas []string
	}{
		{
			name: "success answers the status after the refresh",
			plugin: func(t *testing.T) string {
				var url string
				var stats *atomic.Pointer[envelope.Stats]
				url, stats = refreshPlugin(t, func(context.Context) error {
					stats.Store(&envelope.Stats{Provider: "local", KeyID: "kp1.new", RemoteVersion: "2", Ready: true})
					return nil
				})
				return url
			},
			wantKeyID: "kp1.new",
		},
		{
			name:       "404 from a plugin without the endpoint",
			plugin:     func(t *testing.T) string { url, _ := refreshPlugin(t, nil); return url },
			wantErrHas: []string{"POST /refresh: 404 Not Found", "no /refresh endpoint", "next poll"},
		},
		{
			name: "429 when refreshed moments ago",
			plugin: func(t *testing.T) string {
				url, _ := refreshPlugin(t, func(context.Context) error { return nil })
				resp, err := http.Post(url+"/refresh", "", nil) // starts the plugin's minimum interval
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				return url
			},
			wantErrHas: []string{"POST /refresh: 429 Too Many Requests", "refreshed moments ago", "Retry-After 1 s"},
		},
		{
			name: "503 quotes the plugin's reason",
			plugin: func(t *testing.T) string {
				url, _ := refreshPlugin(t, func(context.Context) error {
					return errors.New("refresh: azurekv: get key: key store unavailable")
				})
				return url
			},
			wantErrHas: []string{"POST /refresh: 503 Service Unavailable: refresh: azurekv: get key: key store unavailable"},
		},
		{
			name: "unreachable",
			plugin: func(t *testing.T) string {
				srv := httptest.NewServer(http.NotFoundHandler())
				srv.Close()
				return srv.URL
			},
			wantErrHas: []string{"/refresh", "connection refused"},
		},
		{
			name: "not a status document",
			plugin: func(t *testing.T) string {
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("<html>")) }))
				t.Cleanup(srv.Close)
				return srv.URL
			},
			wantErrHas: []string{"POST /refresh: not a kms-plugin status document"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			url := tt.plugin(t)
			// A healthy plugin next to it shows that every target is asked
			// and that answers keep the targets' order.
			other, _ := refreshPlugin(t, func(context.Context) error { return nil })
			targets := []PluginTarget{{Node: "n1", URL: url}, {Node: "n2", URL: other}}
			got := PluginSource{}.Refresh(context.Background(), targets)
			if len(got) != 2 || got[0].PluginTarget != targets[0] || got[1].PluginTarget != targets[1] {
				t.Fatalf("Refresh = %+v; want one answer per target, in order", got)
			}
			if !got[1].Healthy() || got[1].KeyID() != "kp1.old" {
				t.Errorf("healthy neighbour = %+v; want its status", got[1])
			}
			p := got[0]
			if len(tt.wantErrHas) == 0 {
				if p.Err != "" || p.KeyID() != tt.wantKeyID || p.Status.KeyIDHash != envelope.KeyIDHash(tt.wantKeyID) {
					t.Fatalf("answer = %+v (err %q); want key_id %q", p.Status, p.Err, tt.wantKeyID)
				}
				return
			}
			if p.Status != nil || p.Healthy() {
				t.Errorf("Status = %+v; want nil with an error", p.Status)
			}
			for _, want := range tt.wantErrHas {
				if !strings.Contains(p.Err, want) {
					t.Errorf("Err = %q; want it to contain %q", p.Err, want)
				}
			}
		})
	}
}

// TestPluginSourceAskMessages pins Ask's messages, which share the request
// and parsing code with Refresh.
func TestPluginSourceAskMessages(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	t.Cleanup(srv.Close)
	ok, _ := refreshPlugin(t, nil)
	got := PluginSource{}.Ask(context.Background(), []PluginTarget{{Node: "a", URL: srv.URL}, {Node: "b", URL: ok}})
	if got[0].Err != "GET /status: 503 Service Unavailable" {
		t.Errorf("Err = %q; want %q", got[0].Err, "GET /status: 503 Service Unavailable")
	}
	if !got[1].Healthy() || got[1].KeyID() != "kp1.old" || got[1].Status.KeyIDHash != envelope.KeyIDHash("kp1.old") {
		t.Errorf("answer = %+v; want the plugin's status", got[1])
	}
}

// TestPluginSourceDiscoveredScheme: plugins found from the Nodes are
// asked over https when their admin port serves TLS (a CA file was given),
// else over plain http as before.
func TestPluginSourceDiscoveredScheme(t *testing.T) {
	client := k8sfake.NewClientset(&corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "cp-0", Labels: map[string]string{ControlPlaneLabel: ""}},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.0.0.7"}}},
	})
	for scheme, want := range map[string]string{"": "http://10.0.0.7:8787", "http": "http://10.0.0.7:8787", "https": "https://10.0.0.7:8787"} {
		got, err := PluginSource{Client: client, Port: 8787, Scheme: scheme}.Targets(context.Background())
		if err != nil || len(got) != 1 || got[0].URL != want || got[0].Node != "cp-0" {
			t.Errorf("scheme %q: targets %+v, %v; want cp-0 at %s", scheme, got, err, want)
		}
	}
	if _, err := New(Config{Client: client, Provider: &countingStore{}, DryRun: true, PluginScheme: "ftp"}); err == nil || !strings.Contains(err.Error(), "plugin scheme") {
		t.Errorf("New with plugin scheme ftp: %v; want an error", err)
	}
}
