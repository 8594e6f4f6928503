package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	kmsapi "k8s.io/kms/apis/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// The files the image tests read, relative to e2e/.
const (
	imgStaticPod     = "../manifests/kms-plugin.static-pod.yaml"
	imgConfig        = "../manifests/config.yaml"
	imgContainerfile = "../hack/image/Containerfile"
)

// imageUnderTest returns podman and the image to test ($KMS_PLUGIN_IMAGE,
// else kms-plugin:dev). Without a working podman or the image, the test
// fails when CI=true (make test installs podman and builds the image) and
// is skipped otherwise, with the reason.
func imageUnderTest(t *testing.T) (*cluster.Podman, string) {
	t.Helper()
	return namedImage(t, cluster.EnvImage, cluster.DefaultImage, "make image")
}

// namedImage is imageUnderTest for the image $env names (default def),
// which make builds.
func namedImage(t *testing.T, env, def, make string) (*cluster.Podman, string) {
	t.Helper()
	ctx := context.Background()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf(format, args...)
		}
		t.Skipf(format, args...)
	}
	pm, err := cluster.NewPodman(ctx)
	if err != nil {
		missing("image tests need podman: %v", err)
	}
	image := os.Getenv(env)
	if image == "" {
		image = def
	}
	ok, err := pm.ImageExists(ctx, image)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		missing("image %s is not built (%s; %s names another)", image, make, env)
	}
	return pm, image
}

// imageInspect is the part of `podman image inspect` the tests check.
type imageInspect struct {
	Config struct {
		User       string
		Entrypoint []string
		Cmd        []string
		Labels     map[string]string
		Env        []string
	}
}

func inspectImage(t *testing.T, pm *cluster.Podman, image string) imageInspect {
	t.Helper()
	out, err := pm.Output(context.Background(), "image", "inspect", image)
	if err != nil {
		t.Fatal(err)
	}
	var imgs []imageInspect
	if err := json.Unmarshal([]byte(out), &imgs); err != nil || len(imgs) != 1 {
		t.Fatalf("podman image inspect %s: %d images, %v", image, len(imgs), err)
	}
	return imgs[0]
}

// containerfileFiles is the set of files hack/image/Containerfile copies
// into the image (destinations of its COPY lines).
func containerfileFiles(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(imgContainerfile)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "COPY" || strings.HasPrefix(f[1], "--") {
			continue
		}
		dest := f[len(f)-1]
		for _, src := range f[1 : len(f)-1] {
			if strings.HasSuffix(dest, "/") {
				files = append(files, dest+path.Base(src))
			} else {
				files = append(files, dest)
			}
		}
	}
	if len(files) == 0 {
		t.Fatalf("%s: no COPY lines", imgContainerfile)
	}
	slices.Sort(files)
	return files
}

