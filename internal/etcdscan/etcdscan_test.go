package etcdscan

import (
	"context"
	"errors"
	"slices"
	"sort"
	"strings"
	"testing"
)

// fakeRanger serves Range from a sorted key-value list and records calls.
type fakeRanger struct {
	kvs   []KeyValue
	rev   int64
	calls []call
	err   error
}

type call struct {
	start, end string
	rev, limit int64
}

func newFake(objects map[string]string) *fakeRanger {
	f := &fakeRanger{rev: 42}
	for k, v := range objects {
		f.kvs = append(f.kvs, KeyValue{Key: []byte(k), Value: []byte(v)})
	}
	sort.Slice(f.kvs, func(i, j int) bool { return string(f.kvs[i].Key) < string(f.kvs[j].Key) })
	return f
}

func (f *fakeRanger) Range(_ context.Context, start, end string, rev, limit int64) ([]KeyValue, bool, int64, error) {
	f.calls = append(f.calls, call{start, end, rev, limit})
	if f.err != nil {
		return nil, false, 0, f.err
	}
	var out []KeyValue
	more := false
	for _, kv := range f.kvs {
		if k := string(kv.Key); k >= start && k < end {
			if int64(len(out)) == limit {
				more = true
				break
			}
			out = append(out, kv)
		}
	}
	return out, more, f.rev, nil
}

var _ Ranger = (*fakeRanger)(nil)

func TestFindPrefixed(t *testing.T) {
	objects := map[string]string{
		"/registry/secrets/a/1":    "k8s:enc:kms:v2:kms-plugin:x",
		"/registry/secrets/a/2":    "k8s\x00plain",
		"/registry/secrets/b/3":    "k8s:enc:kms:v2:kms-plugin:y",
		"/registry/secrets/b/4":    "k8s:enc:kms:v2:other:y",
		"/registry/secrets/c/5":    "k8s:enc:kms:v2:kms-plugin:z",
		"/registry/secretsx/d/6":   "k8s:enc:kms:v2:kms-plugin:z", // another prefix
		"/registry/configmaps/e/7": "k8s:enc:kms:v2:kms-plugin:z",
	}
	for _, tt := range []struct {
		name      string
		prefixes  []string
		limit     int
		wantKeys  []string
		wantTotal int
	}{
		{"secrets", []string{"/registry/secrets/"}, 10, []string{"/registry/secrets/a/1", "/registry/secrets/b/3", "/registry/secrets/c/5"}, 3},
		{"limited sample", []string{"/registry/secrets/"}, 1, []string{"/registry/secrets/a/1"}, 3},
		{"two prefixes", []string{"/registry/configmaps/", "/registry/secrets/"}, 10, []string{"/registry/configmaps/e/7", "/registry/secrets/a/1", "/registry/secrets/b/3", "/registry/secrets/c/5"}, 4},
		{"nothing", []string{"/registry/pods/"}, 10, nil, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(objects)
			keys, total, err := New(f, 2).FindPrefixed(context.Background(), tt.prefixes, []byte("k8s:enc:kms:v2:kms-plugin:"), tt.limit)
			if err != nil {
				t.Fatal(err)
			}
			if total != tt.wantTotal || !slices.Equal(keys, tt.wantKeys) {
				t.Fatalf("FindPrefixed = %v, %d; want %v, %d", keys, total, tt.wantKeys, tt.wantTotal)
			}
			for i, c := range f.calls {
				if c.limit != 2 {
					t.Errorf("call %d: limit %d; want the page size 2", i, c.limit)
				}
				if wantRev := int64(42); i > 0 && c.rev != wantRev {
					t.Errorf("call %d: revision %d; want every page after the first at revision %d", i, c.rev, wantRev)
				}
			}
		})
	}
}

func TestFindPrefixedPages(t *testing.T) {
	f := newFake(map[string]string{"/r/s/1": "a", "/r/s/2": "b", "/r/s/3": "c", "/r/s/4": "d", "/r/s/5": "e"})
	if _, _, err := New(f, 2).FindPrefixed(context.Background(), []string{"/r/s/"}, []byte("x"), 5); err != nil {
		t.Fatal(err)
	}
	var starts []string
	for _, c := range f.calls {
		starts = append(starts, c.start)
		if c.end != "/r/s0" {
			t.Errorf("range end %q; want /r/s0", c.end)
		}
	}
	if want := []string{"/r/s/", "/r/s/2\x00", "/r/s/4\x00"}; !slices.Equal(starts, want) {
		t.Fatalf("pages started at %q; want %q", starts, want)
	}
}

func TestFindPrefixedErrors(t *testing.T) {
	f := newFake(nil)
	f.err = errors.New("etcdserver: request timed out")
	_, _, err := New(f, 0).FindPrefixed(context.Background(), []string{"/registry/secrets/"}, []byte("x"), 1)
	if err == nil || !strings.Contains(err.Error(), "etcdscan: range /registry/secrets/: etcdserver: request timed out") {
		t.Fatalf("error = %v", err)
	}
	if _, _, err := New(newFake(nil), 0).FindPrefixed(context.Background(), []string{""}, []byte("x"), 1); err == nil {
		t.Fatal("an empty prefix (all of etcd) was accepted")
	}
	if _, err := Dial(Config{}); err == nil {
		t.Fatal("Dial without endpoints succeeded")
	}
	if _, err := Dial(Config{Endpoints: []string{"https://127.0.0.1:2379"}, CAFile: "/nonexistent/ca.crt"}); err == nil || !strings.Contains(err.Error(), "etcd CA") {
		t.Fatalf("Dial with a missing CA: %v", err)
	}
}
