package install

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseAPIServer feeds arbitrary manifests to the kube-apiserver
// manifest patcher: it must never panic, and a manifest it patches must
// parse again.
func FuzzParseAPIServer(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "kubeadm-*", "kube-apiserver.yaml"))
	for _, s := range seeds {
		if data, err := os.ReadFile(s); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: kube-apiserver\n    command: [kube-apiserver]\n"))
	f.Add([]byte("apiVersion: v1\nkind: Pod\nspec: {containers: [{name: kube-apiserver, args: 3}], volumes: x}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := parseAPIServer(data)
		if err != nil {
			return
		}
		if err := p.setFlag("--encryption-provider-config", "/etc/kubernetes/enc/encryption-config.yaml"); err != nil {
			return
		}
		if err := p.ensureMount(hostMount{name: "kms-plugin-socket", path: "/var/run/kmsplugin"}); err != nil {
			return
		}
		out, err := p.doc.encode()
		if err != nil {
			return
		}
		if _, err := parseAPIServer(out); err != nil {
			t.Fatalf("patched manifest does not parse: %v\n%s", err, out)
		}
	})
}

// FuzzParseEncryptionConfig feeds arbitrary EncryptionConfigurations to the
// merger: it must never panic, and what it writes must parse again.
func FuzzParseEncryptionConfig(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("..", "..", "manifests", "encryption-config.yaml")); err == nil {
		f.Add(data)
	}
	f.Add([]byte("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: ['*.*']\n  providers:\n  - identity: {}\n"))
	f.Add([]byte("resources: [{providers: [{aescbc: {keys: [{name: k, secret: c2VjcmV0}]}}], resources: [secrets]}]\n"))
	k := kmsProvider{name: "kms-plugin", endpoint: "unix:///var/run/kmsplugin/socket.sock", timeout: "3s"}
	f.Fuzz(func(t *testing.T, data []byte) {
		ec, err := parseEncryptionConfig(data)
		if err != nil {
			return
		}
		if err := ec.checkConflicts(k); err != nil {
			return
		}
		if err := ec.install(k, []string{"secrets"}); err != nil {
			return
		}
		out, err := ec.doc.encode()
		if err != nil {
			return
		}
		if _, err := parseEncryptionConfig(out); err != nil {
			t.Fatalf("merged EncryptionConfiguration does not parse: %v\n%s", err, out)
		}
	})
}
