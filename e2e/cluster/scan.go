package cluster

import (
	"bytes"
	"context"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// StoredObject is one object as stored in etcd, decoded as far as the KMS
// v2 envelope.
type StoredObject struct {
	Key string // /registry/secrets/NS/NAME
	// Resource, Namespace and Name are parsed from Key.
	Resource, Namespace, Name string
	// Encrypted tells whether the value carries the provider's KMS v2
	// prefix and decodes as a valid EncryptedObject; KeyID is then its
	// key_id, else Err says what is wrong.
	Encrypted bool
	KeyID     string
	Err       error
	// Plaintext is set when the value is an unencrypted object
	// (kube-apiserver's protobuf magic "k8s\x00" or JSON).
	Plaintext bool
	// Raw is the stored value.
	Raw []byte
}

// ScanStored reads every key of the namespaced resource under
// /registry/RESOURCE/ in pages of 500 and decodes each value with
// DecodeStored for providerName.
func ScanStored(ctx context.Context, cli *clientv3.Client, resource, providerName string) ([]StoredObject, error) {
	prefix := "/registry/" + resource + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	var out []StoredObject
	key := prefix
	for {
		resp, err := cli.Get(ctx, key, clientv3.WithRange(end), clientv3.WithLimit(500), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return nil, fmt.Errorf("etcd range %s: %w", prefix, err)
		}
		for _, kv := range resp.Kvs {
			o := StoredObject{Key: string(kv.Key), Resource: resource, Raw: kv.Value}
			rest := strings.TrimPrefix(o.Key, prefix)
			o.Namespace, o.Name, _ = strings.Cut(rest, "/")
			obj, err := DecodeStored(kv.Value, providerName)
			switch {
			case err == nil:
				o.Encrypted, o.KeyID = true, obj.KeyID
			case bytes.HasPrefix(kv.Value, []byte("k8s\x00")) || bytes.HasPrefix(kv.Value, []byte("{")):
				o.Plaintext, o.Err = true, fmt.Errorf("stored in plaintext")
			default:
				o.Err = err
			}
			out = append(out, o)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}
