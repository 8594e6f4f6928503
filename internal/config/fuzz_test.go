package config

import (
	"strings"
	"testing"
)

// FuzzParse checks that no config file makes the parser or Validate panic,
// and that a file Parse accepts produces a config Validate can judge.
func FuzzParse(f *testing.F) {
	f.Add([]byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nprovider: local\n"))
	f.Add([]byte("providerPollInterval: 5s\nkek:\n  maxUses: 10\n"))
	f.Add([]byte("log: {format: console}\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("kek: null\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := Default()
		if err := Parse(data, &cfg); err != nil {
			return
		}
		_ = cfg.Validate()
	})
}

// FuzzSocketPath checks that accepted endpoints are absolute unix:// paths
// that fit in a Unix socket address.
func FuzzSocketPath(f *testing.F) {
	for _, s := range []string{"unix:///a.sock", "unix://a", "tcp://x", "", "unix:///" + strings.Repeat("x", 200), "unix:///a/../b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, endpoint string) {
		p, err := SocketPath(endpoint)
		if err != nil {
			return
		}
		if !strings.HasPrefix(endpoint, "unix://") || !strings.HasPrefix(p, "/") || len(p) > 107 {
			t.Fatalf("SocketPath(%q) = %q accepted", endpoint, p)
		}
	})
}
