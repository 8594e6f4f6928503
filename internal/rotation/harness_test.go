package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/encoding/protowire"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

const testProviderName = "kms-plugin"

// fakeEtcd is an etcdscan.Ranger over a map, safe for concurrent use.
type fakeEtcd struct {
	mu     sync.Mutex
	kv     map[string][]byte
	rev    int64
	ranges atomic.Int64
	err    error
}

var _ etcdscan.Ranger = (*fakeEtcd)(nil)

func newFakeEtcd() *fakeEtcd { return &fakeEtcd{kv: map[string][]byte{}, rev: 1} }

func (f *fakeEtcd) put(key string, value []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kv[key] = value
	f.rev++
}

func (f *fakeEtcd) del(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.kv, key)
	f.rev++
}

func (f *fakeEtcd) get(key string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.kv[key]
}

func (f *fakeEtcd) Range(_ context.Context, start, end string, _, limit int64) ([]etcdscan.KeyValue, bool, int64, error) {
	f.ranges.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, false, 0, f.err
	}
	var keys []string
	for k := range f.kv {
		if k >= start && k < end {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	more := false
	if limit > 0 && int64(len(keys)) > limit {
		keys, more = keys[:limit], true
	}
	out := make([]etcdscan.KeyValue, len(keys))
	for i, k := range keys {
		out[i] = etcdscan.KeyValue{Key: []byte(k), Value: f.kv[k]}
	}
	return out, more, f.rev, nil
}

// storedValue is a KMS v2 value as kube-apiserver writes it.
func storedValue(providerName, keyID string) []byte {
	b := []byte(etcdscan.KMSv2Prefix(providerName))
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("ciphertext"))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendString(b, keyID)
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("dek-seed"))
	b = protowire.AppendTag(b, 5, protowire.VarintType)
	b = protowire.AppendVarint(b, 1)
	return b
}

// cluster simulates kube-apiserver (objects, no-op update semantics,
// conflicts), etcd, and the plugins' /status.
type cluster struct {
	t        *testing.T
	client   *k8sfake.Clientset
	dyn      *dynamicfake.FakeDynamicClient
	etcd     *fakeEtcd
	keyset   string
	provider *local.Provider

	mu      sync.Mutex
	objects map[string]*unstructured.Unstructured // RESOURCE/NS/NAME
	rv      int64
	// apiKeyID is the key_id the simulated apiserver encrypts with; nil
	// follows the key store.
	apiKeyID func() string
	// beforeUpdate may fail an update (conflict, delete, ...).
	beforeUpdate func(key string, attempt int) error
	attempts     map[string]int
	writes       atomic.Int64
	lists        atomic.Int64
	// listed records the resources listed through the paging dynamic
	// client, whose LISTs the fake does not record as actions.
	listed []string
	// svm simulates a StorageVersionMigration controller: nil means none.
	svm bool
	// first is the value the simulated apiserver writes when not the kms
	// provider (its EncryptionConfiguration's first provider is aescbc or
	// identity); nil writes kms v2 values. Set under mu.
	first func() []byte

	plugins []*plugin
}

// plugin is one plugin's /status, following the shared keyset unless
// pinned.
type plugin struct {
	srv      *httptest.Server
	provider *local.Provider
	mu       sync.Mutex
	keyID    string // pinned key_id, or ""
	ready    bool
	provName string
	// polling makes the plugin report the key store version it saw at its
	// last refresh (POST /refresh, the first one at its first request),
	// like a real plugin between two polls; refreshes counts them.
	polling   bool
	seen      string
	refreshes int
}

func (p *plugin) pin(keyID string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keyID = keyID
}

func (p *plugin) setReady(ready bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ready = ready
}

