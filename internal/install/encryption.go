package install

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// Provider kinds of an EncryptionConfiguration (apiserver.config.k8s.io/v1).
const (
	providerKMS       = "kms"
	providerIdentity  = "identity"
	providerAESCBC    = "aescbc"
	providerAESGCM    = "aesgcm"
	providerSecretbox = "secretbox"
)

// encryptionConfig is an EncryptionConfiguration as a node tree. Provider
// entries the installer does not own are kept node for node, so their keys
// and comments survive.
type encryptionConfig struct {
	doc     *yamlDoc
	entries *yaml.Node // the top-level "resources" sequence
}

// The typed mirror of apiserver.config.k8s.io/v1, used only to validate a
// file strictly (unknown fields and providers are errors, as in
// kube-apiserver).
type (
	ecFile struct {
		APIVersion string          `yaml:"apiVersion"`
		Kind       string          `yaml:"kind"`
		Resources  []ecResourceSet `yaml:"resources"`
	}
	ecResourceSet struct {
		Resources []string     `yaml:"resources"`
		Providers []ecProvider `yaml:"providers"`
	}
	ecProvider struct {
		AESGCM    *ecKeys   `yaml:"aesgcm"`
		AESCBC    *ecKeys   `yaml:"aescbc"`
		Secretbox *ecKeys   `yaml:"secretbox"`
		Identity  *struct{} `yaml:"identity"`
		KMS       *ecKMS    `yaml:"kms"`
	}
	ecKeys struct {
		Keys []struct {
			Name   string `yaml:"name"`
			Secret string `yaml:"secret"`
		} `yaml:"keys"`
	}
	ecKMS struct {
		APIVersion string `yaml:"apiVersion"`
		Name       string `yaml:"name"`
		CacheSize  *int32 `yaml:"cachesize"`
		Endpoint   string `yaml:"endpoint"`
		Timeout    string `yaml:"timeout"`
	}
)

// kmsProvider is the installer's own provider entry.
type kmsProvider struct {
	name     string
	endpoint string
	timeout  string
}

func (k kmsProvider) node() *yaml.Node {
	return mapNode(providerKMS, mapNode("apiVersion", "v2", "name", k.name, "endpoint", k.endpoint, "timeout", k.timeout))
}

// newEncryptionConfig returns an empty EncryptionConfiguration.
func newEncryptionConfig() *encryptionConfig {
	entries := seqNode()
	top := mapNode("apiVersion", "apiserver.config.k8s.io/v1", "kind", "EncryptionConfiguration", "resources", entries)
	top.HeadComment = "# kube-apiserver's EncryptionConfiguration, managed by `kms-plugin install`\n" +
		"# and `kms-plugin uninstall`. The first provider of each entry encrypts every\n" +
		"# write; the others only read what was stored before (identity: plaintext)."
	return &encryptionConfig{
		doc:     &yamlDoc{root: &yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{top}}, compact: false},
		entries: entries,
	}
}

// parseEncryptionConfig parses and validates an EncryptionConfiguration.
func parseEncryptionConfig(data []byte) (*encryptionConfig, error) {
	var typed ecFile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&typed); err != nil {
		return nil, fmt.Errorf("not a valid EncryptionConfiguration: %w", err)
	}
	if typed.APIVersion != "apiserver.config.k8s.io/v1" || typed.Kind != "EncryptionConfiguration" {
		return nil, fmt.Errorf("apiVersion/kind is %s/%s, want apiserver.config.k8s.io/v1/EncryptionConfiguration", typed.APIVersion, typed.Kind)
	}
	doc, err := parseYAML(data)
	if err != nil {
		return nil, err
	}
	entries := mapGet(doc.top(), "resources")
	if entries == nil {
		entries = seqNode()
		doc.top().Content = append(doc.top().Content, strNode("resources"), entries)
	}
	if !isKind(entries, yaml.SequenceNode) {
		return nil, errors.New("resources is not a list")
	}
	for i, e := range entries.Content {
		if !isKind(mapGet(e, "resources"), yaml.SequenceNode) || !isKind(mapGet(e, "providers"), yaml.SequenceNode) {
			return nil, fmt.Errorf("resources[%d]: needs resources and providers lists", i)
		}
		for j, p := range mapGet(e, "providers").Content {
			if kind := providerKind(p); kind == "" {
				return nil, fmt.Errorf("resources[%d].providers[%d]%s: unknown provider (want one of aescbc, aesgcm, secretbox, kms, identity)", i, j, nodeLine(p))
			}
		}
	}
	return &encryptionConfig{doc: doc, entries: entries}, nil
}