// TestImageLayout checks the built image against hack/image/Containerfile:
// exactly its files (root-owned, binaries 0755, data 0644), no shell and no
// other executable, a numeric non-root USER, the serve-only entrypoint and
// the OCI labels.
func TestImageLayout(t *testing.T) {
	pm, image := imageUnderTest(t)
	ctx := context.Background()

	files, err := pm.ImageFiles(ctx, image)
	if err != nil {
		t.Fatal(err)
	}
	var regular []string
	for name, f := range files {
		switch f.Type {
		case tar.TypeReg:
			regular = append(regular, name)
			if f.UID != 0 || f.GID != 0 {
				t.Errorf("%s: owned by %d:%d, want 0:0", name, f.UID, f.GID)
			}
			want := os.FileMode(0o644)
			if strings.HasPrefix(name, "/usr/local/bin/") {
				want = 0o755
			} else if f.Mode.Perm()&0o111 != 0 {
				t.Errorf("%s: executable (%v), but only the two binaries may be", name, f.Mode)
			}
			if f.Mode.Perm() != want {
				t.Errorf("%s: mode %v, want %v", name, f.Mode.Perm(), want)
			}
		case tar.TypeDir:
			if f.Mode.Perm()&0o022 != 0 {
				t.Errorf("%s/: writable by group or others (%v)", name, f.Mode.Perm())
			}
		case tar.TypeSymlink, tar.TypeLink:
			t.Errorf("%s: a link (to %q); the layout has none", name, f.Link)
		}
		// podman export lists the mount points it makes for any container
		// (/etc/hosts, /etc/resolv.conf, /dev, /proc, /sys, /run): empty.
		if base := path.Base(name); base == "sh" || base == "bash" || base == "busybox" {
			t.Errorf("%s: the image must have no shell", name)
		}
	}
	slices.Sort(regular)
	// podman create adds empty /etc/hosts and /etc/resolv.conf files, as it
	// does to every container; they are not the image's.
	regular = slices.DeleteFunc(regular, func(n string) bool {
		return (n == "/etc/hosts" || n == "/etc/resolv.conf" || n == "/etc/hostname") && files[n].Size == 0
	})
	t.Logf("image %s: %d entries, files %q", image, len(files), regular)
	if want := containerfileFiles(t); !slices.Equal(regular, want) {
		t.Errorf("image files %q, want the Containerfile's %q", regular, want)
	}
	if ca := files["/etc/ssl/certs/ca-certificates.crt"]; ca.Size < 100_000 {
		t.Errorf("CA bundle is %d bytes; Debian's ca-certificates bundle is over 200 kB", ca.Size)
	}

	// What the image says about itself.
	cfg := inspectImage(t, pm, image).Config
	uid, gid, ok := strings.Cut(cfg.User, ":")
	if n, err := strconv.Atoi(uid); !ok || err != nil || n == 0 {
		t.Errorf("USER %q: want a numeric non-root UID:GID", cfg.User)
	} else if _, err := strconv.Atoi(gid); err != nil {
		t.Errorf("USER %q: group is not numeric", cfg.User)
	}
	if !slices.Equal(cfg.Entrypoint, []string{"/usr/local/bin/kms-plugin-serve"}) {
		t.Errorf("entrypoint %q, want [/usr/local/bin/kms-plugin-serve]", cfg.Entrypoint)
	}
	for _, l := range []string{"org.opencontainers.image.version", "org.opencontainers.image.revision", "org.opencontainers.image.source"} {
		if cfg.Labels[l] == "" {
			t.Errorf("label %s is missing", l)
		}
	}
	if _, tag, _ := strings.Cut(image, ":"); tag != "" && tag != "dev" && cfg.Labels["org.opencontainers.image.version"] != tag {
		t.Errorf("label version %q, tag %q", cfg.Labels["org.opencontainers.image.version"], tag)
	}

	// The binaries are the ones this run tests as host processes.
	for env, name := range map[string]string{cluster.EnvServePluginBin: "/usr/local/bin/kms-plugin-serve", cluster.EnvPluginBin: "/usr/local/bin/kms-plugin"} {
		if host := os.Getenv(env); host != "" {
			fi, err := os.Stat(host)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != files[name].Size {
				t.Errorf("%s in the image is %d bytes, %s=%s is %d: the image is stale (make image)", name, files[name].Size, env, host, fi.Size())
			}
		}
	}

	// No shell to exec: a container's sh fails to start.
	out, err := pm.Output(ctx, "run", "--rm", "--pull", "never", "--network", "none", "--entrypoint", "/bin/sh", image, "-c", "true")
	if err == nil || !strings.Contains(err.Error(), "no such file or directory") {
		t.Errorf("podman run --entrypoint /bin/sh: %v (%q); want it to fail: no shell in the image", err, out)
	}
	// Both binaries run in it (static: there is no libc).
	for _, bin := range []string{"/usr/local/bin/kms-plugin-serve", "/usr/local/bin/kms-plugin"} {
		out, err := pm.Output(ctx, "run", "--rm", "--pull", "never", "--network", "none", "--entrypoint", bin, image, "version")
		if err != nil || !strings.HasPrefix(out, "kms-plugin ") {
			t.Errorf("%s version: %q, %v", bin, out, err)
		}
	}
}

// podRun is a podman run of the image made from the shipped static pod
// manifest, and the host directories behind its mounts.
type podRun struct {
	cfg    cluster.ContainerConfig
	pod    *corev1.Pod
	mounts map[string]string // container path -> host path
}

