//go:build !serveonly

package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// clusterStatus is the JSON of `kms-plugin status -o json`: add fields,
// never rename them.
type clusterStatus struct {
	Plugins []rotation.PluginStatus `json:"plugins"`
	// PluginsError says why the plugins could not be listed.
	PluginsError string `json:"pluginsError,omitempty"`
	// Agree is true when every plugin is ready and on the same key_id.
	Agree bool               `json:"agree"`
	Lease rotation.LeaseInfo `json:"lease"`
	// State is the rotation state ConfigMap's content.
	State *rotation.State `json:"state,omitempty"`
	// StateError says why the state could not be read.
	StateError string    `json:"stateError,omitempty"`
	Now        time.Time `json:"now"`
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return statusMain(ctx, args, stdout, stderr, realClients, time.Now)
}

func statusMain(ctx context.Context, args []string, stdout, stderr io.Writer, clients clientFactory, now func() time.Time) error {
	fs := flag.NewFlagSet("kms-plugin status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin status [FLAGS]

One screen for the cluster: each control-plane plugin's health and key_id
hash, the rotation in progress (stage, progress, Lease holder), the last
completed rotation and the counts of the last verify.

Flags:
`)
		fs.PrintDefaults()
	}
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
	namespace := fs.String("namespace", rotation.DefaultNamespace, "namespace of the rotation's Lease and state ConfigMap")
	name := fs.String("name", rotation.DefaultName, "Lease name; the state ConfigMap is NAME-state")
	var pluginEndpoints listFlag
	fs.Var(&pluginEndpoints, "plugin-endpoints", "plugin HTTP bases, comma-separated (default: every control-plane Node's InternalIP and --plugin-port)")
	pluginPort := fs.Int("plugin-port", rotation.DefaultPluginPort, "plugin HTTP port on discovered control-plane Nodes")
	plugin := addPluginFlags(fs)
	output := fs.String("o", "table", "output: table or json")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the cluster and the plugins")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("-o %q: want table or json", *output)
	}
	hc, scheme, err := plugin.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	out := clusterStatus{Now: now().UTC()}
	cc, cerr := clients(*kubeconfig, nil, 20, 40)
	src := rotation.PluginSource{Endpoints: pluginEndpoints, Port: *pluginPort, Scheme: scheme, HTTP: hc}
	if cerr == nil {
		src.Client = cc.client
	}
	targets, err := src.Targets(ctx)
	if err != nil {
		out.PluginsError = err.Error()
		if cerr != nil && len(pluginEndpoints) == 0 {
			out.PluginsError = cerr.Error()
		}
	} else {
		out.Plugins = src.Ask(ctx, targets)
		out.Agree = len(out.Plugins) > 0
		for _, p := range out.Plugins {
			out.Agree = out.Agree && p.Healthy() && p.KeyID() == out.Plugins[0].KeyID()
		}
	}
	if cerr != nil {
		out.StateError = cerr.Error()
	} else {
		if out.State, err = rotation.LoadState(ctx, cc.client, *namespace, *name); err != nil {
			out.StateError = err.Error()
		}
		if out.Lease, err = rotation.ReadLease(ctx, cc.client, *namespace, *name); err != nil && out.StateError == "" {
			out.StateError = err.Error()
		}
	}
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	printStatus(stdout, &out)
	return nil
}

func hashOf(keyID string) string {
	if keyID == "" {
		return "-"
	}
	return envelope.KeyIDHash(keyID)
}

// ago formats t relative to now: "2026-01-02T03:04:05Z (3d ago)".
func ago(t time.Time, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s (%s ago)", t.UTC().Format(time.RFC3339), rotation.HumanDuration(now.Sub(t)))
}

func printStatus(w io.Writer, s *clusterStatus) {
	fmt.Fprintln(w, "PLUGINS")
	if s.PluginsError != "" {
		fmt.Fprintf(w, "  unavailable: %s\n", s.PluginsError)
	} else {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  NODE\tENDPOINT\tREADY\tPROVIDER\tKEY_ID_HASH\tREMOTE_VERSION\t")
		for _, p := range s.Plugins {
			if p.Status == nil {
				fmt.Fprintf(tw, "  %s\t%s\tdown\t-\t-\t-\t%s\n", p.Node, p.URL, p.Err)
				continue
			}
			ready := "yes"
			if !p.Status.Ready {
				ready = "no"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Node, p.URL, ready, p.Status.Provider, hashOf(p.Status.KeyID), p.Status.RemoteVersion, p.Status.LastError)
		}
		tw.Flush()
		if s.Agree {
			fmt.Fprintf(w, "  all %d plugins ready on key_id hash %s\n", len(s.Plugins), hashOf(s.Plugins[0].KeyID()))
		} else {
			fmt.Fprintln(w, "  NOT all plugins are ready and on the same key_id: a rotation would stop at preflight")
		}
	}
	fmt.Fprintln(w)
	if s.StateError != "" {
		fmt.Fprintf(w, "ROTATION\n  state unavailable: %s\n", s.StateError)
		return
	}
	st := s.State
	if l := s.Lease; l.Holder != "" {
		renewed := "-"
		if l.RenewTime != nil {
			renewed = rotation.HumanDuration(s.Now.Sub(*l.RenewTime)) + " ago"
		}
		fmt.Fprintf(w, "LEASE\n  held by %s (renewed %s)\n\n", l.Holder, renewed)
	}
	if st == nil || st.Rotation == nil {
		fmt.Fprintln(w, "ROTATION\n  none recorded yet")
	} else {
		r := st.Rotation
		fmt.Fprintf(w, "ROTATION %s\n", r.ID)
		fmt.Fprintf(w, "  stage:     %s (%s)\n", r.Stage, r.Status)
		fmt.Fprintf(w, "  key_id:    %s -> %s (version %s -> %s)\n", hashOf(r.OldKeyID), hashOf(r.NewKeyID), orDash(r.OldVersion), orDash(r.NewVersion))
		fmt.Fprintf(w, "  started:   %s, %d run(s), last by %s\n", ago(r.StartedAt, s.Now), r.Runs, orDash(r.Holder))
		if r.FinishedAt != nil {
			fmt.Fprintf(w, "  finished:  %s\n", ago(*r.FinishedAt, s.Now))
		}
		var stages []string
		for _, sr := range r.Stages {
			stages = append(stages, fmt.Sprintf("%s %s", sr.Stage, sr.Status))
		}
		fmt.Fprintf(w, "  stages:    %s\n", strings.Join(stages, ", "))
		for _, p := range r.Progress {
			total := ""
			if p.Estimate > 0 {
				total = fmt.Sprintf(" of ~%d", p.Estimate)
			}
			state := "in progress"
			if p.Done {
				state = "done"
			}
			fmt.Fprintf(w, "  %-10s %s: %d listed%s, %d rewritten, %d already current, %d deleted meanwhile, %d conflicts retried, %d failed\n",
				p.Resource+":", state, p.Listed, total, p.Rewritten, p.SkippedCurrent, p.SkippedDeleted, p.ConflictsRetried, p.Failed)
		}
		for _, sr := range r.Stages {
			if sr.Note != "" {
				fmt.Fprintf(w, "  %-10s %s\n", string(sr.Stage)+":", sr.Note)
			}
		}
		if r.LastError != "" {
			fmt.Fprintf(w, "  error:     %s\n", r.LastError)
		}
		if len(r.Retired) > 0 {
			fmt.Fprintf(w, "  retired:   %s\n", strings.Join(r.Retired, ", "))
		}
	}
	fmt.Fprintln(w)
	if st != nil && st.LastCompleted != nil {
		c := st.LastCompleted
		fmt.Fprintf(w, "LAST COMPLETED ROTATION\n  %s: key_id hash %s -> %s, %d objects rewritten, retired: %s\n\n",
			ago(c.FinishedAt, s.Now), hashOf(c.OldKeyID), hashOf(c.NewKeyID), c.Rewritten, joinOr(c.Retired, "none"))
	} else {
		fmt.Fprintln(w, "LAST COMPLETED ROTATION\n  none")
		fmt.Fprintln(w)
	}
	if st != nil && st.LastVerify != nil {
		v := st.LastVerify
		fmt.Fprintf(w, "LAST VERIFY %s\n  %d objects: %d under key_id hash %s, %d stale, %d unencrypted\n",
			ago(v.At, s.Now), v.Total, v.Current, hashOf(v.ExpectedKeyID), v.Stale, v.Unencrypted)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, rr := range v.Resources {
			for _, k := range rr.ByKey {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t\n", rr.Resource, k.Provider, hashOf(k.KeyID), k.Count)
			}
			if rr.Unencrypted > 0 {
				fmt.Fprintf(tw, "  %s\t(unencrypted)\t-\t%d\t\n", rr.Resource, rr.Unencrypted)
			}
		}
		tw.Flush()
	} else {
		fmt.Fprintln(w, "LAST VERIFY\n  none")
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
