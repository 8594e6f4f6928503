package pkcs11

import "errors"

// pinRemedy is the fix of a PIN file error, or "".
func pinRemedy(err error) string {
	var pe *PINFileError
	if errors.As(err, &pe) {
		return pe.Fix
	}
	return ""
}