// staticPodRun turns the shipped static pod manifest into a podman run of
// image: the container's args (its command is the image's entrypoint), its
// user, capabilities, read-only root, no privilege escalation, memory
// limit, host network, and its hostPath volumes, each made under root (a
// host path P is root+P).
func staticPodRun(t *testing.T, image, root, logPath string) *podRun {
	t.Helper()
	data, err := os.ReadFile(imgStaticPod)
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(data, &pod); err != nil {
		t.Fatalf("%s: %v", imgStaticPod, err)
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", imgStaticPod, len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.RunAsUser == nil || sc.Capabilities == nil {
		t.Fatalf("%s: container has no securityContext with runAsUser and capabilities", imgStaticPod)
	}
	r := &podRun{pod: &pod, mounts: map[string]string{}}
	r.cfg = cluster.ContainerConfig{
		Name:            "kms-plugin-e2e-" + cluster.RandomHex(4),
		Image:           image,
		Command:         c.Command,
		Args:            c.Args,
		User:            strconv.FormatInt(*sc.RunAsUser, 10),
		ReadOnlyRoot:    sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem,
		NoNewPrivileges: sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation,
		HostNetwork:     pod.Spec.HostNetwork,
		LogPath:         logPath,
	}
	if sc.RunAsGroup != nil {
		r.cfg.User += ":" + strconv.FormatInt(*sc.RunAsGroup, 10)
	}
	for _, cp := range sc.Capabilities.Drop {
		r.cfg.CapDrop = append(r.cfg.CapDrop, string(cp))
	}
	for _, cp := range sc.Capabilities.Add {
		r.cfg.CapAdd = append(r.cfg.CapAdd, string(cp))
	}
	if mem, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		r.cfg.Memory = strconv.FormatInt(mem.Value(), 10)
	}
	for _, m := range c.VolumeMounts {
		var vol *corev1.Volume
		for i := range pod.Spec.Volumes {
			if pod.Spec.Volumes[i].Name == m.Name {
				vol = &pod.Spec.Volumes[i]
			}
		}
		if vol == nil || vol.HostPath == nil {
			t.Fatalf("%s: mount %s is not a hostPath volume", imgStaticPod, m.Name)
		}
		host := filepath.Join(root, vol.HostPath.Path)
		// DirectoryOrCreate makes the directory as kubelet does: 0755, root.
		if err := os.MkdirAll(host, 0o755); err != nil {
			t.Fatal(err)
		}
		r.cfg.Mounts = append(r.cfg.Mounts, cluster.Mount{Host: host, Container: m.MountPath, ReadOnly: m.ReadOnly})
		r.mounts[m.MountPath] = host
	}
	return r
}

// hostPath maps a path the container sees to the host file behind it; a
// path no mount covers fails the test, since the host could not reach it.
func (r *podRun) hostPath(t *testing.T, p string) string {
	t.Helper()
	best := ""
	for mp := range r.mounts {
		if (p == mp || strings.HasPrefix(p, mp+"/")) && len(mp) > len(best) {
			best = mp
		}
	}
	if best == "" {
		t.Fatalf("%s is not on a volume the static pod mounts (%v)", p, r.mounts)
	}
	return r.mounts[best] + strings.TrimPrefix(p, best)
}

// argValue is the value of --name=V or --name V in args.
func argValue(args []string, name string) string {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// imgGet does GET url and returns status and body.
func imgGet(ctx context.Context, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, body, err
}

// waitServing waits until the plugin in the container has made its socket
// and its probes (liveness, readiness) answer 200, and returns /status.
func waitServing(ctx context.Context, t *testing.T, ctr *cluster.Container, socket, base string, probes []string) cluster.PluginStatus {
	t.Helper()
	var st cluster.PluginStatus
	cluster.WaitFor(ctx, t, time.Minute, 200*time.Millisecond, "the containerized plugin serving", func() error {
		if !ctr.Process().Running() {
			return fmt.Errorf("podman exited (%v); log:\n%s", ctr.Process().ExitError(), ctr.Process().LogTail(20))
		}
		if _, err := os.Stat(socket); err != nil {
			return err
		}
		for _, p := range probes {
			code, body, err := imgGet(ctx, base+p)
			if err != nil {
				return err
			}
			if code != http.StatusOK {
				return fmt.Errorf("%s: %d %q", p, code, body)
			}
		}
		code, body, err := imgGet(ctx, base+"/status")
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("/status: %d %q %v", code, body, err)
		}
		st = cluster.PluginStatus{}
		if err := json.Unmarshal(body, &st); err != nil {
			return err
		}
		if !st.Ready || st.KeyID == "" {
			return fmt.Errorf("/status: %s", body)
		}
		return nil
	})
	return st
}

