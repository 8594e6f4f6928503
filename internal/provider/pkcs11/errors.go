//go:build pkcs11

package pkcs11

import (
	"errors"
	"sync/atomic"

	p11 "github.com/miekg/pkcs11"
)

// class is what an error of the library means for the store.
type class int

const (
	classOK       class = iota
	classPIN            // the token refused the PIN: permission denied, never retried
	classDisabled       // the key may not do this (CKA_ENCRYPT/CKA_DECRYPT false)
	classHandle         // an object handle is stale: list the objects again
	classSession        // the session is unusable: drop it, retry on another
	classToken          // the token or device is gone: drop the session, re-initialize the module
	classData           // the ciphertext is invalid (a code that says so)
	classGeneral        // CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED: ambiguous
	classOther          // anything else (a mechanism the token lacks, ...)
)

// classOf classifies err, an error returned by the library (or not).
func classOf(err error) class {
	if err == nil {
		return classOK
	}
	if errors.Is(err, errNotReady) {
		return classToken
	}
	var e p11.Error
	if !errors.As(err, &e) {
		return classOther
	}
	switch uint(e) {
	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_LOCKED, p11.CKR_PIN_EXPIRED, p11.CKR_PIN_INVALID, p11.CKR_PIN_LEN_RANGE:
		return classPIN
	case p11.CKR_KEY_FUNCTION_NOT_PERMITTED:
		return classDisabled
	case p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID:
		return classHandle
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED, p11.CKR_USER_NOT_LOGGED_IN,
		p11.CKR_OPERATION_ACTIVE, p11.CKR_OPERATION_NOT_INITIALIZED, p11.CKR_SESSION_COUNT:
		return classSession
	case p11.CKR_DEVICE_ERROR, p11.CKR_DEVICE_MEMORY, p11.CKR_DEVICE_REMOVED, p11.CKR_TOKEN_NOT_PRESENT,
		p11.CKR_TOKEN_NOT_RECOGNIZED, p11.CKR_SLOT_ID_INVALID, p11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return classToken
	case p11.CKR_ENCRYPTED_DATA_INVALID, p11.CKR_ENCRYPTED_DATA_LEN_RANGE:
		return classData
	case p11.CKR_GENERAL_ERROR, p11.CKR_FUNCTION_FAILED:
		return classGeneral
	}
	return classOther
}

// Operations counted by counters: every call into the library.
const (
	opInitialize = iota
	opFinalize
	opGetSlotList
	opGetTokenInfo
	opOpenSession
	opCloseSession
	opGetSessionInfo
	opLogin
	opFindObjectsInit
	opFindObjects
	opFindObjectsFinal
	opGetAttributeValue
	opSetAttributeValue
	opGenerateKey
	opCreateObject
	opEncryptInit
	opEncrypt
	opDecryptInit
	opDecrypt
	numOps
)

var opNames = [numOps]string{
	"C_Initialize", "C_Finalize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_CloseSession",
	"C_GetSessionInfo", "C_Login", "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal",
	"C_GetAttributeValue", "C_SetAttributeValue", "C_GenerateKey", "C_CreateObject",
	"C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt",
}

// counters count calls into the library, per function.
type counters struct {
	n [numOps]atomic.Uint64
}

func (c *counters) add(op int) { c.n[op].Add(1) }

// Calls are the calls a store made into the PKCS#11 library, per function
// name ("C_Decrypt"), since it was opened.
type Calls map[string]uint64

// Total is the number of calls of every function.
func (c Calls) Total() uint64 {
	var t uint64
	for _, n := range c {
		t += n
	}
	return t
}

func (c *counters) snapshot() Calls {
	out := Calls{}
	for i := range c.n {
		if v := c.n[i].Load(); v > 0 {
			out[opNames[i]] = v
		}
	}
	return out
}
