package etcdscan

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
)

func readFixture(t *testing.T, name string) []byte {
	t.Helper()
	h, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	b, err := hex.DecodeString(strings.TrimSpace(string(h)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestClassifyRealValues decodes values a real kube-apiserver stored.
func TestClassifyRealValues(t *testing.T) {
	for _, tt := range []struct {
		file, version string
	}{
		{"kube-apiserver-v1.37.2-secret.hex", "2145782884"},
		{"kube-apiserver-v1.37.2-secret-rotated.hex", "2341604224"},
	} {
		t.Run(tt.file, func(t *testing.T) {
			v := readFixture(t, tt.file)
			e, err := Classify(v)
			if err != nil {
				t.Fatal(err)
			}
			want := Encryption{Kind: KindKMSv2, Provider: "kms-plugin", KeyID: envelope.DeriveKeyID("local", tt.version)}
			if e != want {
				t.Fatalf("Classify = %+v; want %+v", e, want)
			}
			obj, err := DecodeEncryptedObject(v[len(KMSv2Prefix("kms-plugin")):])
			if err != nil {
				t.Fatal(err)
			}
			if obj.EncryptedDEKSourceType != 1 || obj.EncryptedDEKSourceLen == 0 || obj.EncryptedDataLen == 0 {
				t.Errorf("EncryptedObject = %+v; want an HKDF seed (type 1), a DEK source and data", obj)
			}
			if len(obj.AnnotationKeys) == 0 || !slices.ContainsFunc(obj.AnnotationKeys, func(k string) bool { return strings.HasSuffix(k, ".kms-plugin.io") }) {
				t.Errorf("annotation keys %q; want kms-plugin.io ones", obj.AnnotationKeys)
			}
		})
	}
}

func encodedObject(keyID string, extra ...func([]byte) []byte) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("data"))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendString(b, keyID)
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("seed"))
	var entry []byte
	entry = protowire.AppendTag(entry, 1, protowire.BytesType)
	entry = protowire.AppendString(entry, "a.example.com")
	entry = protowire.AppendTag(entry, 2, protowire.BytesType)
	entry = protowire.AppendBytes(entry, []byte{1, 2})
	b = protowire.AppendTag(b, 4, protowire.BytesType)
	b = protowire.AppendBytes(b, entry)
	b = protowire.AppendTag(b, 5, protowire.VarintType)
	b = protowire.AppendVarint(b, 1)
	for _, f := range extra {
		b = f(b)
	}
	return b
}