func (p *plugin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	refresh := r.Method == http.MethodPost && r.URL.Path == "/refresh"
	if r.URL.Path != "/status" && !(refresh && p.polling) {
		http.NotFound(w, r)
		return
	}
	p.mu.Lock()
	keyID, ready, name, polling, seen := p.keyID, p.ready, p.provName, p.polling, p.seen
	p.mu.Unlock()
	v, err := p.provider.CurrentVersion(r.Context())
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	if polling {
		p.mu.Lock()
		if refresh || seen == "" {
			p.seen = v
			p.refreshes++
		}
		v = p.seen
		p.mu.Unlock()
	}
	if keyID == "" {
		keyID = envelope.DeriveKeyID(local.Name, v)
	}
	_ = json.NewEncoder(w).Encode(admin.Status{Provider: name, KeyID: keyID, KeyIDHash: envelope.KeyIDHash(keyID), RemoteVersion: v, Ready: ready})
}

type clusterOpts struct {
	secrets, configmaps int
	plugins             int
}

func newCluster(t *testing.T, o clusterOpts) *cluster {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "keyset.json")
	prov, err := local.New(local.Config{Path: path, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, etcd: newFakeEtcd(), keyset: path, provider: prov, objects: map[string]*unstructured.Unstructured{}, attempts: map[string]int{}}
	c.client = k8sfake.NewClientset()
	c.client.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{
		GroupVersion: "v1",
		APIResources: []metav1.APIResource{
			{Name: "secrets", Namespaced: true, Kind: "Secret", Verbs: []string{"get", "list", "update", "create"}},
			{Name: "configmaps", Namespaced: true, Kind: "ConfigMap", Verbs: []string{"get", "list", "update", "create"}},
		},
	}}
	c.addCanaryReactor(c.client, func() string { return c.currentAPIKeyID() })
	scheme := runtime.NewScheme()
	c.dyn = dynamicfake.NewSimpleDynamicClientWithCustomListKinds(scheme, map[schema.GroupVersionResource]string{
		{Version: "v1", Resource: "secrets"}:                                                         "SecretList",
		{Version: "v1", Resource: "configmaps"}:                                                      "ConfigMapList",
		{Group: svmGroup, Version: "v1", Resource: "storageversionmigrations"}:                       "StorageVersionMigrationList",
		{Group: "storagemigration.k8s.io", Version: "v1beta1", Resource: "storageversionmigrations"}: "StorageVersionMigrationList",
	})
	c.dyn.PrependReactor("*", "*", c.react)
	oldKeyID := c.currentAPIKeyID()
	for i := range o.secrets {
		c.addObject("secrets", fmt.Sprintf("ns%d", i%3), fmt.Sprintf("s%03d", i), oldKeyID)
	}
	for i := range o.configmaps {
		c.addObject("configmaps", fmt.Sprintf("ns%d", i%2), fmt.Sprintf("c%03d", i), oldKeyID)
	}
	for range max(1, o.plugins) {
		c.addPlugin()
	}
	return c
}

func (c *cluster) addPlugin() *plugin {
	prov, err := local.New(local.Config{Path: c.keyset})
	if err != nil {
		c.t.Fatal(err)
	}
	p := &plugin{provider: prov, ready: true, provName: local.Name}
	p.srv = httptest.NewServer(p)
	c.t.Cleanup(p.srv.Close)
	c.plugins = append(c.plugins, p)
	return p
}

func (c *cluster) endpoints() []string {
	var out []string
	for _, p := range c.plugins {
		out = append(out, p.srv.URL)
	}
	return out
}

// currentAPIKeyID is the key_id the simulated apiserver writes with.
func (c *cluster) currentAPIKeyID() string {
	c.mu.Lock()
	f := c.apiKeyID
	c.mu.Unlock()
	if f != nil {
		return f()
	}
	return c.storeKeyID()
}

func (c *cluster) storeKeyID() string {
	v, err := c.provider.CurrentVersion(context.Background())
	if err != nil {
		c.t.Fatal(err)
	}
	return envelope.DeriveKeyID(local.Name, v)
}

func etcdKey(resource, ns, name string) string {
	return "/registry/" + resource + "/" + ns + "/" + name
}

