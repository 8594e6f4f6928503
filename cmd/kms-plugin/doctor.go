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

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// errProblems is returned when doctor found a problem; the report says
// which.
var errProblems = errors.New("doctor found problems")

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return doctorMain(ctx, args, stdout, stderr, nil)
}

// doctorMain is `kms-plugin doctor`. transport carries the key store's
// HTTP calls; nil except in tests.
func doctorMain(ctx context.Context, args []string, stdout, stderr io.Writer, transport provider.Transport) error {
	fs := flag.NewFlagSet("kms-plugin doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: kms-plugin doctor [FLAGS]\n\nChecks, with the same configuration as serve, that the key store works end to end:\nthe credential, the network path, the key, and a wrap/unwrap round trip. It prints\na fix for each problem and exits non-zero if there is one.\n\nFlags:\n")
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
	var settings provider.Settings
	if err == nil {
		_, settings, err = registry.Builtin().Settings(cfg)
	}
	if err != nil {
		r.Fail("configuration", err, "fix the configuration file or flags as the message says")
		return r.finish()
	}
	header := "kms-plugin doctor: provider " + cfg.Provider
	if d, ok := settings.(provider.Describer); ok {
		header += ", " + d.Describe()
	}
	fmt.Fprintf(stdout, "%s\n\n", header)
	r.OK("configuration", "valid")
	// doctor changes nothing: it never creates key material.
	opts := provider.OpenOptions{Transport: transport}
	if d, ok := settings.(provider.Doctor); ok {
		if store := d.Doctor(ctx, r, opts); store != nil {
			doctorRoundTrip(ctx, r, store, d.Remedy)
		}
		return r.finish()
	}
	store, err := settings.Open(ctx, opts)
	if err != nil {
		r.Fail("key store", err, genericRemedy(err))
		r.Skip("round trip", "needs the key store")
		return r.finish()
	}
	r.OK("key store", store.Name())
	doctorRoundTrip(ctx, r, store, genericRemedy)
	if h, ok := store.(provider.HealthChecker); ok {
		if err := h.Health(ctx); err != nil {
			r.Fail("health", err, genericRemedy(err))
		} else {
			r.OK("health", "ok")
		}
	}
	return r.finish()
}

// doctorRoundTrip reads the current key version, then wraps and unwraps a
// random key with it.
func doctorRoundTrip(ctx context.Context, r *report, p provider.Provider, remedy func(error) string) {
	v, err := p.CurrentVersion(ctx)
	if err != nil {
		r.Fail("key", err, remedy(err))
		r.Skip("round trip", "needs the key")
		return
	}
	r.OK("key", "current version "+v)
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		r.Fail("round trip", err, "")
		return
	}
	w, err := p.Wrap(ctx, key)
	if err != nil {
		r.Fail("wrap", err, remedy(err))
		return
	}
	got, err := p.Unwrap(ctx, w)
	switch {
	case err != nil:
		r.Fail("unwrap", err, remedy(err))
	case !bytes.Equal(got, key):
		r.Fail("round trip", errors.New("unwrap returned another key than was wrapped"), "report this: the key store or its configuration is inconsistent")
	default:
		r.OK("round trip", fmt.Sprintf("wrapped and unwrapped a 32-byte key (%d bytes wrapped)", len(w.Ciphertext)))
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

// report prints one line per check, with a fix under each failure. It is
// the provider.Checklist of key stores' own doctor checks.
type report struct {
	w        io.Writer
	problems int
}

func (r *report) line(status, check, detail string) {
	fmt.Fprintf(r.w, "%-7s %-14s %s\n", status, check, detail)
}

var _ provider.Checklist = (*report)(nil)

// OK implements provider.Checklist.
func (r *report) OK(check, detail string) { r.line("[ok]", check, detail) }

// Skip implements provider.Checklist.
func (r *report) Skip(check, why string) { r.line("[skip]", check, why) }

// Fail implements provider.Checklist.
func (r *report) Fail(check string, err error, fix string) {
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
