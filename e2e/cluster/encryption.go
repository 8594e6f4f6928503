package cluster

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"google.golang.org/protobuf/proto"
	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// AnnotationSuffix ends every annotation key the plugin writes.
const AnnotationSuffix = ".kms-plugin.io"

// WriteEncryptionConfig writes an EncryptionConfiguration that encrypts
// secrets with one KMS v2 provider, and nothing else, to path.
func WriteEncryptionConfig(path, providerName, endpoint string, timeout time.Duration) error {
	config := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: %s
          endpoint: %s
          timeout: %s
`, providerName, endpoint, timeout)
	return os.WriteFile(path, []byte(config), 0o600)
}

// StoredPrefix is what kube-apiserver puts in front of every value it
// stores with the KMS v2 provider providerName.
func StoredPrefix(providerName string) string {
	return "k8s:enc:kms:v2:" + providerName + ":"
}

// DecodeStored checks that raw, a value as stored in etcd, carries the KMS
// v2 prefix of providerName, decodes the EncryptedObject that follows and
// validates it with kube-apiserver's own rules.
func DecodeStored(raw []byte, providerName string) (*kmstypes.EncryptedObject, error) {
	prefix := []byte(StoredPrefix(providerName))
	if !bytes.HasPrefix(raw, prefix) {
		n := min(len(raw), len(prefix)+8)
		return nil, fmt.Errorf("stored value does not start with %q: starts with %q", prefix, raw[:n])
	}
	obj := &kmstypes.EncryptedObject{}
	if err := proto.Unmarshal(raw[len(prefix):], obj); err != nil {
		return nil, fmt.Errorf("stored value after %q is not an EncryptedObject: %w", prefix, err)
	}
	if err := envelopekmsv2.ValidateEncryptedObject(obj); err != nil {
		return nil, fmt.Errorf("stored EncryptedObject is invalid: %w", err)
	}
	return obj, nil
}
