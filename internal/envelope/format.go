package envelope

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
)

// Wire format, version 1. Everything here is stored in clear in etcd by
// kube-apiserver and must stay readable forever: change it only by adding a
// new version beside this one.
//
//	ciphertext  = 0x01 || nonce (12 B) || AES-256-GCM(local KEK, seed, aad)
//	aad         = "kms-plugin ciphertext v1" || 0x00 || uint16(len(key_id)) || key_id || ref
//	ref         = SHA-256(lkek annotation)
//	annotations = { "version.kms-plugin.io": "1",
//	                "lkek.kms-plugin.io":    0x01 || uvarint(len(remote version)) || remote version || wrapped local KEK }
//	key_id      = "kp1." || base64url(SHA-256("kms-plugin key_id v1" || 0x00 || provider || 0x00 || remote version)[:24])
const (
	// FormatVersion is the first byte of every ciphertext and lkek
	// annotation this version writes.
	FormatVersion byte = 1

	// AnnotationVersion names the annotation holding the format version.
	AnnotationVersion = "version.kms-plugin.io"
	// AnnotationLocalKEK names the annotation holding the wrapped local KEK
	// and the remote key version that wrapped it.
	AnnotationLocalKEK = "lkek.kms-plugin.io"

	formatVersionText = "1"
	keyIDPrefix       = "kp1."
	nonceSize         = 12
	tagSize           = 16
	localKEKSize      = 32

	// Limits kube-apiserver enforces on plugin responses, and ours on input.
	maxKeyIDSize       = 1024
	maxCiphertextSize  = 1024
	maxAnnotationsSize = 32 * 1024
	// MaxPlaintextSize is the largest plaintext Encrypt accepts. kube-apiserver
	// sends 32-byte DEK seeds; the bound keeps the ciphertext within 1 KiB.
	MaxPlaintextSize = 512
	// maxRemoteVersionSize bounds the remote version inside the lkek annotation.
	maxRemoteVersionSize = 1024
	// maxWrappedKEKSize bounds the wrapped local KEK (an RSA-8192 wrap is 1 KiB).
	maxWrappedKEKSize = 16 * 1024
)

var (
	ciphertextAADLabel = []byte("kms-plugin ciphertext v1\x00")
	keyIDLabel         = []byte("kms-plugin key_id v1\x00")
)

// DeriveKeyID returns the KMS v2 key_id for a remote key version of the named
// provider. It is public, stable across nodes and restarts, and changes
// whenever the remote version changes.
func DeriveKeyID(providerName, remoteVersion string) string {
	h := sha256.New()
	h.Write(keyIDLabel)
	h.Write([]byte(providerName))
	h.Write([]byte{0})
	h.Write([]byte(remoteVersion))
	return keyIDPrefix + base64.RawURLEncoding.EncodeToString(h.Sum(nil)[:24])
}

// KeyIDHash returns a short fingerprint of a key_id for logs and metrics.
func KeyIDHash(keyID string) string {
	if keyID == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(keyID))
	return hex.EncodeToString(sum[:8])
}

// encodeLocalKEK builds the lkek annotation value.
func encodeLocalKEK(remoteVersion string, wrapped []byte) []byte {
	out := make([]byte, 0, 1+binary.MaxVarintLen64+len(remoteVersion)+len(wrapped))
	out = append(out, FormatVersion)
	out = binary.AppendUvarint(out, uint64(len(remoteVersion)))
	out = append(out, remoteVersion...)
	return append(out, wrapped...)
}

// decodeLocalKEK parses the lkek annotation value.
func decodeLocalKEK(b []byte) (remoteVersion string, wrapped []byte, err error) {
	if len(b) == 0 {
		return "", nil, fmt.Errorf("annotation %s is empty", AnnotationLocalKEK)
	}
	if b[0] != FormatVersion {
		return "", nil, fmt.Errorf("annotation %s has unsupported format version %d", AnnotationLocalKEK, b[0])
	}
	n, used := binary.Uvarint(b[1:])
	// Only the minimal encoding of the length is accepted, the one
	// encodeLocalKEK writes: another spelling of the same annotation would
	// be a new cache key for the same wrapped KEK, and cost an unwrap.
	if used <= 0 || n == 0 || n > maxRemoteVersionSize || used != len(binary.AppendUvarint(nil, n)) {
		return "", nil, fmt.Errorf("annotation %s has a malformed key version length", AnnotationLocalKEK)
	}
	rest := b[1+used:]
	if uint64(len(rest)) <= n {
		return "", nil, fmt.Errorf("annotation %s is truncated", AnnotationLocalKEK)
	}
	wrapped = rest[n:]
	if len(wrapped) > maxWrappedKEKSize {
		return "", nil, fmt.Errorf("annotation %s: wrapped key is %d bytes, more than %d", AnnotationLocalKEK, len(wrapped), maxWrappedKEKSize)
	}
	return string(rest[:n]), wrapped, nil
}

// ciphertextAAD is the additional data bound into every seed ciphertext.
func ciphertextAAD(keyID string, ref [32]byte) []byte {
	out := make([]byte, 0, len(ciphertextAADLabel)+2+len(keyID)+len(ref))
	out = append(out, ciphertextAADLabel...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(keyID)))
	out = append(out, keyID...)
	return append(out, ref[:]...)
}

// annotationsSize is the size kube-apiserver counts against its 32 KiB limit.
func annotationsSize(a map[string][]byte) int {
	n := 0
	for k, v := range a {
		n += len(k) + len(v)
	}
	return n
}
