package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

// objectStore lists and rewrites the objects of one resource.
type objectStore interface {
	// list returns one page.
	list(ctx context.Context, limit int64, cont string) (objectPage, error)
	// update writes o back as it is (a no-op update); the answer is not
	// decoded.
	update(ctx context.Context, o *storedObject) error
	// get reads o again, after a conflict.
	get(ctx context.Context, o *storedObject) (*storedObject, error)
	// wire names the format, for the logs.
	wire() string
}

// storedObject is one object as listed: its name and what the store needs
// to write it back.
type storedObject struct {
	namespace, name string
	raw             []byte                     // rawStore: the JSON as the apiserver sent it
	u               *unstructured.Unstructured // dynamicStore
}

// path is NAMESPACE/NAME or NAME, as in the object's etcd key.
func (o *storedObject) path() string {
	if o.namespace != "" {
		return o.namespace + "/" + o.name
	}
	return o.name
}

// objectPage is one LIST page.
type objectPage struct {
	items     []*storedObject
	cont      string
	remaining *int64
}

// rawStore lists and writes back objects as JSON bytes without decoding
// them: every object goes back exactly as the apiserver listed it, so no
// field is lost whatever this binary knows of the type (built-in kinds of a
// newer apiserver, custom resources), and the client spends no CPU decoding
// objects into maps and encoding them again. Only each object's kind,
// namespace and name are read.
type rawStore struct {
	rc rest.Interface
	// prefix is /api/v1 or /apis/GROUP/VERSION.
	prefix     string
	resource   string
	namespaced bool
	// apiVersion and kind are added to listed items, which carry none.
	apiVersion, kind string
}

func newRawStore(rc rest.Interface, gvr schema.GroupVersionResource, kind string, namespaced bool) rawStore {
	prefix := "/apis/" + gvr.Group + "/" + gvr.Version
	if gvr.Group == "" {
		prefix = "/api/" + gvr.Version
	}
	return rawStore{rc: rc, prefix: prefix, resource: gvr.Resource, namespaced: namespaced,
		apiVersion: gvr.GroupVersion().String(), kind: kind}
}

func (s rawStore) wire() string { return "json (objects written back as listed)" }

