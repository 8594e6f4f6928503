package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// maxClockSkew is the clock difference doctor reports as a problem: Entra
// ID refuses client assertions outside a 5-minute window, and token
// lifetimes assume roughly synchronized clocks.
const maxClockSkew = 2 * time.Minute

// errProblems is returned when doctor found a problem; the report says
// which.
var errProblems = errors.New("doctor found problems")

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return doctorMain(ctx, args, stdout, stderr, nil)
}

// doctorMain is `kms-plugin doctor`. transport carries the Azure calls; nil
// except in tests.
func doctorMain(ctx context.Context, args []string, stdout, stderr io.Writer, transport policy.Transporter) error {
	fs := flag.NewFlagSet("kms-plugin doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: kms-plugin doctor [FLAGS]\n\nChecks, with the same configuration as serve, that the key store works end to end:\nthe credential, the network path, the key, and a wrap/unwrap round trip. It prints\na fix for each problem and exits non-zero if there is one.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	loadConfig := configFlags(fs)
	timeout := fs.Duration("timeout", 60*time.Second, "give up after this long")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	r := &report{w: stdout}
	cfg, err := loadConfig()
	if err != nil {
		r.fail("configuration", err, "fix the configuration file or flags as the message says")
		return r.finish()
	}
	switch cfg.Provider {
	case config.ProviderAzureKeyVault:
		fmt.Fprintf(stdout, "kms-plugin doctor: provider %s, %s\n\n", cfg.Provider, describeAzure(cfg.Azure))
		r.ok("configuration", "valid")
		doctorAzure(ctx, r, cfg.Azure, transport)
	default:
		fmt.Fprintf(stdout, "kms-plugin doctor: provider %s\n\n", cfg.Provider)
		r.ok("configuration", "valid")
		store, err := doctorProvider(cfg)
		if err != nil {
			r.fail("key store", err, genericRemedy(err))
			r.skip("round trip", "needs the key store")
			return r.finish()
		}
		r.ok("key store", store.Name())
		doctorRoundTrip(ctx, r, store, genericRemedy)
		if h, ok := store.(provider.HealthChecker); ok {
			if err := h.Health(ctx); err != nil {
				r.fail("health", err, genericRemedy(err))
			} else {
				r.ok("health", "ok")
			}
		}
	}
	return r.finish()
}

// doctorProvider builds the configured store like serve does, except that
// it never creates a local keyset: doctor changes nothing.
func doctorProvider(cfg config.Config) (provider.Provider, error) {
	if cfg.Provider == config.ProviderLocal {
		p, err := local.New(local.Config{Path: cfg.Local.KeysetPath})
		if err != nil {
			return nil, err
		}
		return p, nil
	}
	return newProvider(cfg)
}

// doctorAzure checks the Azure setup step by step: credential, vault
// reachability and tenant, clock, token, key, round trip.
func doctorAzure(ctx context.Context, r *report, a config.AzureConfig, transport policy.Transporter) {
	p, desc, err := newAzureProvider(a, transport)
	if err != nil {
		r.fail("credential", err, "fix the azure.credential settings; files must exist and be readable by the plugin")
		r.skip("vault", "needs a credential")
		return
	}
	r.ok("credential", desc)

	probe, err := p.Probe(ctx)
	if err != nil {
		r.fail("vault", err, azurekv.Remedy(err))
		r.skip("token, key, round trip", "need the vault")
		return
	}
	r.ok("vault", fmt.Sprintf("%s answers; tenant %s, resource %s", p.VaultURL(), probe.TenantID, probe.Resource))
	if t := a.Credential.TenantID; t != "" && !strings.EqualFold(t, probe.TenantID) {
		r.fail("tenant", fmt.Errorf("the credential is for tenant %s but the vault belongs to tenant %s", t, probe.TenantID),
			"set azure.credential.tenantID to "+probe.TenantID+", or use a vault of tenant "+t)
	}

	switch skew := probe.Skew; {
	case probe.ServerTime.IsZero():
		r.skip("clock", "the vault sent no Date header")
	case skew > maxClockSkew || skew < -maxClockSkew:
		dir := "behind"
		if skew < 0 {
			dir = "ahead of"
		}
		r.fail("clock", fmt.Errorf("this node's clock is %s %s the vault's", abs(skew).Round(time.Second), dir),
			"synchronize the clock (chronyc tracking, timedatectl show-timesync): Entra ID refuses client assertions more than 5 minutes off")
	default:
		r.ok("clock", fmt.Sprintf("%s off the vault's Date header", abs(skew).Round(time.Second)))
	}

	if err := p.CheckCredential(ctx, probe); err != nil {
		r.fail("token", err, azurekv.Remedy(err))
		r.skip("key, round trip", "need a token")
		return
	}
	r.ok("token", "got an access token for "+probe.Resource)
	doctorRoundTrip(ctx, r, p, azurekv.Remedy)
}

// doctorRoundTrip reads the current key version, then wraps and unwraps a
// random key with it.
func doctorRoundTrip(ctx context.Context, r *report, p provider.Provider, remedy func(error) string) {
	v, err := p.CurrentVersion(ctx)
	if err != nil {
		r.fail("key", err, remedy(err))
		r.skip("round trip", "needs the key")
		return
	}
	r.ok("key", "current version "+v)
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		r.fail("round trip", err, "")
		return
	}
	w, err := p.Wrap(ctx, key)
	if err != nil {
		r.fail("wrap", err, remedy(err))
		return
	}
	got, err := p.Unwrap(ctx, w)
	switch {
	case err != nil:
		r.fail("unwrap", err, remedy(err))
	case !bytes.Equal(got, key):
		r.fail("round trip", errors.New("unwrap returned another key than was wrapped"), "report this: the key store or its configuration is inconsistent")
	default:
		r.ok("round trip", fmt.Sprintf("wrapped and unwrapped a 32-byte key (%d bytes wrapped)", len(w.Ciphertext)))
	}
}