// TestImageAsStaticPod runs the plugin from the image exactly as the
// shipped static pod does (its args, user, capabilities, read-only root,
// no privilege escalation, memory limit, host network and hostPath
// mounts, with the shipped config.yaml in the config directory, only its
// admin port moved to a free one) and points a real kube-apiserver at the
// socket the container makes in the host directory: Secrets are stored as
// KMS v2 objects of the container's key, survive kube-apiserver restarts
// and a restart of the container (the keyset lives on the host mount),
// and the process, socket and keyset are what the manifest and
// SECURITY.md say: the pod's user with only its two capabilities, socket
// 0600.
func TestImageAsStaticPod(t *testing.T) {
	pm, image := imageUnderTest(t)
	ctx := context.Background()
	apiBin, etcdBin := controlPlaneBinaries(t)
	dir := cluster.TempDir(t, "kms-img-")
	root := filepath.Join(dir, "host")
	run := staticPodRun(t, image, root, filepath.Join(dir, "kms-plugin-container.log"))
	if len(run.cfg.Command) != 0 {
		t.Fatalf("static pod sets command %q; it must run the image's entrypoint", run.cfg.Command)
	}

	// The shipped config, in the config directory the pod mounts, where
	// the pod's --config names it; only the admin port is moved.
	configPath := argValue(run.cfg.Args, "config")
	if configPath == "" {
		t.Fatalf("static pod args %q have no --config", run.cfg.Args)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := os.ReadFile(imgConfig)
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := regexp.MustCompile(`(?m)^httpAddr: 127\.0\.0\.1:\d+$`)
	if !httpAddr.Match(shipped) {
		t.Fatalf("%s: no `httpAddr: 127.0.0.1:PORT` line", imgConfig)
	}
	config := httpAddr.ReplaceAll(shipped, []byte(fmt.Sprintf("httpAddr: 127.0.0.1:%d", port)))
	if err := os.WriteFile(run.hostPath(t, configPath), config, 0o600); err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Endpoint string `json:"endpoint"`
		Local    struct {
			KeysetPath string `json:"keysetPath"`
		} `json:"local"`
	}
	if err := yaml.Unmarshal(config, &cfg); err != nil {
		t.Fatal(err)
	}
	socket := run.hostPath(t, strings.TrimPrefix(cfg.Endpoint, "unix://"))
	keyset := run.hostPath(t, cfg.Local.KeysetPath)
	if len(socket) > 107 {
		t.Fatalf("socket path %s is too long for a Unix socket", socket)
	}
	c := run.pod.Spec.Containers[0]
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	probes := []string{c.LivenessProbe.HTTPGet.Path, c.ReadinessProbe.HTTPGet.Path}

	ctr, err := pm.NewContainer(run.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ctr.Remove(context.Background()); err != nil {
			t.Logf("remove container: %v", err)
		}
	})
	pid, err := ctr.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st := waitServing(ctx, t, ctr, socket, base, probes)

	// The process, as the host sees it: the pod's command line, user and
	// capabilities, and no way to gain privileges.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	wantCmd := append([]string{"/usr/local/bin/kms-plugin-serve"}, run.cfg.Args...)
	if got := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"); !slices.Equal(got, wantCmd) {
		t.Errorf("container process runs %q, want the image's entrypoint with the pod's args %q", got, wantCmd)
	}
	hp, err := cluster.ReadHostProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	wantCaps, err := cluster.CapabilityMask(run.cfg.CapAdd)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("container pid %d: %q, %+v", pid, cmdline, hp)
	if strconv.Itoa(hp.UID) != run.cfg.User || hp.CapEff != wantCaps || !hp.NoNewPrivs {
		t.Errorf("container process: uid %d, CapEff %#x, NoNewPrivs %v; want uid %s (runAsUser), CapEff %#x (only %v), NoNewPrivs true",
			hp.UID, hp.CapEff, hp.NoNewPrivs, run.cfg.User, wantCaps, run.cfg.CapAdd)
	}

	// Socket and keyset on the host, as SECURITY.md documents them: the
	// socket mode 0600 (no socketGroup in the config) and the keyset
	// root-only, both owned by the pod's user.
	for _, f := range []struct {
		path string
		mode os.FileMode
		typ  os.FileMode
	}{{socket, 0o600, os.ModeSocket}, {keyset, 0o600, 0}} {
		fi, err := os.Lstat(f.path)
		if err != nil {
			t.Fatal(err)
		}
		owner := fi.Sys().(*syscall.Stat_t).Uid
		if fi.Mode().Type() != f.typ || fi.Mode().Perm() != f.mode || strconv.Itoa(int(owner)) != run.cfg.User {
			t.Errorf("%s: %v owned by %d, want type %v mode %v owned by %s", f.path, fi.Mode(), owner, f.typ, f.mode, run.cfg.User)
		}
	}

	// kube-apiserver and etcd on the host, on the container's socket.
	etcd, err := cluster.NewEtcd(etcdBin, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := etcd.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = etcd.Stop() })
	etcdClient, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.ClientURL}, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { etcdClient.Close() })
	const providerName = "kms-plugin-image"
	encConfig := filepath.Join(dir, "encryption-config.yaml")
	if err := cluster.WriteEncryptionConfig(encConfig, providerName, "unix://"+socket, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServer(cluster.APIServerConfig{Binary: apiBin, Dir: dir, EtcdURL: etcd.ClientURL, EncryptionProviderFile: encConfig})
	if err != nil {
		t.Fatal(err)
	}
	if err := api.Start(ctx); err != nil {
		t.Fatalf("%v\n%s", err, api.Process().LogTail(30))
	}
	t.Cleanup(func() { _ = api.Stop() })
	client, err := kubernetes.NewForConfig(api.RestConfig())
	if err != nil {
		t.Fatal(err)
	}

	const ns = "image"
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	for i := range 5 {
		name := fmt.Sprintf("s%d", i)
		want[name] = []byte("image-secret-" + cluster.RandomHex(16))
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string][]byte{"v": want[name]}}
		if _, err := client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	checkStoredImageSecrets(ctx, t, etcdClient, ns, providerName, st.KeyID, want)
	readImageSecrets(ctx, t, client, ns, want)

	// kube-apiserver restart: its DEK cache is gone, so every read asks
	// the container to decrypt.
	if err := api.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	readImageSecrets(ctx, t, client, ns, want)

	// The container stops gracefully on SIGTERM (exit 0) and a new one
	// with the same mounts serves the same key from the host's keyset.
	if err := ctr.Stop(); err != nil {
		t.Fatalf("stop container: %v\n%s", err, ctr.Process().LogTail(20))
	}
	if _, err := os.Stat(keyset); err != nil {
		t.Fatalf("keyset gone after the container stopped: %v", err)
	}
	if _, err := ctr.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if st2 := waitServing(ctx, t, ctr, socket, base, probes); st2.KeyID != st.KeyID {
		t.Errorf("restarted container serves key_id %s, want %s (the keyset on the host mount)", st2.KeyID, st.KeyID)
	}
	if err := api.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	readImageSecrets(ctx, t, client, ns, want)
	checkStoredImageSecrets(ctx, t, etcdClient, ns, providerName, st.KeyID, want)
}

