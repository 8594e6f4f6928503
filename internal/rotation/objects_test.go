package rotation

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// recordedRequest is what the fake apiserver received.
type recordedRequest struct {
	method, path, query, contentType, accept string
	body                                     string
}

// rawAPIServer answers rawStore's requests from a table of path → answer.
type rawAPIServer struct {
	mu       sync.Mutex
	requests []recordedRequest
	answers  map[string]func(w http.ResponseWriter, r *http.Request)
}

func (s *rawAPIServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	s.mu.Lock()
	s.requests = append(s.requests, recordedRequest{r.Method, r.URL.EscapedPath(), r.URL.RawQuery, r.Header.Get("Content-Type"), r.Header.Get("Accept"), string(body)})
	s.mu.Unlock()
	if f, ok := s.answers[r.Method+" "+r.URL.EscapedPath()]; ok {
		f(w, r)
		return
	}
	http.NotFound(w, r)
}

func newRawTestStore(t *testing.T, gvr schema.GroupVersionResource, kind string, namespaced bool, answers map[string]func(http.ResponseWriter, *http.Request)) (rawStore, *rawAPIServer) {
	t.Helper()
	api := &rawAPIServer{answers: answers}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	cs, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return newRawStore(cs.CoreV1().RESTClient(), gvr, kind, namespaced), api
}

func writeJSON(body string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, body)
	}
}

func TestRawStoreList(t *testing.T) {
	secrets := schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
	tests := []struct {
		name      string
		gvr       schema.GroupVersionResource
		kind      string
		path      string
		body      string
		wantErr   string
		wantItems []string // namespace/name -> raw JSON
		wantRaw   []string
		wantCont  string
		wantRem   int64
	}{
		{
			name: "built-in items get apiVersion and kind",
			gvr:  secrets, kind: "Secret", path: "/api/v1/secrets",
			body:      `{"kind":"SecretList","apiVersion":"v1","metadata":{"continue":"c2","remainingItemCount":7},"items":[{"metadata":{"name":"a","namespace":"n1","resourceVersion":"5"},"data":{"k":"dg=="},"type":"Opaque"},{"metadata":{"name":"b","namespace":"n2"}}]}`,
			wantItems: []string{"n1/a", "n2/b"},
			wantRaw: []string{`{"apiVersion":"v1","kind":"Secret","metadata":{"name":"a","namespace":"n1","resourceVersion":"5"},"data":{"k":"dg=="},"type":"Opaque"}`,
				`{"apiVersion":"v1","kind":"Secret","metadata":{"name":"b","namespace":"n2"}}`},
			wantCont: "c2", wantRem: 7,
		},
		{
			name: "custom resources keep their own type and unknown fields",
			gvr:  schema.GroupVersionResource{Group: "example.com", Version: "v1beta1", Resource: "widgets"}, kind: "Widget", path: "/apis/example.com/v1beta1/widgets",
			body:      `{"apiVersion":"example.com/v1beta1","kind":"WidgetList","metadata":{},"items":[{"apiVersion":"example.com/v1beta1","kind":"Widget","metadata":{"name":"w"},"spec":{"futureField":1.50}}]}`,
			wantItems: []string{"w"},
			wantRaw:   []string{`{"apiVersion":"example.com/v1beta1","kind":"Widget","metadata":{"name":"w"},"spec":{"futureField":1.50}}`},
		},
		{
			name: "an item without a name is refused",
			gvr:  secrets, kind: "Secret", path: "/api/v1/secrets",
			body:    `{"items":[{"metadata":{}}]}`,
			wantErr: "without a name",
		},
		{
			name: "a body that is not a list is refused",
			gvr:  secrets, kind: "Secret", path: "/api/v1/secrets",
			body:    `{"items":7}`,
			wantErr: "decode secrets list",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store, api := newRawTestStore(t, tt.gvr, tt.kind, true, map[string]func(http.ResponseWriter, *http.Request){
				"GET " + tt.path: writeJSON(tt.body),
			})
			page, err := store.list(context.Background(), 500, "c1")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("list: %v; want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := api.requests[0].query; got != "continue=c1&limit=500" {
				t.Errorf("query %q", got)
			}
			if got := api.requests[0].accept; got != "application/json" {
				t.Errorf("Accept %q", got)
			}
			if len(page.items) != len(tt.wantItems) {
				t.Fatalf("%d items; want %d", len(page.items), len(tt.wantItems))
			}
			for i, o := range page.items {
				if o.path() != tt.wantItems[i] {
					t.Errorf("item %d is %s; want %s", i, o.path(), tt.wantItems[i])
				}
				if string(o.raw) != tt.wantRaw[i] {
					t.Errorf("item %d raw\n%s\nwant\n%s", i, o.raw, tt.wantRaw[i])
				}
				if !json.Valid(o.raw) {
					t.Errorf("item %d is not valid JSON", i)
				}
			}
			if page.cont != tt.wantCont {
				t.Errorf("continue %q; want %q", page.cont, tt.wantCont)
			}
			if tt.wantRem != 0 && (page.remaining == nil || *page.remaining != tt.wantRem) {
				t.Errorf("remaining %v; want %d", page.remaining, tt.wantRem)
			}
		})
	}
}

func TestRawStoreWritesBackWhatItListed(t *testing.T) {
	const listed = `{"items":[{"metadata":{"name":"system:x","resourceVersion":"9"},"rules":[]}]}`
	const fresh = `{"kind":"ClusterRole","apiVersion":"rbac.authorization.k8s.io/v1","metadata":{"name":"system:x","resourceVersion":"10"},"rules":[]}`
	conflict := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusConflict)
		io.WriteString(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409,"message":"the object has been modified"}`)
	}
	path := "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:x"
	store, api := newRawTestStore(t, schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}, "ClusterRole", false,
		map[string]func(http.ResponseWriter, *http.Request){
			"GET /apis/rbac.authorization.k8s.io/v1/clusterroles": writeJSON(listed),
			"PUT " + path: conflict,
			"GET " + path: writeJSON(fresh),
		})
	ctx := context.Background()
	page, err := store.list(ctx, 10, "")
	if err != nil {
		t.Fatal(err)
	}
	o := page.items[0]
	err = store.update(ctx, o)
	if !apierrors.IsConflict(err) {
		t.Fatalf("update: %v; want a conflict the caller can recognise", err)
	}
	put := api.requests[1]
	want := `{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{"name":"system:x","resourceVersion":"9"},"rules":[]}`
	if put.method != http.MethodPut || put.path != path || put.query != "fieldManager="+FieldManager || put.contentType != "application/json" || put.body != want {
		t.Errorf("PUT request %+v; want the listed object (with its type) at %s", put, path)
	}
	again, err := store.get(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if string(again.raw) != fresh || again.path() != "system:x" {
		t.Errorf("get: %s %s", again.path(), again.raw)
	}
}
