// Package manifests holds the deployment files; this test checks that they
// parse and agree with the code's production defaults.
package manifests

import (
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

func readYAML(t *testing.T, name string, into any) {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(data, into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func TestConfigIsValid(t *testing.T) {
	cfg, err := config.Load("config.yaml", registry.Builtin().Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.Builtin().Validate(cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Endpoint != config.ProductionEndpoint || keysetPath(t, cfg) != config.ProductionKeysetPath {
		t.Fatalf("config.yaml uses %s and %s; want the production paths", cfg.Endpoint, keysetPath(t, cfg))
	}
}

func TestEncryptionConfigPointsAtThePlugin(t *testing.T) {
	var ec struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Resources  []struct {
			Resources []string `json:"resources"`
			Providers []struct {
				KMS *struct {
					APIVersion string `json:"apiVersion"`
					Name       string `json:"name"`
					Endpoint   string `json:"endpoint"`
					Timeout    string `json:"timeout"`
				} `json:"kms,omitempty"`
				Identity *struct{} `json:"identity,omitempty"`
			} `json:"providers"`
		} `json:"resources"`
	}
	readYAML(t, "encryption-config.yaml", &ec)
	if ec.APIVersion != "apiserver.config.k8s.io/v1" || ec.Kind != "EncryptionConfiguration" || len(ec.Resources) != 1 {
		t.Fatalf("unexpected EncryptionConfiguration header: %+v", ec)
	}
	p := ec.Resources[0].Providers
	if len(p) != 2 || p[0].KMS == nil || p[1].Identity == nil {
		t.Fatalf("providers = %+v; want kms first, identity last", p)
	}
	if p[0].KMS.APIVersion != "v2" || p[0].KMS.Endpoint != config.ProductionEndpoint {
		t.Fatalf("kms provider = %+v; want v2 at %s", p[0].KMS, config.ProductionEndpoint)
	}
}

func TestStaticPodMountsWhatTheConfigUses(t *testing.T) {
	var pod struct {
		Spec struct {
			HostNetwork       bool   `json:"hostNetwork"`
			PriorityClassName string `json:"priorityClassName"`
			Containers        []struct {
				Args          []string `json:"args"`
				LivenessProbe struct {
					HTTPGet struct {
						Path string `json:"path"`
						Port int    `json:"port"`
					} `json:"httpGet"`
				} `json:"livenessProbe"`
				VolumeMounts []struct {
					MountPath string `json:"mountPath"`
				} `json:"volumeMounts"`
			} `json:"containers"`
		} `json:"spec"`
	}
	data, err := os.ReadFile("kms-plugin.static-pod.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &pod); err != nil {
		t.Fatal(err)
	}
	if !pod.Spec.HostNetwork || pod.Spec.PriorityClassName != "system-node-critical" || len(pod.Spec.Containers) != 1 {
		t.Fatalf("static pod spec = %+v", pod.Spec)
	}
	c := pod.Spec.Containers[0]
	if c.LivenessProbe.HTTPGet.Path != "/livez" || c.LivenessProbe.HTTPGet.Port != 8787 {
		t.Fatalf("liveness probe = %+v; want /livez on 8787", c.LivenessProbe)
	}
	cfg, err := config.Load("config.yaml", registry.Builtin().Default())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(cfg.HTTPAddr, ":8787") {
		t.Fatalf("config httpAddr %s does not match the probe port", cfg.HTTPAddr)
	}
	sock, _ := config.SocketPath(cfg.Endpoint)
	for _, path := range []string{sock, keysetPath(t, cfg), "/etc/kubernetes/kms-plugin/config.yaml"} {
		mounted := false
		for _, m := range c.VolumeMounts {
			if strings.HasPrefix(path, m.MountPath+"/") {
				mounted = true
			}
		}
		if !mounted {
			t.Errorf("%s is not under any volume mount of the static pod", path)
		}
	}
	if strings.Join(c.Args, " ") != "serve --config=/etc/kubernetes/kms-plugin/config.yaml" {
		t.Errorf("args = %q", c.Args)
	}
}

func TestSystemdUnit(t *testing.T) {
	data, err := os.ReadFile("kms-plugin.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	for _, want := range []string{"ExecStart=/usr/local/bin/kms-plugin serve --config=/etc/kubernetes/kms-plugin/config.yaml", "KillSignal=SIGTERM", "Restart=always", "[Install]"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
}

// keysetPath returns the local provider's keyset path that cfg configures.
func keysetPath(t *testing.T, cfg config.Config) string {
	t.Helper()
	_, s, err := registry.Builtin().Settings(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ls, ok := s.(*local.Settings)
	if !ok {
		t.Fatalf("config uses provider %s, not the local one", cfg.Provider)
	}
	return ls.KeysetPath
}