// genericRemedy suggests a fix from the provider error values.
func genericRemedy(err error) string {
	switch {
	case errors.Is(err, provider.ErrPermissionDenied):
		return "the key store refused the plugin's identity: give it access to the key"
	case errors.Is(err, provider.ErrKeyDisabled):
		return "the current key version is disabled: enable it or rotate to a new one"
	case errors.Is(err, provider.ErrKeyNotFound):
		return "the key does not exist: check the key settings"
	case errors.Is(err, provider.ErrUnavailable):
		return "the key store cannot be reached: check the path to it"
	case strings.Contains(err.Error(), "readable by its owner only"):
		return "chmod 600 the keyset file and make the plugin's user its owner"
	case strings.Contains(err.Error(), "no such file"):
		return "check the keyset path; serve creates a missing keyset on first start (doctor does not)"
	}
	return ""
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// report prints one line per check, with a fix under each failure.
type report struct {
	w        io.Writer
	problems int
}

func (r *report) line(status, check, detail string) {
	fmt.Fprintf(r.w, "%-7s %-14s %s\n", status, check, detail)
}

func (r *report) ok(check, detail string) { r.line("[ok]", check, detail) }

func (r *report) skip(check, why string) { r.line("[skip]", check, why) }

func (r *report) fail(check string, err error, fix string) {
	r.problems++
	r.line("[FAIL]", check, err.Error())
	if fix != "" {
		fmt.Fprintf(r.w, "%-7s %-14s fix: %s\n", "", "", fix)
	}
}

func (r *report) finish() error {
	if r.problems == 0 {
		fmt.Fprintln(r.w, "\nNo problems found.")
		return nil
	}
	fmt.Fprintf(r.w, "\n%d problem(s) found.\n", r.problems)
	return errProblems
}
