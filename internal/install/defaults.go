package install

// defaultPluginConfig is manifests/config.yaml (a test keeps them equal): the
// plugin config install writes when given none and none is installed.
const defaultPluginConfig = "" +
	"# /etc/kubernetes/kms-plugin/config.yaml: configuration of `kms-plugin serve`\n" +
	"# on a control-plane node. Every field can also be set by a flag of the same\n" +
	"# meaning (flags win).\n" +
	"endpoint: unix:///var/run/kmsplugin/socket.sock\n" +
	"provider: local\n" +
	"local:\n" +
	"  # Root-only Tink keyset, created on first start. Back it up: it is the key.\n" +
	"  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\n" +
	"# /livez, /readyz, /metrics, /status. Loopback only: the pod uses hostNetwork.\n" +
	"httpAddr: 127.0.0.1:8787\n" +
	"providerPollInterval: 60s\n" +
	"kek:\n" +
	"  maxAge: 168h\n" +
	"  maxUses: 1048576\n" +
	"  cacheSize: 10000\n" +
	"log:\n" +
	"  format: json\n" +
	"  level: info\n" +
	"shutdownTimeout: 10s\n"

// DefaultPluginConfig returns the plugin config install writes when given
// none: manifests/config.yaml, with the production paths.
func DefaultPluginConfig() []byte { return []byte(defaultPluginConfig) }
