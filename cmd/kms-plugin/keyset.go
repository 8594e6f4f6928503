package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

const keysetUsage = `Usage: kms-plugin keyset SUBCOMMAND [--config FILE] [FLAGS]

Manage the key versions of the configured key store (by default the local
provider's Tink keyset), with the same configuration and flags as serve,
such as --local-keyset FILE. A running 'kms-plugin serve' notices the change
at its next provider poll.

Subcommands:
  rotate           add a key version and make it current; prints the new version
  list             list key versions and their state
  retire VERSION   disable an old version (never the current one)
`

func runKeyset(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysetUsage)
		return errUsage
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "rotate", "list", "retire":
	case "-h", "-help", "--help":
		fmt.Fprint(stdout, keysetUsage)
		return nil
	default:
		fmt.Fprintf(stderr, "kms-plugin keyset: unknown subcommand %q (run 'kms-plugin keyset -h' for usage)\n", sub)
		return errUsage
	}
	fs := flag.NewFlagSet("kms-plugin keyset "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), keysetUsage+"\nFlags:\n")
		fs.PrintDefaults()
	}
	loadConfig := configFlags(fs)
	var version string
	if sub == "retire" && len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		version, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if sub == "retire" && version == "" {
		fmt.Fprint(stderr, "kms-plugin keyset retire: missing VERSION (run 'kms-plugin keyset retire -h' for usage)\n")
		return errUsage
	}
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	// keyset changes the key material the plugin uses: it never creates it.
	p, err := registry.Builtin().Open(ctx, cfg, provider.OpenOptions{})
	if err != nil {
		return err
	}
	switch sub {
	case "rotate":
		r, ok := p.(provider.Rotator)
		if !ok {
			return unsupported(p, "create key versions")
		}
		v, err := r.Rotate(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, v)
	case "list":
		l, ok := p.(provider.VersionLister)
		if !ok {
			return unsupported(p, "list its key versions")
		}
		vs, err := l.Versions(ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VERSION\tSTATE\tCURRENT")
		for _, v := range vs {
			cur := ""
			if v.Current {
				cur = "*"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", v.Version, v.State, cur)
		}
		return tw.Flush()
	case "retire":
		r, ok := p.(provider.Retirer)
		if !ok {
			return unsupported(p, "retire key versions")
		}
		if err := r.Retire(ctx, version); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "retired %s\n", version)
	default:
		fmt.Fprintf(stderr, "kms-plugin keyset: unknown subcommand %q\n\n%s", sub, keysetUsage)
		return errUsage
	}
	return nil
}

// unsupported is the error for a store that cannot do what a keyset
// subcommand asks.
func unsupported(p provider.Provider, what string) error {
	return fmt.Errorf("keyset: the %s key store cannot %s through kms-plugin; use the store's own tools", p.Name(), what)
}
