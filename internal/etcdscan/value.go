package etcdscan

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/encoding/protowire"
)

// Kind says how kube-apiserver stored a value.
type Kind string

// Kinds of stored values. The names follow the EncryptionConfiguration's
// provider names.
const (
	// KindUnencrypted is a value no provider encrypted (the identity
	// provider, or a resource that is not configured for encryption).
	KindUnencrypted Kind = "identity"
	// KindKMSv2 is "k8s:enc:kms:v2:NAME:" followed by an EncryptedObject.
	KindKMSv2 Kind = "kms/v2"
	// KindKMSv1 is "k8s:enc:kms:v1:NAME:": no key ID in clear.
	KindKMSv1 Kind = "kms/v1"
	// KindAESCBC, KindAESGCM and KindSecretbox are the static-key
	// providers, "k8s:enc:aescbc:v1:KEYNAME:" and so on.
	KindAESCBC    Kind = "aescbc"
	KindAESGCM    Kind = "aesgcm"
	KindSecretbox Kind = "secretbox"
	// KindUnknown is a "k8s:enc:" value of a provider this package does
	// not know.
	KindUnknown Kind = "unknown"
)

// encPrefix starts every value an encrypting provider wrote.
const encPrefix = "k8s:enc:"

// KMSv2Prefix returns the prefix of a value the KMS v2 provider named name
// wrote.
func KMSv2Prefix(name string) string { return encPrefix + "kms:v2:" + name + ":" }

// Encryption describes how one stored value is encrypted. Every field is
// public: it is in clear in etcd.
type Encryption struct {
	Kind Kind
	// Provider is the provider name of a kms value, or the key name of a
	// static-key provider; empty for unencrypted values.
	Provider string
	// KeyID is the KMS v2 key_id; empty for other kinds.
	KeyID string
}

// Encrypted reports whether a provider encrypted the value.
func (e Encryption) Encrypted() bool { return e.Kind != KindUnencrypted }

// Classify tells how value is stored. It fails only for a KMS v2 value
// whose EncryptedObject does not parse; the Encryption it then returns has
// Kind and Provider set and no KeyID.
func Classify(value []byte) (Encryption, error) {
	rest, ok := bytes.CutPrefix(value, []byte(encPrefix))
	if !ok {
		return Encryption{Kind: KindUnencrypted}, nil
	}
	// rest is "PROVIDER:vN:NAME:DATA".
	kind, rest, ok := bytes.Cut(rest, []byte(":"))
	if !ok {
		return Encryption{Kind: KindUnknown}, nil
	}
	apiVersion, rest, ok := bytes.Cut(rest, []byte(":"))
	if !ok {
		return Encryption{Kind: KindUnknown}, nil
	}
	name, data, ok := bytes.Cut(rest, []byte(":"))
	if !ok {
		return Encryption{Kind: KindUnknown}, nil
	}
	e := Encryption{Provider: string(name)}
	switch string(kind) + "/" + string(apiVersion) {
	case "kms/v2":
		e.Kind = KindKMSv2
		obj, err := DecodeEncryptedObject(data)
		if err != nil {
			return e, fmt.Errorf("etcdscan: kms v2 value of provider %s: %w", name, err)
		}
		e.KeyID = obj.KeyID
	case "kms/v1":
		e.Kind = KindKMSv1
	case "aescbc/v1":
		e.Kind = KindAESCBC
	case "aesgcm/v1":
		e.Kind = KindAESGCM
	case "secretbox/v1":
		e.Kind = KindSecretbox
	default:
		return Encryption{Kind: KindUnknown, Provider: strings.ToValidUTF8(string(kind), "?")}, nil
	}
	return e, nil
}

// EncryptedObject holds the clear fields of kube-apiserver's KMS v2
// EncryptedObject (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2):
//
//	message EncryptedObject {
//	  bytes encryptedData = 1;
//	  string keyID = 2;
//	  bytes encryptedDEKSource = 3;
//	  map<string, bytes> annotations = 4;
//	  EncryptedDEKSourceType encryptedDEKSourceType = 5;
//	}
//
// It is decoded here with protowire so that the product does not depend on
// k8s.io/apiserver.
type EncryptedObject struct {
	EncryptedDataLen       int
	KeyID                  string
	EncryptedDEKSourceLen  int
	AnnotationKeys         []string
	EncryptedDEKSourceType uint64
}

// DecodeEncryptedObject parses the protobuf EncryptedObject that follows a
// KMS v2 prefix. It fails on malformed protobuf or an empty key ID.
func DecodeEncryptedObject(b []byte) (EncryptedObject, error) {
	var o EncryptedObject
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return o, fmt.Errorf("bad EncryptedObject: %w", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject.encryptedData: %w", protowire.ParseError(n))
			}
			o.EncryptedDataLen, b = len(v), b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject.keyID: %w", protowire.ParseError(n))
			}
			o.KeyID, b = string(v), b[n:]
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject.encryptedDEKSource: %w", protowire.ParseError(n))
			}
			o.EncryptedDEKSourceLen, b = len(v), b[n:]
		case num == 4 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject.annotations: %w", protowire.ParseError(n))
			}
			key, err := mapEntryKey(v)
			if err != nil {
				return o, fmt.Errorf("bad EncryptedObject.annotations: %w", err)
			}
			o.AnnotationKeys, b = append(o.AnnotationKeys, key), b[n:]
		case num == 5 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject.encryptedDEKSourceType: %w", protowire.ParseError(n))
			}
			o.EncryptedDEKSourceType, b = v, b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return o, fmt.Errorf("bad EncryptedObject field %d: %w", num, protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	if o.KeyID == "" {
		return o, errors.New("EncryptedObject has no keyID")
	}
	return o, nil
}

// mapEntryKey returns the key (field 1) of a protobuf map entry.
func mapEntryKey(b []byte) (string, error) {
	var key string
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", protowire.ParseError(n)
			}
			key, b = string(v), b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
	}
	return key, nil
}
