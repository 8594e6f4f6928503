//go:build !pkcs11

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "bench/pkcs11: needs the PKCS#11 build: CGO_ENABLED=1 go run -tags pkcs11 ./bench/pkcs11")
	os.Exit(1)
}
