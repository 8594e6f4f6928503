package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

const keysetUsage = `Usage: kms-plugin keyset SUBCOMMAND [--local-keyset FILE | --config FILE]

Manage the local provider's Tink keyset. A running 'kms-plugin serve' on the
same file notices the change at its next provider poll.

Subcommands:
  rotate           add a key and make it current; prints the new version
  list             list key versions and their state
  retire VERSION   disable an old version (never the current one)
`

func runKeyset(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysetUsage)
		return errUsage
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("kms-plugin keyset "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "YAML config file of 'kms-plugin serve'")
	keysetPath := fs.String("local-keyset", "", "keyset file (default: from --config, else the serve default)")
	var version string
	if sub == "retire" {
		if len(args) == 0 || args[0] == "" || args[0][0] == '-' {
			fmt.Fprint(stderr, "kms-plugin keyset retire: missing VERSION\n\n"+keysetUsage)
			return errUsage
		}
		version, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	path := *keysetPath
	if path == "" {
		cfg := config.Default()
		if *cfgPath != "" {
			var err error
			if cfg, err = config.Load(*cfgPath); err != nil {
				return err
			}
		}
		path = cfg.Local.KeysetPath
	}
	p, err := local.New(local.Config{Path: path})
	if err != nil {
		return err
	}
	switch sub {
	case "rotate":
		v, err := p.Rotate(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, v)
	case "list":
		vs, err := p.Versions(ctx)
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
		if err := p.Retire(ctx, version); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "retired %s\n", version)
	default:
		fmt.Fprintf(stderr, "kms-plugin keyset: unknown subcommand %q\n\n%s", sub, keysetUsage)
		return errUsage
	}
	return nil
}
