package install

import (
	"strings"
	"testing"
)

var testKMS = kmsProvider{name: "kms-plugin", endpoint: "unix:///var/run/kmsplugin/socket.sock", timeout: "3s"}

const ecHeader = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n"

// TestEncryptionConfigInstall checks how install merges its provider into
// existing EncryptionConfigurations: first for the configured resources,
// what applied before kept after it, identity last, everything else (keys,
// comments, other entries) untouched.
func TestEncryptionConfigInstall(t *testing.T) {
	for _, tt := range []struct {
		name      string
		resources []string
		in, want  string
	}{
		{
			name:      "aescbc before: kms first, aescbc kept for reads, identity last",
			resources: []string{"secrets"},
			in: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      # the old key
      - aescbc:
          keys:
            - name: key1
              secret: c2VjcmV0IGlzIHNlY3VyZSwgb3IgaXMgaXQ/Cg==
      - identity: {}
`,
			want: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
      # the old key
      - aescbc:
          keys:
            - name: key1
              secret: c2VjcmV0IGlzIHNlY3VyZSwgb3IgaXMgaXQ/Cg==
      - identity: {}
`,
		},
		{
			name:      "identity first moves last",
			resources: []string{"secrets"},
			in: ecHeader + `resources:
- resources: [secrets]
  providers:
  - identity: {}
  - secretbox:
      keys:
      - name: k
        secret: YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=
`,
			want: ecHeader + `resources:
- resources: [secrets]
  providers:
  - kms:
      apiVersion: v2
      name: kms-plugin
      endpoint: unix:///var/run/kmsplugin/socket.sock
      timeout: 3s
  - secretbox:
      keys:
      - name: k
        secret: YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=
  - identity: {}
`,
		},
		{
			name:      "shared entry is split; the other resource keeps its providers",
			resources: []string{"secrets"},
			in: ecHeader + `resources:
  - resources:
      - configmaps
      - secrets
    providers:
      - aesgcm:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - identity: {}
`,
			want: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
      - aesgcm:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - identity: {}
  - resources:
      - configmaps
    providers:
      - aesgcm:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - identity: {}
`,
		},
		{
			name:      "wildcard stays after a new entry that inherits its providers",
			resources: []string{"secrets", "deployments.apps"},
			in: ecHeader + `resources:
  - resources:
      - '*.*'
    providers:
      - aescbc:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
`,
			want: ecHeader + `resources:
  - resources:
      - secrets
      - deployments.apps
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
      - aescbc:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
  - resources:
      - '*.*'
    providers:
      - aescbc:
          keys:
            - name: k
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
`,
		},
		{
			name:      "uncovered resource gets kms and identity; unrelated entries stay",
			resources: []string{"secrets"},
			in: ecHeader + `resources:
  - resources:
      - events
    providers:
      - identity: {}
`,
			want: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
      - identity: {}
  - resources:
      - events
    providers:
      - identity: {}
`,
		},
		{
			name:      "after uninstall stage one, install puts kms first again",
			resources: []string{"secrets"},
			in: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - identity: {}
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
`,
			want: ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: kms-plugin
          endpoint: unix:///var/run/kmsplugin/socket.sock
          timeout: 3s
      - identity: {}
`,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ec, err := parseEncryptionConfig([]byte(tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if err := ec.install(testKMS, tt.resources); err != nil {
				t.Fatal(err)
			}
			got, err := ec.doc.encode()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Fatalf("install result differs:\n%s", unifiedDiff("want", "got", []byte(tt.want), got, 3))
			}
			// Installing again changes nothing.
			ec, err = parseEncryptionConfig(got)
			if err != nil {
				t.Fatal(err)
			}
			if err := ec.install(testKMS, tt.resources); err != nil {
				t.Fatal(err)
			}
			again, _ := ec.doc.encode()
			if string(again) != string(got) {
				t.Fatalf("second install changed the file:\n%s", unifiedDiff("first", "second", got, again, 3))
			}
		})
	}
}

// TestEncryptionConfigUninstall checks both uninstall stages on a
// configuration that had aescbc before install: stage one makes aescbc
// write again, stage two leaves what was there before install.
func TestEncryptionConfigUninstall(t *testing.T) {
	before := ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - aescbc:
          keys:
            - name: key1
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - identity: {}
  - resources:
      - configmaps
    providers:
      - identity: {}
`
	ec, err := parseEncryptionConfig([]byte(before))
	if err != nil {
		t.Fatal(err)
	}
	if err := ec.install(testKMS, []string{"secrets"}); err != nil {
		t.Fatal(err)
	}
	if got := ec.writesWithOurs("kms-plugin"); len(got) != 1 || got[0] != "secrets" {
		t.Fatalf("writesWithOurs = %v; want [secrets]", got)
	}
	ec.decryptFirst("kms-plugin")
	stage1, _ := ec.doc.encode()
	if !strings.Contains(string(stage1), `    providers:
      - aescbc:
          keys:
            - name: key1
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - kms:
`) {
		t.Fatalf("stage one does not put aescbc first and keep kms second:\n%s", stage1)
	}
	if got := ec.writesWithOurs("kms-plugin"); len(got) != 0 {
		t.Fatalf("after stage one, writesWithOurs = %v; want none", got)
	}
	if remaining := ec.remove("kms-plugin"); !remaining {
		t.Fatal("remove says nothing remains; aescbc and the configmaps entry do")
	}
	final, _ := ec.doc.encode()
	if string(final) != before {
		t.Fatalf("after both stages the file differs from before install:\n%s", unifiedDiff("before", "after", []byte(before), final, 3))
	}
}

func TestMatchResource(t *testing.T) {
	for _, tt := range []struct {
		pattern, resource string
		want              bool
	}{
		{"secrets", "secrets", true},
		{"secrets", "configmaps", false},
		{"*.*", "deployments.apps", true},
		{"*.", "secrets", true},
		{"*.", "deployments.apps", false},
		{"*.apps", "deployments.apps", true},
		{"*.apps", "secrets", false},
	} {
		if got := matchResource(tt.pattern, tt.resource); got != tt.want {
			t.Errorf("matchResource(%q, %q) = %v; want %v", tt.pattern, tt.resource, got, tt.want)
		}
	}
}

func TestEtcdKeyPrefixes(t *testing.T) {
	for _, tt := range []struct {
		prefix    string
		resources []string
		want      string
	}{
		{"/registry", []string{"secrets"}, "/registry/secrets/"},
		{"/registry/", []string{"secrets", "deployments.apps"}, "/registry/apps/deployments/ /registry/deployments/ /registry/secrets/"},
		{"custom", []string{"foos.example.com"}, "/custom/example.com/foos/ /custom/foos/"},
		{"/registry", []string{"secrets", "*.*"}, "/registry/"},
	} {
		if got := strings.Join(etcdKeyPrefixes(tt.prefix, tt.resources), " "); got != tt.want {
			t.Errorf("etcdKeyPrefixes(%q, %q) = %q; want %q", tt.prefix, tt.resources, got, tt.want)
		}
	}
}