// checkStoredImageSecrets checks that etcd holds each Secret as a KMS v2
// EncryptedObject of providerName under keyID, with no plaintext in it.
func checkStoredImageSecrets(ctx context.Context, t *testing.T, etcdClient *clientv3.Client, ns, providerName, keyID string, want map[string][]byte) {
	t.Helper()
	for name, value := range want {
		resp, err := etcdClient.Get(ctx, cluster.SecretKey(ns, name))
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("etcd get %s: %v (%d values)", name, err, len(resp.Kvs))
		}
		raw := resp.Kvs[0].Value
		obj, err := cluster.DecodeStored(raw, providerName)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if obj.KeyID != keyID {
			t.Errorf("%s: stored under key_id %s, the container's is %s", name, obj.KeyID, keyID)
		}
		if bytes.Contains(raw, value) {
			t.Errorf("%s: etcd holds the plaintext", name)
		}
	}
}

func readImageSecrets(ctx context.Context, t *testing.T, client kubernetes.Interface, ns string, want map[string][]byte) {
	t.Helper()
	for name, value := range want {
		s, err := client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if !bytes.Equal(s.Data["v"], value) {
			t.Errorf("%s: read %q, want %q", name, s.Data["v"], value)
		}
	}
}

// TestImageDefaultUser runs the image without the pod's runAsUser: the
// plugin runs as the image's non-root user (checked from the host), with
// no capabilities, and serves from a directory that user owns; on the
// root-only directories the static pod mounts, it fails with a clear
// permission error instead of running.
func TestImageDefaultUser(t *testing.T) {
	pm, image := imageUnderTest(t)
	ctx := context.Background()
	user := inspectImage(t, pm, image).Config.User
	uidStr, gidStr, _ := strings.Cut(user, ":")
	uid, errU := strconv.Atoi(uidStr)
	gid, errG := strconv.Atoi(gidStr)
	if errU != nil || errG != nil || uid == 0 {
		t.Fatalf("image USER %q: want numeric non-root UID:GID", user)
	}
	dir := cluster.TempDir(t, "kms-img-user-")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, uid, gid); err != nil {
		t.Fatal(err)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	serve := func(name, hostDir, log string) (*cluster.Container, error) {
		ctr, err := pm.NewContainer(cluster.ContainerConfig{
			Name:  name,
			Image: image,
			Args: []string{"serve", "--endpoint", "unix:///state/kms.sock", "--local-keyset", "/state/keyset.json",
				"--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--log-format", "console"},
			Mounts:          []cluster.Mount{{Host: hostDir, Container: "/state"}},
			CapDrop:         []string{"ALL"},
			ReadOnlyRoot:    true,
			NoNewPrivileges: true,
			HostNetwork:     true,
			LogPath:         log,
		})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = ctr.Remove(context.Background()) })
		return ctr, nil
	}

	ctr, err := serve("kms-plugin-e2e-user-"+cluster.RandomHex(4), state, filepath.Join(dir, "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := ctr.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(state, "kms.sock")
	waitServing(ctx, t, ctr, socket, fmt.Sprintf("http://127.0.0.1:%d", port), []string{"/livez", "/readyz"})
	hp, err := cluster.ReadHostProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	if hp.UID != uid || hp.GID != gid || hp.CapEff != 0 {
		t.Errorf("container process: uid %d gid %d CapEff %#x; want the image's %d:%d and no capabilities", hp.UID, hp.GID, hp.CapEff, uid, gid)
	}
	fi, err := os.Lstat(socket)
	if err != nil {
		t.Fatal(err)
	}
	if owner := fi.Sys().(*syscall.Stat_t).Uid; int(owner) != uid || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket %v owned by %d, want 0600 owned by %d", fi.Mode(), owner, uid)
	}
	if err := ctr.Stop(); err != nil {
		t.Fatalf("stop: %v\n%s", err, ctr.Process().LogTail(20))
	}

	// A root-owned 0700 directory, like the host's socket and keyset
	// directories: the non-root user can neither make its socket nor read
	// or create a keyset there, and says so.
	rootOnly := filepath.Join(dir, "root-only")
	if err := os.Mkdir(rootOnly, 0o700); err != nil {
		t.Fatal(err)
	}
	denied, err := serve("kms-plugin-e2e-denied-"+cluster.RandomHex(4), rootOnly, filepath.Join(dir, "denied.log"))
	if err != nil {
		t.Fatal(err)
	}
	if err := denied.Process().Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-denied.Process().Exited():
	case <-time.After(time.Minute):
		t.Fatal("the plugin kept running in a directory its user may not use")
	}
	log := denied.Process().LogTail(20)
	t.Logf("serving as %d:%d (%+v); in a root-only directory: %v, log:\n%s", uid, gid, hp, denied.Process().ExitError(), log)
	if denied.Process().ExitError() == nil || !strings.Contains(log, "permission denied") {
		t.Errorf("serve as the image's user in a root-only directory: exit %v; want a failure that says permission denied; log:\n%s", denied.Process().ExitError(), log)
	}
	if entries, _ := os.ReadDir(rootOnly); len(entries) != 0 {
		t.Errorf("the denied run left %d files in the root-only directory", len(entries))
	}
}

