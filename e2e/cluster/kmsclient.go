package cluster

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsapi "k8s.io/kms/apis/v2"
)

// DecryptStored asks the plugin, over its KMS v2 socket as kube-apiserver
// does after a restart (nothing cached), to decrypt the DEK source of a
// value stored in etcd. It returns the plugin's gRPC error, if any.
func (p *Plugin) DecryptStored(ctx context.Context, obj *kmstypes.EncryptedObject) error {
	conn, err := grpc.NewClient(p.Endpoint(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
	)
	if err != nil {
		return fmt.Errorf("dial %s: %w", p.Endpoint(), err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = kmsapi.NewKeyManagementServiceClient(conn).Decrypt(ctx, &kmsapi.DecryptRequest{
		Ciphertext: obj.EncryptedDEKSource, KeyId: obj.KeyID, Annotations: obj.Annotations, Uid: "e2e-decrypt-stored",
	})
	return err
}
