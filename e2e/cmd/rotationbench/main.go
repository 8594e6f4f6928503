// Command rotationbench runs the key-rotation benchmark (package
// rotationbench) at one or more sizes and writes its Markdown report.
//
//	cd e2e && go run ./cmd/rotationbench -sizes 1000,10000 -out ../bench/results/rotation.md
//
// It needs the binaries the e2e tests use (KMS_PLUGIN_BIN, else built;
// KUBE_APISERVER_BIN, ETCD_BIN and KUBECTL_BIN, else e2e/tools/build.sh's
// cache). It lives in the e2e module, not in bench/, because it runs the e2e
// harness (etcd, kube-apiserver, kvtestd) and its Kubernetes dependencies.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
	"github.com/kms-plugin/kms-plugin/e2e/rotationbench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "rotationbench: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	sizes := flag.String("sizes", "1000,10000", "comma-separated numbers of Secrets, one run each")
	out := flag.String("out", "", "write the Markdown report here (default: stdout)")
	variants := flag.String("rotate-variants", ";--qps 200 --workers 8", "rotate runs per size, separated by ';', each the extra flags of one run (empty: the defaults)")
	repeats := flag.Int("repeats", 3, "runs of both paths per size, alternating; the report gives medians")
	flag.Parse()
	var ns []int
	for _, s := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			return fmt.Errorf("-sizes: %q is not a positive number", s)
		}
		ns = append(ns, n)
	}
	plugin, cleanup, err := cluster.PluginBinary(ctx)
	if err != nil {
		return err
	}
	defer cleanup()
	var rotateVariants [][]string
	for _, v := range strings.Split(*variants, ";") {
		rotateVariants = append(rotateVariants, strings.Fields(v))
	}
	cfg := rotationbench.Config{PluginBinary: plugin, RotateVariants: rotateVariants, Repeats: *repeats, Logf: func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}}
	if cfg.KubeAPIServerBinary, err = cluster.KubeAPIServerBinary(); err != nil {
		return err
	}
	if cfg.EtcdBinary, err = cluster.EtcdBinary(); err != nil {
		return err
	}
	if cfg.KubectlBinary, err = cluster.KubectlBinary(); err != nil {
		return err
	}
	env := rotationbench.Env{
		Date: time.Now(), CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), Kernel: kernel(),
		Plugin: firstLine(output(plugin, "version")), KubeAPIServer: cluster.KubeAPIServerVersion, Etcd: cluster.EtcdVersion,
		Kubectl: cluster.KubectlVersion,
	}
	var results []*rotationbench.Result
	for _, n := range ns {
		cfg.Secrets = n
		fmt.Fprintf(os.Stderr, "== %d Secrets\n", n)
		r, err := rotationbench.Run(ctx, cfg)
		if err != nil {
			return fmt.Errorf("%d Secrets: %w", n, err)
		}
		for _, k := range r.Kubectls {
			if k.Verify.Stale != 0 {
				return fmt.Errorf("%d Secrets: %d stale objects after the kubectl path", n, k.Verify.Stale)
			}
		}
		for _, x := range r.Rotates {
			if x.Verify.Stale != 0 {
				return fmt.Errorf("%d Secrets: %d stale objects after rotate %s", n, x.Verify.Stale, strings.Join(x.Args, " "))
			}
		}
		results = append(results, r)
	}
	var buf bytes.Buffer
	if err := rotationbench.WriteMarkdown(&buf, env, results); err != nil {
		return err
	}
	if *out == "" {
		_, err := os.Stdout.Write(buf.Bytes())
		return err
	}
	return os.WriteFile(*out, buf.Bytes(), 0o644)
}

func output(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func kernel() string {
	return "Linux " + output("uname", "-r")
}