// TestImagePKCS11 runs the PKCS#11 image as the static pod runs the plugin
// (same args, user, capabilities, read-only root and mounts), with a
// SoftHSM2 token as the vendor module, mounted at run time at the paths
// the config names (as install mounts them: the module and its config
// read-only, the token directory read-write). The image has no shell and
// a non-root USER; in the container `keyset rotate` makes the key in the
// token, serve reports ready on it, and Encrypt and Decrypt round-trip
// over the socket the container made in the host directory.
func TestImagePKCS11(t *testing.T) {
	pm, image := namedImage(t, cluster.EnvPKCS11Image, cluster.DefaultPKCS11Image, "make image-pkcs11")
	ctx := context.Background()
	if err := cluster.SoftHSMTools(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skipf("the PKCS#11 image test needs SoftHSM2: %v", err)
	}

	// The image: glibc rootfs, no shell, non-root, every command.
	files, err := pm.ImageFiles(ctx, image)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/usr/local/bin/kms-plugin", "/etc/passwd", "/etc/group", "/etc/ssl/certs/ca-certificates.crt"} {
		if _, ok := files[want]; !ok {
			t.Errorf("%s: no %s", image, want)
		}
	}
	libc := 0
	for name, f := range files {
		if path.Base(name) == "libc.so.6" {
			libc++
		}
		if dir := path.Dir(name); f.Type != tar.TypeDir && (dir == "/bin" || dir == "/sbin" || dir == "/usr/bin" || dir == "/usr/sbin") {
			t.Errorf("%s: %s; the image has no programs but the plugin", image, name)
		}
	}
	if libc != 1 {
		t.Errorf("%s: %d libc.so.6 files, want glibc once", image, libc)
	}
	cfg := inspectImage(t, pm, image).Config
	if uid, _, _ := strings.Cut(cfg.User, ":"); uid == "" || uid == "0" {
		t.Errorf("%s: USER %q, want non-root", image, cfg.User)
	}
	if !slices.Equal(cfg.Entrypoint, []string{"/usr/local/bin/kms-plugin"}) {
		t.Errorf("%s: entrypoint %q", image, cfg.Entrypoint)
	}

	dir := cluster.TempDir(t, "kms-img11-")
	hsm, err := cluster.NewSoftHSM(ctx, dir, "image")
	if err != nil {
		t.Fatal(err)
	}
	run := staticPodRun(t, image, filepath.Join(dir, "host"), filepath.Join(dir, "kms-plugin-container.log"))
	softhsmDir := filepath.Dir(hsm.Conf)
	run.cfg.Mounts = append(run.cfg.Mounts,
		cluster.Mount{Host: cluster.SoftHSMModule, Container: cluster.SoftHSMModule, ReadOnly: true},
		cluster.Mount{Host: softhsmDir, Container: softhsmDir},
	)
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`endpoint: unix:///var/run/kmsplugin/socket.sock
provider: pkcs11
pkcs11:
  module: %s
  moduleEnv:
    SOFTHSM2_CONF: %s
  tokenLabel: %s
  pinFile: %s
  keyLabel: kms-image
  tokenDir: %s
httpAddr: 127.0.0.1:%d
log:
  format: json
`, cluster.SoftHSMModule, hsm.Conf, hsm.Label, hsm.PINFile, hsm.TokenDir, port)
	configPath := argValue(run.cfg.Args, "config")
	if err := os.WriteFile(run.hostPath(t, configPath), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}

	// keyset rotate, in a container like the pod's: the first key version.
	once := run.cfg
	once.Name += "-keyset"
	once.Args = []string{"keyset", "rotate", "--config=" + configPath}
	version, err := pm.Output(ctx, once.RunArgs()...)
	if err != nil || version == "" {
		t.Fatalf("keyset rotate in the container: %q, %v", version, err)
	}
	keys, err := hsm.SecretKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 {
		t.Fatalf("token holds %d secret keys after keyset rotate, want 1: %v", len(keys), keys)
	}

	// serve, with a library of the module's own in a mounted directory on
	// LD_LIBRARY_PATH, as README "Container images" says to ship what the
	// rootfs lacks: the host's libcrypto, which must be loaded from there
	// rather than from the rootfs.
	libDir := filepath.Join(dir, "hsmlib")
	if err := os.Mkdir(libDir, 0o755); err != nil {
		t.Fatal(err)
	}
	libcrypto := hostLibrary(t, cluster.SoftHSMModule, "libcrypto.so.3")
	data, err := os.ReadFile(libcrypto)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(libDir, "libcrypto.so.3"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	const libMount = "/opt/pkcs11/lib"
	run.cfg.Mounts = append(run.cfg.Mounts, cluster.Mount{Host: libDir, Container: libMount, ReadOnly: true})
	run.cfg.Env = append(run.cfg.Env, "LD_LIBRARY_PATH="+libMount)

	ctr, err := pm.NewContainer(run.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ctr.Remove(context.Background()) })
	pid, err := ctr.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	socket := run.hostPath(t, "/var/run/kmsplugin/socket.sock")
	st := waitServing(ctx, t, ctr, socket, fmt.Sprintf("http://127.0.0.1:%d", port), []string{"/livez", "/readyz"})
	t.Logf("key version %s in the token; serving %+v", version, st)
	if st.Provider != "pkcs11" {
		t.Errorf("/status provider %q, want pkcs11", st.Provider)
	}
	hp, err := cluster.ReadHostProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	if strconv.Itoa(hp.UID) != run.cfg.User || !hp.NoNewPrivs {
		t.Errorf("container process %+v, want uid %s and no new privileges", hp, run.cfg.User)
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, lib := range []string{cluster.SoftHSMModule, libMount + "/libcrypto.so.3"} {
		if !bytes.Contains(maps, []byte(" "+lib+"\n")) {
			t.Errorf("the plugin has not loaded %s (mounted); /proc/%d/maps:\n%s", lib, pid, maps)
		}
	}
	if bytes.Contains(maps, []byte("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")) {
		t.Errorf("the plugin loaded the rootfs's libcrypto despite LD_LIBRARY_PATH")
	}

	// Encrypt and Decrypt over the socket, as kube-apiserver calls them.
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("localhost"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kms := kmsapi.NewKeyManagementServiceClient(conn)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	seed := []byte(cluster.RandomHex(16))
	enc, err := kms.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "image-pkcs11"})
	if err != nil {
		t.Fatalf("Encrypt: %v\n%s", err, ctr.Process().LogTail(20))
	}
	if enc.KeyId != st.KeyID || bytes.Contains(enc.Ciphertext, seed) {
		t.Errorf("Encrypt: key_id %q (status %q), ciphertext holds the plaintext: %v", enc.KeyId, st.KeyID, bytes.Contains(enc.Ciphertext, seed))
	}
	dec, err := kms.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "image-pkcs11"})
	if err != nil {
		t.Fatalf("Decrypt: %v", err)
	}
	if !bytes.Equal(dec.Plaintext, seed) {
		t.Errorf("Decrypt returned %q, want %q", dec.Plaintext, seed)
	}
	if err := ctr.Stop(); err != nil {
		t.Fatalf("stop: %v\n%s", err, ctr.Process().LogTail(20))
	}
}

