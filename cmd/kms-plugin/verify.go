//go:build !serveonly

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// errStale is verify's error with --fail-on-stale.
var errStale = errors.New("objects are not under the expected key_id")

func runVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return verifyMain(ctx, args, stdout, stderr, dialEtcd)
}

// dialEtcd connects to the etcd the flags name; tests replace it.
func dialEtcd(f *etcdFlags) (etcdscan.Ranger, func(), error) {
	ec, err := f.dial()
	if err != nil || ec == nil {
		return nil, func() {}, err
	}
	return ec, func() { ec.Close() }, nil
}

// verifyMain is `kms-plugin verify`.
func verifyMain(ctx context.Context, args []string, stdout, stderr io.Writer, dial func(*etcdFlags) (etcdscan.Ranger, func(), error)) error {
	fs := flag.NewFlagSet("kms-plugin verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin verify [FLAGS]

Scans etcd (read only) and counts the objects of each resource per provider
and key_id, and the objects stored unencrypted. With an expected key_id
(--expect-key-id, or the first plugin's /status), objects under any other
key are stale; --fail-on-stale exits with 1 when any object is stale or
unencrypted.

Flags:
`)
		fs.PrintDefaults()
	}
	etcd := addEtcdFlags(fs, []string{"https://127.0.0.1:2379"})
	res := addResourceFlags(fs)
	expect := fs.String("expect-key-id", "", "the key_id every object should be under")
	var pluginEndpoints listFlag
	fs.Var(&pluginEndpoints, "plugin-endpoints", "plugin HTTP bases; the first one's /status keyID is the expected key_id")
	plugin := addPluginFlags(fs)
	output := fs.String("o", "table", "output: table or json")
	failOnStale := fs.Bool("fail-on-stale", false, "exit 1 when an object is not under the expected key_id or not encrypted")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long the scan may take")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("-o %q: want table or json", *output)
	}
	resources, err := res.list()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	expected := *expect
	if expected == "" && len(pluginEndpoints) > 0 {
		hc, _, err := plugin.client()
		if err != nil {
			return err
		}
		src := rotation.PluginSource{Endpoints: pluginEndpoints[:1], HTTP: hc}
		targets, err := src.Targets(ctx)
		if err != nil {
			return err
		}
		st := src.Ask(ctx, targets)[0]
		if st.Err != "" || st.KeyID() == "" {
			return fmt.Errorf("plugin %s: no key_id: %s", st.URL, st.Err)
		}
		expected = st.KeyID()
	}
	if *failOnStale && expected == "" {
		return errors.New("--fail-on-stale needs --expect-key-id or --plugin-endpoints")
	}
	ec, closeEtcd, err := dial(etcd)
	if err != nil {
		return err
	}
	defer closeEtcd()
	rep, err := rotation.Verify(ctx, rotation.VerifyConfig{
		Etcd: ec, EtcdPrefix: *etcd.prefix, Resources: resources,
		ProviderName: *res.providerName, ExpectedKeyID: expected,
	})
	if err != nil {
		return err
	}
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printReport(stdout, rep)
	}
	if *failOnStale && (rep.Stale > 0 || rep.Unencrypted > 0) {
		return fmt.Errorf("%w: %d stale, %d unencrypted", errStale, rep.Stale, rep.Unencrypted)
	}
	return nil
}

// printReport writes a verify report as a table.
func printReport(w io.Writer, rep *rotation.Report) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RESOURCE\tKIND\tPROVIDER\tKEY_ID_HASH\tOBJECTS\t")
	for _, rr := range rep.Resources {
		for _, k := range rr.ByKey {
			mark := ""
			switch {
			case k.Current:
				mark = "current"
			case rep.ExpectedKeyID != "":
				mark = "STALE"
			}
			hash := k.KeyIDHash
			if hash == "" {
				hash = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", rr.Resource, k.Kind, k.Provider, hash, k.Count, mark)
		}
		if rr.Unencrypted > 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", rr.Resource, "identity", "-", "-", rr.Unencrypted, "unencrypted")
		}
		if rr.Total == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t0\t\n", rr.Resource)
		}
	}
	tw.Flush()
	exp := "none given: counts only"
	if rep.ExpectedKeyID != "" {
		exp = "hash " + envelope.KeyIDHash(rep.ExpectedKeyID)
	}
	fmt.Fprintf(w, "\nexpected key_id: %s\n%d objects: %d current, %d stale, %d unencrypted (etcd revision %d)\n",
		exp, rep.Total, rep.Current, rep.Stale, rep.Unencrypted, rep.Revision)
	if len(rep.StaleSamples) > 0 {
		fmt.Fprintf(w, "stale, such as: %s\n", joinOr(rep.StaleSamples, ""))
	}
	if len(rep.UnencryptedSamples) > 0 {
		fmt.Fprintf(w, "unencrypted, such as: %s\n", joinOr(rep.UnencryptedSamples, ""))
	}
}
