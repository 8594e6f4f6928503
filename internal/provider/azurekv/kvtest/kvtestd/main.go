// Command kvtestd runs the kvtest fake Key Vault, Entra ID and IMDS as a
// process of its own, for tests that drive another process (the e2e tests
// run kms-plugin serve against it). It is test tooling, never shipped.
//
//	kvtestd -state FILE [-hsm] [-tenant ID]
//
// It listens on 127.0.0.1 only, writes its addresses (kvtest.State, with the
// admin URL and the CA certificate file) to FILE once ready, serves
// kvtest.Server.AdminHandler on the admin URL, and runs until SIGTERM or
// SIGINT. A client process reaches the vault under its real-looking host
// name with HTTPS_PROXY and HTTP_PROXY set to the state's proxyURL and
// SSL_CERT_FILE set to its caFile.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kvtestd: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	statePath := flag.String("state", "", "write the server's addresses to this JSON file when ready (required)")
	hsm := flag.Bool("hsm", false, "be a Managed HSM")
	tenant := flag.String("tenant", "", "tenant ID (default kvtest.DefaultTenantID)")
	flag.Parse()
	if *statePath == "" {
		return errors.New("-state is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	srv, err := kvtest.Start(kvtest.Options{ManagedHSM: *hsm, TenantID: *tenant})
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	admin := &http.Server{Handler: srv.AdminHandler(), ReadHeaderTimeout: 10 * time.Second}
	go admin.Serve(ln) //nolint:errcheck // ends with Shutdown

	dir := filepath.Dir(*statePath)
	caFile := filepath.Join(dir, "kvtest-ca.pem")
	if err := os.WriteFile(caFile, srv.CACertPEM(), 0o644); err != nil {
		return err
	}
	st := srv.State()
	st.AdminURL = "http://" + ln.Addr().String()
	st.CAFile = caFile
	data, err := kvtest.MarshalState(st)
	if err != nil {
		return err
	}
	tmp := *statePath + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, *statePath); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "kvtestd: vault %s (TLS %s), proxy %s, admin %s\n", st.VaultURL, st.TLSAddr, st.ProxyURL, st.AdminURL)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return admin.Shutdown(sctx)
}