// TestContainerRunArgs checks how the harness spells a pod's container as
// podman flags, and its host-side process and capability readers, without
// podman: a wrong flag here would make the image tests check another
// container than the static pod's.
func TestContainerRunArgs(t *testing.T) {
	cfg := cluster.ContainerConfig{
		Name: "n", Image: "img:1", Args: []string{"serve", "--config=/c"}, User: "0",
		Mounts:  []cluster.Mount{{Host: "/h/a", Container: "/a"}, {Host: "/h/b", Container: "/b", ReadOnly: true}},
		CapDrop: []string{"ALL"}, CapAdd: []string{"DAC_OVERRIDE", "CHOWN"},
		ReadOnlyRoot: true, NoNewPrivileges: true, HostNetwork: true, Memory: "268435456",
	}
	want := []string{"run", "--rm", "--pull", "never", "--name", "n", "--sig-proxy=true", "--user", "0",
		"--volume", "/h/a:/a", "--volume", "/h/b:/b:ro", "--cap-drop", "ALL", "--cap-add", "DAC_OVERRIDE", "--cap-add", "CHOWN",
		"--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges", "--network", "host", "--memory", "268435456",
		"img:1", "serve", "--config=/c"}
	if got := cfg.RunArgs(); !slices.Equal(got, want) {
		t.Errorf("RunArgs:\n got %q\nwant %q", got, want)
	}
	cfg = cluster.ContainerConfig{Name: "n", Image: "img:1", Command: []string{"/usr/local/bin/kms-plugin", "rotate"}, Args: []string{"--x"}}
	want = []string{"run", "--rm", "--pull", "never", "--name", "n", "--sig-proxy=true", "--entrypoint", "/usr/local/bin/kms-plugin", "img:1", "rotate", "--x"}
	if got := cfg.RunArgs(); !slices.Equal(got, want) {
		t.Errorf("RunArgs with a command:\n got %q\nwant %q", got, want)
	}

	for _, tc := range []struct {
		names []string
		want  uint64
		err   bool
	}{
		{nil, 0, false},
		{[]string{"CHOWN", "DAC_OVERRIDE"}, 0x3, false},
		{[]string{"cap_net_bind_service"}, 1 << 10, false},
		{[]string{"SYS_ADMIN"}, 0, true},
	} {
		got, err := cluster.CapabilityMask(tc.names)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("CapabilityMask(%q) = %#x, %v; want %#x, error %v", tc.names, got, err, tc.want, tc.err)
		}
	}

	hp, err := cluster.ReadHostProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if hp.UID != os.Geteuid() || hp.GID != os.Getegid() {
		t.Errorf("ReadHostProcess(self) = %+v; want uid %d gid %d", hp, os.Geteuid(), os.Getegid())
	}
	if _, err := cluster.ReadHostProcess(1 << 30); err == nil {
		t.Error("ReadHostProcess of a PID that does not exist: no error")
	}
}

// hostLibrary is the path ldd resolves lib to for module on the host.
func hostLibrary(t *testing.T, module, lib string) string {
	t.Helper()
	out, err := exec.Command("ldd", module).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", module, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		// "\tlibcrypto.so.3 => /lib/x86_64-linux-gnu/libcrypto.so.3 (0x...)"
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == lib && f[1] == "=>" {
			return f[2]
		}
	}
	t.Fatalf("ldd %s does not list %s:\n%s", module, lib, out)
	return ""
}
