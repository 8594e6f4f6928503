package install

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// kube-apiserver flags the installer manages.
const (
	flagEncryptionConfig = "encryption-provider-config"
	flagAutomaticReload  = "encryption-provider-config-automatic-reload"
)

// Names of the volumes the installer adds to kube-apiserver's static pod.
// manifests/kubeadm-clusterconfiguration.yaml uses the same names, so a
// node set up by kubeadm with that file needs no patch.
const (
	VolumeEncryptionConfig = "kms-plugin-encryption-config"
	VolumeSocket           = "kms-plugin-socket"
)

// apiserverPod is kube-apiserver's static pod manifest, parsed.
type apiserverPod struct {
	doc       *yamlDoc
	container *yaml.Node // the kube-apiserver container (a mapping)
	spec      *yaml.Node
}

// parseAPIServer parses a static pod manifest and finds its kube-apiserver
// container.
func parseAPIServer(data []byte) (*apiserverPod, error) {
	doc, err := parseYAML(data)
	if err != nil {
		return nil, err
	}
	top := doc.top()
	if !isKind(top, yaml.MappingNode) || mapString(top, "apiVersion") != "v1" || mapString(top, "kind") != "Pod" {
		return nil, errors.New("not a v1 Pod manifest")
	}
	spec := mapGet(top, "spec")
	containers := mapGet(spec, "containers")
	if !isKind(containers, yaml.SequenceNode) {
		return nil, errors.New("spec.containers is missing")
	}
	for _, c := range containers.Content {
		if mapString(c, "name") == "kube-apiserver" {
			return &apiserverPod{doc: doc, container: c, spec: spec}, nil
		}
	}
	return nil, errors.New("no container named kube-apiserver")
}

// flagRef locates a flag in the container's command or args.
type flagRef struct {
	list  *yaml.Node // the sequence holding it
	index int        // index of "--name=value" or of "--name"
	split bool       // "--name" "value" as two items
	value string
}

// lists returns the container's command and args sequences (either may be
// nil).
func (p *apiserverPod) lists() []*yaml.Node {
	var out []*yaml.Node
	for _, key := range []string{"command", "args"} {
		if l := mapGet(p.container, key); isKind(l, yaml.SequenceNode) {
			out = append(out, l)
		}
	}
	return out
}

// flag finds --name in command or args; the last occurrence wins, as for
// kube-apiserver's own flag parsing.
func (p *apiserverPod) flag(name string) (flagRef, bool) {
	var ref flagRef
	found := false
	for _, l := range p.lists() {
		for i, it := range l.Content {
			if v, ok := strings.CutPrefix(it.Value, "--"+name+"="); ok {
				ref, found = flagRef{list: l, index: i, value: v}, true
			} else if it.Value == "--"+name {
				v := ""
				if i+1 < len(l.Content) {
					v = l.Content[i+1].Value
				}
				ref, found = flagRef{list: l, index: i, split: true, value: v}, true
			}
		}
	}
	return ref, found
}

// flagValue returns the value of --name, or "".
func (p *apiserverPod) flagValue(name string) string {
	ref, _ := p.flag(name)
	return ref.value
}

// setFlag sets --name=value: in place when present, else appended to the
// command (or args) list, where kubeadm puts a ClusterConfiguration's
// extraArgs.
func (p *apiserverPod) setFlag(name, value string) error {
	if ref, ok := p.flag(name); ok {
		if ref.value == value {
			return nil
		}
		if ref.split {
			removeAt(ref.list, ref.index+1)
		}
		ref.list.Content[ref.index] = strNode("--" + name + "=" + value)
		return nil
	}
	list := mapGet(p.container, "command")
	if !isKind(list, yaml.SequenceNode) {
		list = mapGet(p.container, "args")
	}
	if !isKind(list, yaml.SequenceNode) {
		return errors.New("the kube-apiserver container has neither command nor args")
	}
	list.Content = append(list.Content, strNode("--"+name+"="+value))
	return nil
}

// removeFlag removes every occurrence of --name.
func (p *apiserverPod) removeFlag(name string) {
	for {
		ref, ok := p.flag(name)
		if !ok {
			return
		}
		if ref.split && ref.index+1 < len(ref.list.Content) {
			removeAt(ref.list, ref.index+1)
		}
		removeAt(ref.list, ref.index)
	}
}

