// Command kms-plugin is a Kubernetes KMS v2 encryption plugin.
//
//	kms-plugin serve     answer kube-apiserver on a Unix socket
//	kms-plugin keyset    manage the local provider's keyset (rotate, list, retire)
//	kms-plugin doctor    check the key store setup and print fixes
//	kms-plugin install   install the plugin on a control-plane node
//	kms-plugin uninstall take it off again, keeping every object readable
//	kms-plugin rotate    rotate the key end to end: rotate, re-encrypt, verify, retire
//	kms-plugin reencrypt rewrite every object to the first provider and verify it
//	kms-plugin verify    count stored objects per key_id in etcd
//	kms-plugin status    the plugins, the rotation in progress and the last one
//	kms-plugin version   print version information
//
// main only sets up the signal context and calls run; each subcommand turns
// its flags and config file into Config structs and calls into internal/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3".
var version = "dev"

// errUsage marks a command-line mistake already explained on stderr: run
// makes it exit code 2 (exitUsage).
var errUsage = errors.New("usage")

// Exit codes: 0 success (and help asked for), 1 failure, 2 a command-line
// mistake (unknown command, unknown flag or bad flag value, stray or missing
// argument). rotate also exits 2 when another run holds its Lease.
const exitUsage = 2

// helpRequest is what parseFlags returns for -h or --help: run prints the
// command's usage to stdout and returns nil.
type helpRequest struct{ fs *flag.FlagSet }

func (*helpRequest) Error() string { return "help requested" }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, errUsage) {
			fmt.Fprintf(os.Stderr, "kms-plugin: %v\n", err)
		}
		os.Exit(exitCode(err))
	}
}

const usage = `Usage: kms-plugin COMMAND [FLAGS]

Commands:
  serve     run the KMS v2 plugin (gRPC on a Unix socket)
  keyset    manage the local provider's keyset: rotate, list, retire
  doctor    check the key store setup end to end and print a fix for each problem
  install   install the plugin on this control-plane node (idempotent; --dry-run shows the diff)
  uninstall take the plugin off this node, in stages that keep every object readable
  rotate    rotate the key end to end (Lease-locked, resumable; cron it with --min-age)
  reencrypt rewrite every object to the provider now first, then verify it in etcd (resumable)
  verify    count stored objects per resource, provider and key_id in etcd
  status    each plugin's health and key_id, the rotation in progress, the last one
  version   print version information

Run 'kms-plugin help COMMAND' (or 'kms-plugin COMMAND -h') for a command's flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{code: exitUsage, err: errUsage}
	}
	if args[0] == "help" && len(args) > 1 {
		// help COMMAND [SUBCOMMAND] is COMMAND [SUBCOMMAND] -h.
		args = append(slices.Clone(args[1:]), "-h")
	}
	err := dispatch(ctx, args, stdout, stderr)
	var help *helpRequest
	var ee *exitError
	switch {
	case errors.As(err, &help):
		help.fs.SetOutput(stdout)
		help.fs.Usage()
		return nil
	case errors.Is(err, errUsage) && !errors.As(err, &ee):
		return &exitError{code: exitUsage, err: err}
	}
	return err
}

// dispatch runs the command args[0].
func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	switch args[0] {
	case "serve":
		return runServe(ctx, args[1:], stdout, stderr)
	case "keyset":
		return runKeyset(ctx, args[1:], stdout, stderr)
	case "doctor":
		return runDoctor(ctx, args[1:], stdout, stderr)
	case "install":
		return runInstall(ctx, args[1:], stdout, stderr)
	case "uninstall":
		return runUninstall(ctx, args[1:], stdout, stderr)
	case "rotate":
		return runRotate(ctx, args[1:], stdout, stderr)
	case "reencrypt":
		return runReencrypt(ctx, args[1:], stdout, stderr)
	case "verify":
		return runVerify(ctx, args[1:], stdout, stderr)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		return runVersion(args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "kms-plugin: unknown command %q (run 'kms-plugin help' for the list)\n", args[0])
		return errUsage
	}
}

func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kms-plugin version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: kms-plugin version\n\nPrints the version, the commit, the Go version and the platform.\n")
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	fmt.Fprintln(stdout, versionString())
	return nil
}

func versionString() string {
	commit := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				commit = s.Value
			}
		}
	}
	return fmt.Sprintf("kms-plugin %s (commit %s, %s, %s/%s, KMS API v2)", version, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// parseFlags parses a command's flags. For -h or --help it returns a
// *helpRequest (run prints the usage to stdout and exits 0). For an unknown
// flag, a bad value or a stray argument it prints one line naming it, with a
// hint to run -h, and returns errUsage (exit code 2).
func parseFlags(fs *flag.FlagSet, args []string) error {
	out := fs.Output()
	fs.SetOutput(io.Discard) // flag prints the whole usage with every error
	err := fs.Parse(args)
	fs.SetOutput(out)
	if errors.Is(err, flag.ErrHelp) {
		return &helpRequest{fs: fs}
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if err != nil {
		fmt.Fprintf(out, "%s: %v (run '%s -h' for usage)\n", fs.Name(), err, fs.Name())
		return errUsage
	}
	return nil
}

// exitError carries a process exit code other than 1.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// exitCode is the process exit code for an error returned by run: 1, or the
// code an exitError carries.
func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}
