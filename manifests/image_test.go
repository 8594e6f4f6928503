package manifests

import (
	"os"
	"slices"
	"strings"
	"testing"
)

// TestImageBinaries checks that the image, the static pod and the rotation
// CronJobs agree on which binary runs: the image's entrypoint is the
// serve-only build, which the static pod uses by giving only args, and the
// CronJobs name the full binary, which alone has rotate.
func TestImageBinaries(t *testing.T) {
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	if df := string(data); !strings.Contains(df, "-tags serveonly") || !strings.Contains(df, "/out/kms-plugin /out/kms-plugin-serve /usr/local/bin/") {
		t.Error("Dockerfile does not build and copy both kms-plugin and the serve-only kms-plugin-serve")
	}
	for _, file := range []string{dockerfilePath, containerfilePath} {
		st := readStage(t, file)
		if !slices.Equal(st.Entrypoint, []string{"/usr/local/bin/kms-plugin-serve"}) {
			t.Errorf("%s: ENTRYPOINT is %q, not [/usr/local/bin/kms-plugin-serve]", file, st.Entrypoint)
		}
		for _, bin := range []string{"/usr/local/bin/kms-plugin", "/usr/local/bin/kms-plugin-serve"} {
			if _, ok := st.Files[bin]; !ok {
				t.Errorf("%s: the image has no %s", file, bin)
			}
		}
	}
	if data, err := os.ReadFile("../Makefile"); err != nil {
		t.Fatal(err)
	} else if mk := string(data); !strings.Contains(mk, "hack/image/build.sh $(BIN) $(SERVE_BIN)") || !strings.Contains(mk, "-tags serveonly") {
		t.Error("Makefile: make image does not hand make build's two binaries (BIN: every command, SERVE_BIN: -tags serveonly) to hack/image/build.sh")
	}

	pod := docs(t, "kms-plugin.static-pod.yaml")[0]
	c := get(pod, "spec", "containers", 0)
	if cmd := get(c, "command"); cmd != nil {
		t.Errorf("static pod sets command %v; it must run the image's entrypoint (kms-plugin-serve)", cmd)
	}
	if args := strs(t, get(c, "args")); len(args) == 0 || args[0] != "serve" {
		t.Errorf("static pod args = %v; want serve first", args)
	}

	for _, file := range rotationCronJobs {
		for _, obj := range docs(t, file) {
			if obj["kind"] != "CronJob" {
				continue
			}
			c := get(obj, "spec", "jobTemplate", "spec", "template", "spec", "containers", 0)
			if cmd := strs(t, get(c, "command")); !slices.Equal(cmd, []string{"/usr/local/bin/kms-plugin"}) {
				t.Errorf("%s: command = %v; want [/usr/local/bin/kms-plugin] (the entrypoint has no rotate)", file, cmd)
			}
		}
	}
}
