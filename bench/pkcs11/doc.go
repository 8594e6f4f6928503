// Command pkcs11 measures what the PKCS#11 provider costs the HSM, on a
// temporary SoftHSM2 token:
//
//  1. kube-apiserver cold start: a fresh plugin (new provider, new
//     session, empty cache) decrypts -seeds DEK seeds: HSM unwraps
//     counted (the hierarchy's promise: one per local KEK), against the
//     same seeds unwrapped one by one in the HSM.
//  2. The warm Decrypt path over the gRPC socket: the shipped assembly
//     (internal/plugin) on the pkcs11 provider and on the local provider,
//     and a no-op KMS v2 server as the transport floor, in the same run,
//     alternating, with the HSM calls made while warm counted.
//  3. HSM calls per node-hour at idle: the plugin on the pkcs11 provider
//     with the default poll interval, left idle for -idle, its calls into
//     the module counted and extrapolated to an hour.
//
// It needs cgo and the pkcs11 tag:
//
//	CGO_ENABLED=1 go run -tags pkcs11 ./bench/pkcs11 [-seeds 1000] [-calls 5000] [-idle 3m] [-out FILE]
package main
