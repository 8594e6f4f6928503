package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
)

// The noop service's fixed answers, sized like the plugin's: a 61-byte
// ciphertext (1 + 12 + 32 + 16), a 36-byte key_id ("kp1." + 32), and two
// annotations like the plugin's version and lkek annotations.
var (
	noopCiphertext  = bytes.Repeat([]byte{0xc7}, 61)
	noopKeyID       = "kp1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	noopPlaintext   = bytes.Repeat([]byte{0x5e}, 32)
	noopAnnotations = map[string][]byte{
		"version.kms-plugin.io": []byte("1"),
		"lkek.kms-plugin.io":    bytes.Repeat([]byte{0xa5}, 80),
	}
)

// noop is the transport floor: a KMS v2 service that answers immediately
// with fixed responses.
type noop struct {
	kmsapi.UnimplementedKeyManagementServiceServer
}

func (noop) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: noopKeyID}, nil
}

func (noop) Encrypt(context.Context, *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	return &kmsapi.EncryptResponse{Ciphertext: noopCiphertext, KeyId: noopKeyID, Annotations: noopAnnotations}, nil
}

func (noop) Decrypt(context.Context, *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	return &kmsapi.DecryptResponse{Plaintext: noopPlaintext}, nil
}

// serveNoop serves the noop service on a plain grpc.Server (no options, no
// interceptors) on socket.
func serveNoop(socket string) (func() error, error) {
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("noop: listen: %w", err)
	}
	srv := grpc.NewServer()
	kmsapi.RegisterKeyManagementServiceServer(srv, noop{})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	return func() error {
		srv.GracefulStop()
		return <-done
	}, nil
}
