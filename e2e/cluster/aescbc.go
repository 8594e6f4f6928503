package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// AESCBCPrefix is what kube-apiserver puts in front of every value it
// stores with the aescbc key keyName.
func AESCBCPrefix(keyName string) string { return "k8s:enc:aescbc:v1:" + keyName + ":" }

// WriteAESCBCEncryptionConfig writes to path an EncryptionConfiguration
// that encrypts resources with aescbc, under one fresh random 32-byte key
// named keyName, and reads identity (plaintext) last: a cluster encrypted
// the static-key way, before any KMS plugin.
func WriteAESCBCEncryptionConfig(path, keyName string, resources []string) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources:\n")
	for _, r := range resources {
		fmt.Fprintf(&b, "      - %s\n", r)
	}
	fmt.Fprintf(&b, "    providers:\n      - aescbc:\n          keys:\n            - name: %s\n              secret: %s\n      - identity: {}\n",
		keyName, base64.StdEncoding.EncodeToString(key))
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// StoredKind names how a value read raw from etcd is stored:
// "aescbc:KEY", "kms-v2:NAME" (any other k8s:enc: provider likewise, as
// "PROVIDER-VERSION:NAME"), or "identity" for a value no provider encrypted.
func StoredKind(raw []byte) string {
	rest, ok := bytes.CutPrefix(raw, []byte("k8s:enc:"))
	if !ok {
		return "identity"
	}
	parts := strings.SplitN(string(rest), ":", 4)
	if len(parts) < 4 {
		return "malformed"
	}
	kind := parts[0]
	if parts[0] != "aescbc" {
		kind += "-" + parts[1]
	}
	return kind + ":" + parts[2]
}

// ScanKinds reads every key under /registry/RESOURCE/ for each resource
// and groups the keys by StoredKind.
func ScanKinds(ctx context.Context, cli *clientv3.Client, resources ...string) (map[string][]string, error) {
	out := map[string][]string{}
	for _, res := range resources {
		prefix := "/registry/" + res + "/"
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("etcd range %s: %w", prefix, err)
		}
		for _, kv := range resp.Kvs {
			k := StoredKind(kv.Value)
			out[k] = append(out[k], string(kv.Key))
		}
	}
	return out, nil
}

// KindCounts summarises ScanKinds' result: kind -> number of keys.
func KindCounts(kinds map[string][]string) map[string]int {
	out := map[string]int{}
	for k, keys := range kinds {
		out[k] = len(keys)
	}
	return out
}