// hostMount is a host directory kube-apiserver must see at the same path.
type hostMount struct {
	name     string
	path     string
	readOnly bool
}

// mounted reports whether host path path is visible at the same path in
// the container, through a hostPath volume of the same or a parent
// directory mounted at its own path.
func (p *apiserverPod) mounted(path string) bool {
	vols := p.hostPathVolumes()
	mounts := mapGet(p.container, "volumeMounts")
	if !isKind(mounts, yaml.SequenceNode) {
		return false
	}
	for _, m := range mounts.Content {
		host, ok := vols[mapString(m, "name")]
		if !ok || mapString(m, "subPath") != "" || mapString(m, "subPathExpr") != "" {
			continue
		}
		rel, err := filepath.Rel(host, path)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			continue
		}
		if filepath.Join(mapString(m, "mountPath"), rel) == path {
			return true
		}
	}
	return false
}

// hostPathVolumes maps volume names to their hostPath paths.
func (p *apiserverPod) hostPathVolumes() map[string]string {
	out := map[string]string{}
	vols := mapGet(p.spec, "volumes")
	if !isKind(vols, yaml.SequenceNode) {
		return out
	}
	for _, v := range vols.Content {
		if hp := mapGet(v, "hostPath"); hp != nil {
			out[mapString(v, "name")] = filepath.Clean(mapString(hp, "path"))
		}
	}
	return out
}

// ensureMount makes host directory hm.path visible to kube-apiserver at the
// same path, adding a hostPath volume and a mount named hm.name unless an
// existing one already does.
func (p *apiserverPod) ensureMount(hm hostMount) error {
	if p.mounted(hm.path) {
		return nil
	}
	vols := mapGet(p.spec, "volumes")
	if vols == nil {
		vols = seqNode()
		p.spec.Content = append(p.spec.Content, strNode("volumes"), vols)
	}
	mounts := mapGet(p.container, "volumeMounts")
	if mounts == nil {
		mounts = seqNode()
		p.container.Content = append(p.container.Content, strNode("volumeMounts"), mounts)
	}
	if !isKind(vols, yaml.SequenceNode) || !isKind(mounts, yaml.SequenceNode) {
		return errors.New("spec.volumes or the container's volumeMounts is not a list")
	}
	for _, v := range vols.Content {
		if mapString(v, "name") == hm.name {
			return fmt.Errorf("a volume named %s already exists%s but does not mount %s at %s", hm.name, nodeLine(v), hm.path, hm.path)
		}
	}
	for _, m := range mounts.Content {
		if filepath.Clean(mapString(m, "mountPath")) == hm.path {
			return fmt.Errorf("%s is already a mount point of kube-apiserver (volume %s)%s, not of host directory %s", hm.path, mapString(m, "name"), nodeLine(m), hm.path)
		}
	}
	// Key order as kubeadm writes them (sorted).
	vol := mapNode("hostPath", mapNode("path", hm.path, "type", "DirectoryOrCreate"), "name", hm.name)
	mount := mapNode("mountPath", hm.path, "name", hm.name)
	if hm.readOnly {
		mount.Content = append(mount.Content, strNode("readOnly"), boolNode(true))
	}
	// Sorted by name, as kubeadm writes volumes and mounts (extraVolumes
	// included), when the lists are sorted; else at the end.
	byName := func(n *yaml.Node) string { return mapString(n, "name") }
	insertAt(vols, sortedInsertIndex(vols, byName, hm.name), vol)
	insertAt(mounts, sortedInsertIndex(mounts, byName, hm.name), mount)
	return nil
}

// removeVolume removes the volume and mounts named name.
func (p *apiserverPod) removeVolume(name string) {
	for _, parent := range []struct {
		node *yaml.Node
		key  string
	}{{p.spec, "volumes"}, {p.container, "volumeMounts"}} {
		l := mapGet(parent.node, parent.key)
		if !isKind(l, yaml.SequenceNode) {
			continue
		}
		for i := len(l.Content) - 1; i >= 0; i-- {
			if mapString(l.Content[i], "name") == name {
				removeAt(l, i)
			}
		}
		if len(l.Content) == 0 {
			mapDelete(parent.node, parent.key)
		}
	}
}
