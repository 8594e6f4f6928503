package install

import (
	"strings"
	"testing"
)

// TestYAMLLayoutKept checks that both common sequence layouts come back
// byte for byte, and that another layout is flagged as restyled with its
// comments kept.
func TestYAMLLayoutKept(t *testing.T) {
	for _, tt := range []struct {
		name         string
		in           string
		wantRestyled bool
	}{
		{"compact (kubeadm)", "a:\n- b\n- c: d\n  e: f\n", false},
		{"indented", "a:\n  - b\n  - c: d\n    e: f\n", false},
		{"comments and quotes", "# head\na: \"1\" # one\nb:\n  - 'x'\n", false},
		{"four spaces", "a:\n    b: c\n", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			doc, err := parseYAML([]byte(tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if doc.restyled != tt.wantRestyled {
				t.Errorf("restyled = %v; want %v", doc.restyled, tt.wantRestyled)
			}
			out, err := doc.encode()
			if err != nil {
				t.Fatal(err)
			}
			if !tt.wantRestyled && string(out) != tt.in {
				t.Errorf("encode = %q; want %q", out, tt.in)
			}
		})
	}
}

// TestRestyledManifestKeepsContent patches a hand-indented manifest with
// comments: everything is kept and the plan says the file is re-indented.
func TestRestyledManifestKeepsContent(t *testing.T) {
	manifest := `# kube-apiserver, edited by hand
apiVersion: v1
kind: Pod
metadata:
    name: kube-apiserver   # keep me
    namespace: kube-system
spec:
    containers:
    -   name: kube-apiserver
        image: registry.k8s.io/kube-apiserver:v1.37.2
        command:
        - kube-apiserver
        - --etcd-servers=https://127.0.0.1:2379
        futureField: {a: 1}
    hostNetwork: true
`
	root := newRoot(t, map[string]string{DefaultPaths().KubeAPIServer: manifest})
	plan, err := newInstaller(t, root, nil).PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	c := plan.Changes[len(plan.Changes)-1]
	if c.Path != DefaultPaths().KubeAPIServer || !c.Restyled {
		t.Fatalf("last change %s restyled=%v; want kube-apiserver's manifest, restyled", c.Path, c.Restyled)
	}
	got := string(c.New)
	for _, want := range []string{"# kube-apiserver, edited by hand", "# keep me", "futureField:", "- --encryption-provider-config=", "name: kms-plugin-socket"} {
		if !strings.Contains(got, want) {
			t.Errorf("patched manifest lacks %q:\n%s", want, got)
		}
	}
	if !strings.Contains(string(plan.Diff()), "is re-indented") {
		t.Error("the diff does not warn about the re-indentation")
	}
}

// TestUneditedFileKeptAsIs: a file in a layout the encoder cannot
// reproduce is left byte for byte when nothing in it changes.
func TestUneditedFileKeptAsIs(t *testing.T) {
	paths := DefaultPaths()
	ec := "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n    -   resources: [configmaps]\n        providers:\n            -   identity: {}\n"
	root := newRoot(t, map[string]string{paths.KubeAPIServer: readFile(t, fixture), paths.EncryptionConfig: ec})
	// Stage one of uninstall has nothing to do here.
	plan, err := newInstaller(t, root, nil).PlanUninstall(t.Context(), UninstallOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !plan.Empty() {
		t.Fatalf("uninstall on a foreign EncryptionConfiguration plans:\n%s", plan.Diff())
	}
}