func TestClassify(t *testing.T) {
	unknownField := func(b []byte) []byte {
		b = protowire.AppendTag(b, 99, protowire.Fixed32Type)
		return protowire.AppendFixed32(b, 7)
	}
	for _, tt := range []struct {
		name    string
		value   []byte
		want    Encryption
		wantErr bool
	}{
		{"protobuf in clear", []byte("k8s\x00\x0a\x02v1"), Encryption{Kind: KindUnencrypted}, false},
		{"json in clear", []byte(`{"kind":"Secret"}`), Encryption{Kind: KindUnencrypted}, false},
		{"empty", nil, Encryption{Kind: KindUnencrypted}, false},
		{"kms v2", append([]byte("k8s:enc:kms:v2:p:"), encodedObject("kid-1")...), Encryption{Kind: KindKMSv2, Provider: "p", KeyID: "kid-1"}, false},
		{"kms v2 unknown field", append([]byte("k8s:enc:kms:v2:p:"), encodedObject("kid-2", unknownField)...), Encryption{Kind: KindKMSv2, Provider: "p", KeyID: "kid-2"}, false},
		{"kms v2 truncated", append([]byte("k8s:enc:kms:v2:p:"), encodedObject("kid-1")[:9]...), Encryption{Kind: KindKMSv2, Provider: "p"}, true},
		{"kms v2 no key id", append([]byte("k8s:enc:kms:v2:p:"), 0x0a, 0x01, 'x'), Encryption{Kind: KindKMSv2, Provider: "p"}, true},
		{"kms v1", []byte("k8s:enc:kms:v1:old:\x00\x02ab"), Encryption{Kind: KindKMSv1, Provider: "old"}, false},
		{"aescbc", []byte("k8s:enc:aescbc:v1:key1:xxxx"), Encryption{Kind: KindAESCBC, Provider: "key1"}, false},
		{"aesgcm", []byte("k8s:enc:aesgcm:v1:key2:xxxx"), Encryption{Kind: KindAESGCM, Provider: "key2"}, false},
		{"secretbox", []byte("k8s:enc:secretbox:v1:key3:xxxx"), Encryption{Kind: KindSecretbox, Provider: "key3"}, false},
		{"unknown provider", []byte("k8s:enc:rot13:v9:k:xxxx"), Encryption{Kind: KindUnknown, Provider: "rot13"}, false},
		{"malformed prefix", []byte("k8s:enc:kms"), Encryption{Kind: KindUnknown}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Classify(tt.value)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("Classify = %+v, %v; want %+v (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func FuzzClassify(f *testing.F) {
	f.Add(append([]byte("k8s:enc:kms:v2:p:"), encodedObject("kid")...))
	f.Add([]byte("k8s:enc:aescbc:v1:k:"))
	f.Fuzz(func(t *testing.T, v []byte) {
		e, err := Classify(v)
		if err == nil && e.Kind == KindKMSv2 && e.KeyID == "" {
			t.Fatal("a KMS v2 value without key ID was accepted")
		}
	})
}

func TestCountResource(t *testing.T) {
	kv := func(keyID string) string {
		return string(append([]byte("k8s:enc:kms:v2:kms-plugin:"), encodedObject(keyID)...))
	}
	f := newFake(map[string]string{
		"/registry/secrets/a/1":          kv("new"),
		"/registry/secrets/a/2":          kv("new"),
		"/registry/secrets/b/3":          kv("old"),
		"/registry/secrets/b/4":          "k8s\x00plain",
		"/registry/secrets/c/5":          "k8s:enc:aescbc:v1:key1:zz",
		"/registry/secrets/c/6":          "k8s:enc:kms:v2:kms-plugin:\xff",
		"/registry/secretsx/d/7":         kv("old"),
		"/registry/deployments/e/8":      kv("new"),
		"/registry/apps/deployments/e/9": kv("old"),
	})
	sc := New(f, 2)
	var visited []string
	rc, rev, err := sc.CountResource(context.Background(), "/registry", "secrets", 0, func(key []byte, _ Encryption) { visited = append(visited, string(key)) })
	if err != nil {
		t.Fatal(err)
	}
	if rev != 42 || rc.Total != 6 || rc.Unencrypted != 1 || rc.Malformed != 1 || len(visited) != 6 {
		t.Fatalf("count = %+v, rev %d, visited %v", rc, rev, visited)
	}
	want := []KeyCount{
		{Kind: KindKMSv2, Provider: "kms-plugin", KeyID: "new", Count: 2},
		{Kind: KindAESCBC, Provider: "key1", Count: 1},
		{Kind: KindKMSv2, Provider: "kms-plugin", Count: 1},
		{Kind: KindKMSv2, Provider: "kms-plugin", KeyID: "old", Count: 1},
	}
	if !slices.Equal(rc.ByKey, want) {
		t.Fatalf("ByKey = %+v; want %+v", rc.ByKey, want)
	}
	rc, _, err = sc.CountResource(context.Background(), "registry/", "deployments.apps", 0, nil)
	if err != nil || rc.Total != 2 || len(rc.ByKey) != 2 {
		t.Fatalf("deployments.apps: %+v, %v; want both key layouts counted", rc, err)
	}
}

func TestGetAndScanRange(t *testing.T) {
	f := newFake(map[string]string{"/r/a": "1", "/r/b": "2", "/r/bb": "3", "/r/c": "4"})
	sc := New(f, 1)
	v, ok, err := sc.Get(context.Background(), "/r/b")
	if err != nil || !ok || string(v) != "2" {
		t.Fatalf("Get = %q, %v, %v", v, ok, err)
	}
	if _, ok, _ := sc.Get(context.Background(), "/r/x"); ok {
		t.Fatal("Get of a missing key found it")
	}
	var keys [][]byte
	if _, err := sc.ScanRange(context.Background(), "/r/b", "/r/c", 0, func(kv KeyValue) error {
		keys = append(keys, kv.Key)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(keys, [][]byte{[]byte("/r/b"), []byte("/r/bb")}, bytes.Equal) {
		t.Fatalf("ScanRange keys %q", keys)
	}
}

func TestKeyPrefixes(t *testing.T) {
	for _, tt := range []struct {
		prefix, resource string
		want             []string
	}{
		{"/registry", "secrets", []string{"/registry/secrets/"}},
		{"/registry/", "configmaps", []string{"/registry/configmaps/"}},
		{"custom", "widgets.example.com", []string{"/custom/widgets/", "/custom/example.com/widgets/"}},
	} {
		if got := KeyPrefixes(tt.prefix, tt.resource); !slices.Equal(got, tt.want) {
			t.Errorf("KeyPrefixes(%q, %q) = %q; want %q", tt.prefix, tt.resource, got, tt.want)
		}
	}
}