func (s rawStore) list(ctx context.Context, limit int64, cont string) (objectPage, error) {
	req := s.rc.Get().AbsPath(s.prefix).Resource(s.resource).SetHeader("Accept", "application/json").
		Param("limit", strconv.FormatInt(limit, 10))
	if cont != "" {
		req = req.Param("continue", cont)
	}
	body, err := req.Do(ctx).Raw()
	if err != nil {
		return objectPage{}, err
	}
	var l struct {
		Metadata struct {
			Continue           string `json:"continue"`
			RemainingItemCount *int64 `json:"remainingItemCount"`
		} `json:"metadata"`
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(body, &l); err != nil {
		return objectPage{}, fmt.Errorf("decode %s list: %w", s.resource, err)
	}
	p := objectPage{items: make([]*storedObject, 0, len(l.Items)), cont: l.Metadata.Continue, remaining: l.Metadata.RemainingItemCount}
	for _, raw := range l.Items {
		o, err := s.object(raw)
		if err != nil {
			return objectPage{}, err
		}
		p.items = append(p.items, o)
	}
	return p, nil
}

// object reads raw's name and adds apiVersion and kind when it has none
// (items of built-in lists), so the apiserver checks them against the URL.
func (s rawStore) object(raw []byte) (*storedObject, error) {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(raw, &head); err != nil {
		return nil, fmt.Errorf("decode a %s: %w", s.resource, err)
	}
	if head.Metadata.Name == "" {
		return nil, fmt.Errorf("the apiserver listed a %s without a name", s.resource)
	}
	if head.APIVersion == "" && head.Kind == "" && len(raw) > 1 && raw[0] == '{' {
		typeMeta := fmt.Appendf(nil, `{"apiVersion":%q,"kind":%q`, s.apiVersion, s.kind)
		if raw[1] != '}' {
			typeMeta = append(typeMeta, ',')
		}
		raw = append(typeMeta, raw[1:]...)
	}
	return &storedObject{namespace: head.Metadata.Namespace, name: head.Metadata.Name, raw: raw}, nil
}

// metadataOnly asks the apiserver to answer an update with the object's
// metadata alone (it serves that form for every resource), so it does not
// encode and send back the whole object that is dropped anyway; plain JSON
// is the fallback for servers that do not.
const metadataOnly = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"

func (s rawStore) update(ctx context.Context, o *storedObject) error {
	return s.rc.Put().AbsPath(s.prefix).NamespaceIfScoped(o.namespace, s.namespaced).Resource(s.resource).Name(o.name).
		Param("fieldManager", FieldManager).SetHeader("Content-Type", "application/json").SetHeader("Accept", metadataOnly).
		Body(o.raw).Do(ctx).Error()
}

func (s rawStore) get(ctx context.Context, o *storedObject) (*storedObject, error) {
	body, err := s.rc.Get().AbsPath(s.prefix).NamespaceIfScoped(o.namespace, s.namespaced).Resource(s.resource).Name(o.name).
		SetHeader("Accept", "application/json").Do(ctx).Raw()
	if err != nil {
		return nil, err
	}
	return s.object(body)
}

// dynamicStore uses the dynamic client: objects are decoded into
// unstructured maps and encoded again. It is the fallback when no REST
// client is configured.
type dynamicStore struct {
	ri dynamic.NamespaceableResourceInterface
}

func (s dynamicStore) wire() string { return "json (unstructured)" }

func (s dynamicStore) list(ctx context.Context, limit int64, cont string) (objectPage, error) {
	l, err := s.ri.List(ctx, metav1.ListOptions{Limit: limit, Continue: cont})
	if err != nil {
		return objectPage{}, err
	}
	p := objectPage{items: make([]*storedObject, len(l.Items)), cont: l.GetContinue(), remaining: l.GetRemainingItemCount()}
	for i := range l.Items {
		u := &l.Items[i]
		p.items[i] = &storedObject{namespace: u.GetNamespace(), name: u.GetName(), u: u}
	}
	return p, nil
}

func (s dynamicStore) client(namespace string) dynamic.ResourceInterface {
	if namespace != "" {
		return s.ri.Namespace(namespace)
	}
	return s.ri
}

func (s dynamicStore) update(ctx context.Context, o *storedObject) error {
	if o.u == nil {
		return errors.New("dynamic store: object without content")
	}
	_, err := s.client(o.namespace).Update(ctx, o.u, metav1.UpdateOptions{FieldManager: FieldManager})
	return err
}

func (s dynamicStore) get(ctx context.Context, o *storedObject) (*storedObject, error) {
	u, err := s.client(o.namespace).Get(ctx, o.name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return &storedObject{namespace: u.GetNamespace(), name: u.GetName(), u: u}, nil
}

// servedResource is a resource as the cluster serves it.
type servedResource struct {
	gvr        schema.GroupVersionResource
	kind       string
	namespaced bool
}

// resolve finds the served version of resource ("secrets",
// "deployments.apps").
func (r *Runner) resolve(ctx context.Context, resource string) (servedResource, error) {
	name, group, _ := strings.Cut(resource, ".")
	disc := r.cfg.Client.Discovery()
	gv := "v1"
	if group != "" {
		groups, err := disc.ServerGroups()
		if err != nil {
			return servedResource{}, fmt.Errorf("discover API groups: %w", err)
		}
		gv = ""
		for _, g := range groups.Groups {
			if g.Name == group {
				gv = g.PreferredVersion.GroupVersion
			}
		}
		if gv == "" {
			return servedResource{}, fmt.Errorf("resource %s: the cluster serves no API group %s", resource, group)
		}
	}
	list, err := disc.ServerResourcesForGroupVersion(gv)
	if err != nil {
		return servedResource{}, fmt.Errorf("resource %s: discover %s: %w", resource, gv, err)
	}
	for _, res := range list.APIResources {
		if res.Name == name {
			if !slices.Contains(res.Verbs, "update") || !slices.Contains(res.Verbs, "list") {
				return servedResource{}, fmt.Errorf("resource %s cannot be listed and updated", resource)
			}
			parsed, err := schema.ParseGroupVersion(gv)
			if err != nil {
				return servedResource{}, fmt.Errorf("resource %s: %w", resource, err)
			}
			return servedResource{gvr: parsed.WithResource(name), kind: res.Kind, namespaced: res.Namespaced}, nil
		}
	}
	return servedResource{}, fmt.Errorf("resource %s: %s serves no resource %s", resource, gv, name)
}

// objectStore picks how objects of served are read and written: raw JSON
// through Config.REST, else the dynamic client.
func (r *Runner) objectStore(served servedResource) objectStore {
	if r.cfg.REST != nil && served.kind != "" {
		return newRawStore(r.cfg.REST, served.gvr, served.kind, served.namespaced)
	}
	return dynamicStore{ri: r.cfg.Dynamic.Resource(served.gvr)}
}