// providerKind returns the kind of a provider node (its only key), or ""
// when it is not exactly one known provider.
func providerKind(p *yaml.Node) string {
	if !isKind(p, yaml.MappingNode) || len(p.Content) != 2 {
		return ""
	}
	switch k := p.Content[0].Value; k {
	case providerKMS, providerIdentity, providerAESCBC, providerAESGCM, providerSecretbox:
		return k
	}
	return ""
}

// isOurs reports whether provider node p is the kms provider named name.
func isOurs(p *yaml.Node, name string) bool {
	return providerKind(p) == providerKMS && mapString(p.Content[1], "name") == name
}

// resourcesOf returns an entry's resource names.
func resourcesOf(e *yaml.Node) []string {
	var out []string
	for _, r := range mapGet(e, "resources").Content {
		out = append(out, r.Value)
	}
	return out
}

// providersOf returns an entry's providers sequence.
func providersOf(e *yaml.Node) *yaml.Node { return mapGet(e, "providers") }

// matchResource reports whether an entry's resource pattern covers
// resource r ("secrets", "deployments.apps"): an exact name, "*.*" (all),
// "*." (the core group) or "*.GROUP".
func matchResource(pattern, r string) bool {
	if pattern == r || pattern == "*.*" {
		return true
	}
	group, ok := strings.CutPrefix(pattern, "*.")
	if !ok {
		return false
	}
	_, rGroup, _ := strings.Cut(r, ".")
	return rGroup == group
}

// checkConflicts rejects an existing configuration that cannot take our
// provider: a kms provider of our name at another endpoint or API version,
// or another kms provider on our socket.
func (ec *encryptionConfig) checkConflicts(k kmsProvider) error {
	for i, e := range ec.entries.Content {
		for _, p := range providersOf(e).Content {
			if providerKind(p) != providerKMS {
				continue
			}
			kms := p.Content[1]
			name, endpoint, apiVersion := mapString(kms, "name"), mapString(kms, "endpoint"), mapString(kms, "apiVersion")
			switch {
			case name == k.name && endpoint != k.endpoint:
				return fmt.Errorf("resources[%d]%s: kms provider %q uses endpoint %s, not %s; pick another --provider-name or fix the endpoint", i, nodeLine(p), name, endpoint, k.endpoint)
			case name == k.name && apiVersion != "v2":
				return fmt.Errorf("resources[%d]%s: kms provider %q has apiVersion %q, not v2", i, nodeLine(p), name, apiVersion)
			case name != k.name && endpoint == k.endpoint:
				return fmt.Errorf("resources[%d]%s: kms provider %q already uses endpoint %s", i, nodeLine(p), name, endpoint)
			}
		}
	}
	return nil
}

// install puts our kms provider first for each resource in resources,
// keeping the providers that applied to it before (for reads) after it,
// with identity last. A resource not covered before gets [kms, identity]:
// its objects may be stored in plaintext.
func (ec *encryptionConfig) install(k kmsProvider, resources []string) error {
	if err := ec.checkConflicts(k); err != nil {
		return err
	}
	type newEntry struct {
		resources []string
		providers []*yaml.Node
		key       string // the inherited providers, encoded, for grouping
	}
	var fresh []*newEntry
	inPlace := map[*yaml.Node]bool{}
	for _, r := range resources {
		var match *yaml.Node
		for _, e := range ec.entries.Content {
			if slices.ContainsFunc(resourcesOf(e), func(p string) bool { return matchResource(p, r) }) {
				match = e
				break
			}
		}
		// An entry listing only resources we install for is updated in
		// place; otherwise r gets an entry of its own, before the others.
		if match != nil && !slices.ContainsFunc(resourcesOf(match), func(p string) bool { return !slices.Contains(resources, p) }) {
			inPlace[match] = true
			continue
		}
		var inherited []*yaml.Node
		if match == nil {
			inherited = []*yaml.Node{mapNode(providerIdentity, mapNode())}
		} else {
			for _, p := range providersOf(match).Content {
				if !isOurs(p, k.name) {
					inherited = append(inherited, cloneNode(p))
				}
			}
			// r moves out of the shared entry (a wildcard stays).
			rs := mapGet(match, "resources")
			for i := len(rs.Content) - 1; i >= 0; i-- {
				if rs.Content[i].Value == r {
					removeAt(rs, i)
				}
			}
		}
		enc, err := encodeYAML(seqNode(inherited...), true)
		if err != nil {
			return err
		}
		grouped := false
		for _, f := range fresh {
			if f.key == string(enc) {
				f.resources = append(f.resources, r)
				grouped = true
			}
		}
		if !grouped {
			fresh = append(fresh, &newEntry{resources: []string{r}, providers: inherited, key: string(enc)})
		}
	}
	// Drop entries emptied by moving resources out.
	for i := len(ec.entries.Content) - 1; i >= 0; i-- {
		if len(mapGet(ec.entries.Content[i], "resources").Content) == 0 {
			removeAt(ec.entries, i)
		}
	}
	for e := range inPlace {
		putFirst(providersOf(e), k)
	}
	for i, f := range fresh {
		rs := seqNode()
		for _, r := range f.resources {
			rs.Content = append(rs.Content, strNode(r))
		}
		ps := seqNode(f.providers...)
		putFirst(ps, k)
		insertAt(ec.entries, i, mapNode("resources", rs, "providers", ps))
	}
	return nil
}

