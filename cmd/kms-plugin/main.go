// Command kms-plugin is a Kubernetes KMS v2 encryption plugin.
//
//	kms-plugin serve     answer kube-apiserver on a Unix socket
//	kms-plugin keyset    manage the local provider's keyset (rotate, list, retire)
//	kms-plugin doctor    check the key store setup and print fixes
//	kms-plugin install   install the plugin on a control-plane node
//	kms-plugin uninstall take it off again, keeping every object readable
//	kms-plugin rotate    rotate the key end to end: rotate, re-encrypt, verify, retire
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
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3".
var version = "dev"

// errUsage marks errors already explained by a usage message.
var errUsage = errors.New("usage")

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
  verify    count stored objects per resource, provider and key_id in etcd
  status    each plugin's health and key_id, the rotation in progress, the last one
  version   print version information

Run 'kms-plugin COMMAND -h' for a command's flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
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
	case "verify":
		return runVerify(ctx, args[1:], stdout, stderr)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, versionString())
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "kms-plugin: unknown command %q\n\n%s", args[0], usage)
		return errUsage
	}
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

// parseFlags parses args, printing usage on -h and flag errors.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errUsage
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %q\n", fs.Args())
		fs.Usage()
		return errUsage
	}
	return nil
}