func (c *cluster) addObject(resource, ns, name, keyID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rv++
	kind := map[string]string{"secrets": "Secret", "configmaps": "ConfigMap"}[resource]
	o := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": kind,
		"metadata": map[string]any{"name": name, "namespace": ns, "resourceVersion": strconv.FormatInt(c.rv, 10)},
		"data":     map[string]any{"k": "dmFsdWU="},
	}}
	c.objects[resource+"/"+ns+"/"+name] = o
	c.etcd.put(etcdKey(resource, ns, name), storedValue(testProviderName, keyID))
}

func (c *cluster) deleteObject(resource, ns, name string) {
	delete(c.objects, resource+"/"+ns+"/"+name)
	c.etcd.del(etcdKey(resource, ns, name))
}

// list serves a paged LIST (the dynamic fake drops limit and continue).
func (c *cluster) list(res string, opts metav1.ListOptions) (*unstructured.UnstructuredList, error) {
	c.lists.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.listed = append(c.listed, res)
	var keys []string
	for k := range c.objects {
		if strings.HasPrefix(k, res+"/") && k > res+"/"+opts.Continue {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	list := &unstructured.UnstructuredList{Object: map[string]any{"apiVersion": "v1", "kind": "List"}}
	if opts.Limit > 0 && int64(len(keys)) > opts.Limit {
		rest := int64(len(keys)) - opts.Limit
		keys = keys[:opts.Limit]
		list.SetContinue(strings.TrimPrefix(keys[len(keys)-1], res+"/"))
		list.SetRemainingItemCount(&rest)
	}
	for _, k := range keys {
		list.Items = append(list.Items, *c.objects[k].DeepCopy())
	}
	return list, nil
}

// pagingDynamic is the dynamic fake with paged LISTs.
type pagingDynamic struct {
	dynamic.Interface
	c *cluster
}

func (p pagingDynamic) Resource(gvr schema.GroupVersionResource) dynamic.NamespaceableResourceInterface {
	return pagingResource{NamespaceableResourceInterface: p.Interface.Resource(gvr), c: p.c, res: gvr.Resource}
}

type pagingResource struct {
	dynamic.NamespaceableResourceInterface
	c   *cluster
	res string
}

func (r pagingResource) List(_ context.Context, opts metav1.ListOptions) (*unstructured.UnstructuredList, error) {
	if r.res == "storageversionmigrations" {
		return nil, errors.New("not supported")
	}
	return r.c.list(r.res, opts)
}

// react is the simulated apiserver for the dynamic client.
func (c *cluster) react(action k8stesting.Action) (bool, runtime.Object, error) {
	res := action.GetResource().Resource
	if res == "storageversionmigrations" {
		return c.reactSVM(action)
	}
	switch a := action.(type) {
	case k8stesting.GetAction:
		c.mu.Lock()
		defer c.mu.Unlock()
		o, ok := c.objects[res+"/"+a.GetNamespace()+"/"+a.GetName()]
		if !ok {
			return true, nil, apierrors.NewNotFound(action.GetResource().GroupResource(), a.GetName())
		}
		return true, o.DeepCopy(), nil
	case k8stesting.UpdateAction:
		in := a.GetObject().(*unstructured.Unstructured)
		key := res + "/" + in.GetNamespace() + "/" + in.GetName()
		c.mu.Lock()
		c.attempts[key]++
		attempt := c.attempts[key]
		hook := c.beforeUpdate
		c.mu.Unlock()
		if hook != nil {
			if err := hook(key, attempt); err != nil {
				return true, nil, err
			}
		}
		keyID := c.currentAPIKeyID()
		c.mu.Lock()
		defer c.mu.Unlock()
		cur, ok := c.objects[key]
		if !ok {
			return true, nil, apierrors.NewNotFound(action.GetResource().GroupResource(), in.GetName())
		}
		if in.GetResourceVersion() != cur.GetResourceVersion() {
			return true, nil, apierrors.NewConflict(action.GetResource().GroupResource(), in.GetName(), fmt.Errorf("the object has been modified"))
		}
		// kube-apiserver skips a no-op update unless the stored value is
		// stale.
		ek := etcdKey(res, in.GetNamespace(), in.GetName())
		e, _ := etcdscan.Classify(c.etcd.get(ek))
		value := storedValue(testProviderName, keyID)
		if c.first != nil {
			value = c.first()
			if w, _ := etcdscan.Classify(value); w.Kind == e.Kind && w.Provider == e.Provider {
				return true, cur.DeepCopy(), nil
			}
		} else if e.Kind == etcdscan.KindKMSv2 && e.KeyID == keyID {
			return true, cur.DeepCopy(), nil
		}
		c.rv++
		out := in.DeepCopy()
		out.SetResourceVersion(strconv.FormatInt(c.rv, 10))
		c.objects[key] = out
		c.etcd.put(ek, value)
		c.writes.Add(1)
		return true, out.DeepCopy(), nil
	}
	return false, nil, nil
}

// touch simulates another client writing an object (under the current key).
func (c *cluster) touch(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o := c.objects[key]
	c.rv++
	o.SetResourceVersion(strconv.FormatInt(c.rv, 10))
	parts := strings.SplitN(key, "/", 3)
	c.etcd.put(etcdKey(parts[0], parts[1], parts[2]), storedValue(testProviderName, c.storeKeyID()))
}

// reactSVM simulates the storage version migrator: a created migration
// succeeds at once after rewriting every object of its resource.
func (c *cluster) reactSVM(action k8stesting.Action) (bool, runtime.Object, error) {
	switch a := action.(type) {
	case k8stesting.CreateAction:
		o := a.GetObject().(*unstructured.Unstructured).DeepCopy()
		if c.svm {
			res, _, _ := unstructured.NestedString(o.Object, "spec", "resource", "resource")
			keyID := c.currentAPIKeyID()
			c.mu.Lock()
			for k := range c.objects {
				if strings.HasPrefix(k, res+"/") {
					parts := strings.SplitN(k, "/", 3)
					c.etcd.put(etcdKey(parts[0], parts[1], parts[2]), storedValue(testProviderName, keyID))
				}
			}
			c.mu.Unlock()
			_ = unstructured.SetNestedSlice(o.Object, []any{map[string]any{"type": "Succeeded", "status": "True"}}, "status", "conditions")
		}
		if err := c.dyn.Tracker().Create(action.GetResource(), o, ""); err != nil {
			return true, nil, err
		}
		return true, o, nil
	}
	return false, nil, nil
}

// addCanaryReactor makes writes of the canary through client land in etcd
// under keyID().
func (c *cluster) addCanaryReactor(client *k8sfake.Clientset, keyID func() string) {
	react := func(action k8stesting.Action) (bool, runtime.Object, error) {
		var name, ns string
		switch a := action.(type) {
		case k8stesting.CreateAction:
			m, _ := metaOf(a.GetObject())
			name, ns = m.GetName(), a.GetNamespace()
		case k8stesting.UpdateAction:
			m, _ := metaOf(a.GetObject())
			name, ns = m.GetName(), a.GetNamespace()
		}
		if name == CanaryName {
			c.etcd.put(etcdKey(action.GetResource().Resource, ns, name), storedValue(testProviderName, keyID()))
		}
		return false, nil, nil
	}
	client.PrependReactor("create", "secrets", react)
	client.PrependReactor("update", "secrets", react)
	client.PrependReactor("create", "configmaps", react)
	client.PrependReactor("update", "configmaps", react)
}

func metaOf(o runtime.Object) (metav1.Object, bool) {
	m, ok := o.(metav1.Object)
	return m, ok
}

// config is a fast Runner configuration for the cluster.
func (c *cluster) config() Config {
	return Config{
		Client: c.client, Dynamic: pagingDynamic{c.dyn, c}, Provider: c.provider,
		ProviderName: testProviderName, Resources: []string{"secrets", "configmaps"},
		PluginEndpoints: c.endpoints(), Etcd: c.etcd,
		ConvergeTimeout: 2 * time.Second, ConvergeWait: 20 * time.Millisecond,
		Workers: 4, QPS: 100000, PageSize: 7, Keep: 0, Migration: MigrationUpdate,
		LeaseDuration: 3 * time.Second, PollInterval: 5 * time.Millisecond,
		SVMStartTimeout: 50 * time.Millisecond, ProgressInterval: 10 * time.Millisecond,
		Identity: "test/1/" + c.t.Name(),
		Logger:   zaptest.NewLogger(c.t, zaptest.Level(zap.WarnLevel)),
	}
}

// crashPoint is where crashHooks stops a run: right after Stage was
// persisted as completed, or, with Objects > 0, once that many objects
// were rewritten in the re-encrypt stage.
type crashPoint struct {
	Stage   Stage
	Objects int64
}

// crashHooks returns Hooks that, at cp, count the crash in crashed and
// stop the run with ErrCrashed.
func crashHooks(cp crashPoint, crashed *int) Hooks {
	if cp.Objects > 0 {
		return Hooks{AfterRewrites: func(n int64) error {
			if n != cp.Objects {
				return nil
			}
			*crashed++
			return ErrCrashed
		}}
	}
	return Hooks{AfterStage: func(s Stage) error {
		if s != cp.Stage {
			return nil
		}
		*crashed++
		return ErrCrashed
	}}
}

func (c *cluster) runner(cfg Config) *Runner {
	c.t.Helper()
	r, err := New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	return r
}

// versions returns the keyset's versions: enabled ones and the current.
func (c *cluster) versions() (enabled []string, disabled []string, current string) {
	c.t.Helper()
	vs, err := c.provider.Versions(context.Background())
	if err != nil {
		c.t.Fatal(err)
	}
	for _, v := range vs {
		if v.Current {
			current = v.Version
		}
		if v.State == provider.VersionEnabled {
			enabled = append(enabled, v.Version)
		} else {
			disabled = append(disabled, v.Version)
		}
	}
	return enabled, disabled, current
}

// staleObjects counts objects in etcd not under keyID.
func (c *cluster) staleObjects(keyID string) int {
	c.etcd.mu.Lock()
	defer c.etcd.mu.Unlock()
	n := 0
	for k, v := range c.etcd.kv {
		if strings.Contains(k, CanaryName) {
			continue
		}
		e, err := etcdscan.Classify(v)
		if err != nil || e.KeyID != keyID {
			n++
		}
	}
	return n
}

func (c *cluster) state() *State {
	c.t.Helper()
	st, err := LoadState(context.Background(), c.client, DefaultNamespace, DefaultName)
	if err != nil {
		c.t.Fatal(err)
	}
	return st
}

func (c *cluster) leaseHolder() string {
	c.t.Helper()
	info, err := ReadLease(context.Background(), c.client, DefaultNamespace, DefaultName)
	if err != nil {
		c.t.Fatal(err)
	}
	return info.Holder
}

// k8sfakeClient is another apiserver's client over the same fake objects'
// discovery (the canary needs only Secrets and ConfigMaps).
func k8sfakeClient(c *cluster) *k8sfake.Clientset {
	cs := k8sfake.NewClientset()
	cs.Discovery().(*fakediscovery.FakeDiscovery).Resources = c.client.Discovery().(*fakediscovery.FakeDiscovery).Resources
	return cs
}

// serveSVM makes discovery serve storagemigration.k8s.io/v1.
func serveSVM(c *cluster) {
	d := c.client.Discovery().(*fakediscovery.FakeDiscovery)
	d.Resources = append(d.Resources, &metav1.APIResourceList{
		GroupVersion: svmGroup + "/v1",
		APIResources: []metav1.APIResource{{Name: "storageversionmigrations", Kind: "StorageVersionMigration", Verbs: []string{"create", "get", "list", "delete"}}},
	})
}