// putFirst makes our provider the first of ps, replacing any copy of it,
// and moves identity to the end.
func putFirst(ps *yaml.Node, k kmsProvider) {
	var identity *yaml.Node
	for i := len(ps.Content) - 1; i >= 0; i-- {
		switch p := ps.Content[i]; {
		case isOurs(p, k.name):
			removeAt(ps, i)
		case providerKind(p) == providerIdentity && identity == nil:
			identity = p
			removeAt(ps, i)
		case providerKind(p) == providerIdentity:
			removeAt(ps, i)
		}
	}
	insertAt(ps, 0, k.node())
	if identity != nil {
		ps.Content = append(ps.Content, identity)
	}
}

// entriesWithOurs returns the entries that hold our provider.
func (ec *encryptionConfig) entriesWithOurs(name string) []*yaml.Node {
	var out []*yaml.Node
	for _, e := range ec.entries.Content {
		if slices.ContainsFunc(providersOf(e).Content, func(p *yaml.Node) bool { return isOurs(p, name) }) {
			out = append(out, e)
		}
	}
	return out
}

// writesWithOurs lists the resources whose writes our provider encrypts
// (entries where it is first).
func (ec *encryptionConfig) writesWithOurs(name string) []string {
	var out []string
	for _, e := range ec.entriesWithOurs(name) {
		if isOurs(providersOf(e).Content[0], name) {
			out = append(out, resourcesOf(e)...)
		}
	}
	return out
}

// decryptFirst is uninstall's first stage: in every entry holding our
// provider, the first provider after it that is not kms (what the node
// wrote with before install; identity when that was plaintext) moves to
// the front, so new writes no longer use the plugin while everything it
// wrote stays readable. Identity is added when there is none.
func (ec *encryptionConfig) decryptFirst(name string) {
	for _, e := range ec.entriesWithOurs(name) {
		ps := providersOf(e)
		if !isOurs(ps.Content[0], name) {
			continue // already done
		}
		next := -1
		for i, p := range ps.Content {
			if kind := providerKind(p); kind != providerKMS {
				next = i
				break
			}
		}
		if next < 0 {
			insertAt(ps, 0, mapNode(providerIdentity, mapNode()))
			continue
		}
		p := ps.Content[next]
		removeAt(ps, next)
		insertAt(ps, 0, p)
	}
}

// remove is uninstall's last stage: our provider leaves every entry; an
// entry left with identity alone (the default) goes too. It reports whether
// any entry remains.
func (ec *encryptionConfig) remove(name string) (remaining bool) {
	for _, e := range ec.entriesWithOurs(name) {
		ps := providersOf(e)
		for i := len(ps.Content) - 1; i >= 0; i-- {
			if isOurs(ps.Content[i], name) {
				removeAt(ps, i)
			}
		}
		if len(ps.Content) == 0 || (len(ps.Content) == 1 && providerKind(ps.Content[0]) == providerIdentity) {
			if i := slices.Index(ec.entries.Content, e); i >= 0 {
				removeAt(ec.entries, i)
			}
		}
	}
	return len(ec.entries.Content) > 0
}
