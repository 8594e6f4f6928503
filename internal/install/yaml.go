package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	yaml "go.yaml.in/yaml/v3"
)

// The installer edits YAML as a yaml.Node tree, not as typed structs: a
// node tree keeps every field (including ones newer than this binary's
// k8s.io/api), their order, quoting and comments, so that "everything else
// in the manifest is preserved". kubeadm writes its manifests with
// sigs.k8s.io/yaml, whose layout the encoder below reproduces byte for
// byte; hand-written files in the other common layout (indented sequences)
// are reproduced too.

// yamlDoc is one parsed YAML document and the layout to write it back in.
type yamlDoc struct {
	root *yaml.Node // the document's top-level node
	// compact: sequences start at their key's indentation ("- a" under
	// "key:"), as kubeadm writes them.
	compact bool
	// restyled: neither layout reproduces the input byte for byte.
	restyled bool
	// data and parsed are the input and its encoding before any edit.
	data, parsed []byte
}

// parseYAML parses a single-document YAML file.
func parseYAML(data []byte) (*yamlDoc, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty YAML document")
		}
		return nil, fmt.Errorf("parse YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("parse YAML: %w", err)
		}
		return nil, errors.New("more than one YAML document")
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, errors.New("not a YAML document")
	}
	d := &yamlDoc{root: &doc, data: data}
	for _, compact := range []bool{true, false} {
		out, err := encodeYAML(&doc, compact)
		if err == nil && bytes.Equal(out, data) {
			d.compact, d.parsed = compact, out
			return d, nil
		}
	}
	d.compact, d.restyled = true, true
	out, err := encodeYAML(&doc, true)
	if err != nil {
		return nil, err
	}
	d.parsed = out
	return d, nil
}

// top returns the document's top-level node.
func (d *yamlDoc) top() *yaml.Node { return d.root.Content[0] }

// encode writes the document back in its layout; a document that was not
// edited comes back as the input, byte for byte, whatever its layout.
func (d *yamlDoc) encode() ([]byte, error) {
	out, err := encodeYAML(d.root, d.compact)
	if err != nil {
		return nil, err
	}
	if d.data != nil && bytes.Equal(out, d.parsed) {
		return d.data, nil
	}
	return out, nil
}

func encodeYAML(n *yaml.Node, compact bool) ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if compact {
		enc.CompactSeqIndent()
	}
	if err := enc.Encode(n); err != nil {
		return nil, fmt.Errorf("encode YAML: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode YAML: %w", err)
	}
	return buf.Bytes(), nil
}

// mapGet returns the value of key in mapping m, or nil.
func mapGet(m *yaml.Node, key string) *yaml.Node {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

// mapDelete removes key from mapping m.
func mapDelete(m *yaml.Node, key string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content = append(m.Content[:i], m.Content[i+2:]...)
			return
		}
	}
}

// mapString returns the string value of key in m ("" if absent or not a
// scalar).
func mapString(m *yaml.Node, key string) string {
	if v := mapGet(m, key); v != nil && v.Kind == yaml.ScalarNode {
		return v.Value
	}
	return ""
}

// strNode returns a string scalar.
func strNode(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

// boolNode returns a boolean scalar.
func boolNode(b bool) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!bool", Value: fmt.Sprint(b)}
}

// mapNode returns a mapping of alternating keys and values.
func mapNode(kv ...any) *yaml.Node {
	m := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
	for i := 0; i+1 < len(kv); i += 2 {
		var v *yaml.Node
		switch x := kv[i+1].(type) {
		case *yaml.Node:
			v = x
		case string:
			v = strNode(x)
		case bool:
			v = boolNode(x)
		default:
			panic(fmt.Sprintf("mapNode: unsupported value %T", x))
		}
		m.Content = append(m.Content, strNode(kv[i].(string)), v)
	}
	return m
}

// seqNode returns a block sequence.
func seqNode(items ...*yaml.Node) *yaml.Node {
	return &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Content: items}
}

// insertAt inserts n into sequence s at index i.
func insertAt(s *yaml.Node, i int, n *yaml.Node) {
	s.Content = append(s.Content, nil)
	copy(s.Content[i+1:], s.Content[i:])
	s.Content[i] = n
}

// removeAt removes index i from sequence s.
func removeAt(s *yaml.Node, i int) {
	s.Content = append(s.Content[:i], s.Content[i+1:]...)
}

// sortedInsertIndex returns where to insert an item with key k into
// sequence s, keeping it sorted by key when it already is; otherwise the
// end.
func sortedInsertIndex(s *yaml.Node, key func(*yaml.Node) string, k string) int {
	for i := 1; i < len(s.Content); i++ {
		if key(s.Content[i-1]) > key(s.Content[i]) {
			return len(s.Content)
		}
	}
	for i, it := range s.Content {
		if key(it) > k {
			return i
		}
	}
	return len(s.Content)
}

// cloneNode deep-copies a node tree.
func cloneNode(n *yaml.Node) *yaml.Node {
	if n == nil {
		return nil
	}
	c := *n
	c.Content = make([]*yaml.Node, len(n.Content))
	for i, ch := range n.Content {
		c.Content[i] = cloneNode(ch)
	}
	return &c
}

// nodeLine says where a node is, for error messages.
func nodeLine(n *yaml.Node) string {
	if n == nil || n.Line == 0 {
		return ""
	}
	return fmt.Sprintf(" (line %d)", n.Line)
}

// isKind reports whether n is non-nil and of kind k.
func isKind(n *yaml.Node, k yaml.Kind) bool { return n != nil && n.Kind == k }
