package kvtest

import (
	"crypto/aes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
)

// defaultIV is RFC 3394's initial value.
var defaultIV = [8]byte{0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6}

// WrapKey wraps plaintext (a multiple of 8 bytes, at least 16) with the AES
// key kek as RFC 3394 section 2.2.1 specifies: what Key Vault calls A128KW,
// A192KW and A256KW.
func WrapKey(kek, plaintext []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	if len(plaintext) < 16 || len(plaintext)%8 != 0 {
		return nil, errors.New("key wrap input must be a multiple of 8 bytes, at least 16")
	}
	n := len(plaintext) / 8
	out := make([]byte, 8+len(plaintext))
	copy(out[8:], plaintext)
	a := defaultIV
	var b [16]byte
	for j := range 6 {
		for i := 1; i <= n; i++ {
			copy(b[:8], a[:])
			copy(b[8:], out[8*i:8*i+8])
			block.Encrypt(b[:], b[:])
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(a[:], binary.BigEndian.Uint64(b[:8])^t)
			copy(out[8*i:], b[8:])
		}
	}
	copy(out[:8], a[:])
	return out, nil
}

// UnwrapKey reverses WrapKey (RFC 3394 section 2.2.2) and checks the
// integrity value.
func UnwrapKey(kek, ciphertext []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	if len(ciphertext) < 24 || len(ciphertext)%8 != 0 {
		return nil, errors.New("key unwrap input must be a multiple of 8 bytes, at least 24")
	}
	n := len(ciphertext)/8 - 1
	out := make([]byte, len(ciphertext)-8)
	copy(out, ciphertext[8:])
	var a [8]byte
	copy(a[:], ciphertext[:8])
	var b [16]byte
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(b[:8], binary.BigEndian.Uint64(a[:])^t)
			copy(b[8:], out[8*(i-1):8*i])
			block.Decrypt(b[:], b[:])
			copy(a[:], b[:8])
			copy(out[8*(i-1):], b[8:])
		}
	}
	if subtle.ConstantTimeCompare(a[:], defaultIV[:]) != 1 {
		return nil, errors.New("key unwrap integrity check failed")
	}
	return out, nil
}
