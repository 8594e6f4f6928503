package cluster

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Environment variables of the image tests.
const (
	// EnvImage names the kms-plugin image to run (make e2e passes the one
	// make image built, kms-plugin:VERSION).
	EnvImage = "KMS_PLUGIN_IMAGE"
	// EnvPKCS11Image names the PKCS#11 image (make image-pkcs11).
	EnvPKCS11Image = "KMS_PLUGIN_PKCS11_IMAGE"
	// EnvContainersConf is podman's own variable for its containers.conf;
	// when unset, the harness uses the repository's hack/image/containers.conf
	// (runc, cgroupfs, no default ulimits: what this kind of host needs).
	EnvContainersConf = "CONTAINERS_CONF"
)

// DefaultImage is the image make image tags besides kms-plugin:VERSION.
const DefaultImage = "kms-plugin:dev"

// DefaultPKCS11Image is the image make image-pkcs11 tags besides
// kms-plugin-pkcs11:VERSION.
const DefaultPKCS11Image = "kms-plugin-pkcs11:dev"

// Podman is the podman command line with a containers.conf.
type Podman struct {
	Path string // the podman binary
	Conf string // CONTAINERS_CONF for every call
}

// NewPodman finds podman on PATH and the containers.conf to use, and checks
// that podman can talk to its storage (podman info). The error says which
// of these failed.
func NewPodman(ctx context.Context) (*Podman, error) {
	path, err := exec.LookPath("podman")
	if err != nil {
		return nil, fmt.Errorf("podman is not installed (make image installs it: bash hack/apt-install.sh podman buildah runc)")
	}
	conf := os.Getenv(EnvContainersConf)
	if conf == "" {
		root, err := RepoRoot()
		if err != nil {
			return nil, fmt.Errorf("%s is unset and the repository's hack/image/containers.conf is unknown: %w", EnvContainersConf, err)
		}
		conf = filepath.Join(root, "hack", "image", "containers.conf")
	}
	if _, err := os.Stat(conf); err != nil {
		return nil, fmt.Errorf("containers.conf: %w", err)
	}
	p := &Podman{Path: path, Conf: conf}
	if _, err := p.Output(ctx, "info", "--format", "{{.Host.OCIRuntime.Name}}"); err != nil {
		return nil, fmt.Errorf("podman does not work here: %w", err)
	}
	return p, nil
}

// Command is `podman ARGS...` with the harness's containers.conf.
func (p *Podman) Command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, p.Path, args...)
	cmd.Env = append(os.Environ(), EnvContainersConf+"="+p.Conf)
	return cmd
}

// Output runs `podman ARGS...` and returns its trimmed stdout; a failure
// includes stderr.
func (p *Podman) Output(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := p.Command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("podman %s: %w; stderr: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

// ImageExists reports whether image is in podman's local storage.
func (p *Podman) ImageExists(ctx context.Context, image string) (bool, error) {
	err := p.Command(ctx, "image", "exists", image).Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &exit) && exit.ExitCode() == 1:
		return false, nil
	default:
		return false, fmt.Errorf("podman image exists %s: %w", image, err)
	}
}

// ImageFile is one entry of an image's file system.
type ImageFile struct {
	Type     byte // tar type flag: tar.TypeReg, tar.TypeDir, tar.TypeSymlink, ...
	Mode     os.FileMode
	UID, GID int
	Size     int64
	Link     string // symlink target
}

// ImageFiles returns every entry of image's file system by absolute path,
// read from `podman export` of a container created (not started) from it.
func (p *Podman) ImageFiles(ctx context.Context, image string) (map[string]ImageFile, error) {
	id, err := p.Output(ctx, "create", "--pull", "never", image)
	if err != nil {
		return nil, err
	}
	defer func() { _, _ = p.Output(context.WithoutCancel(ctx), "rm", "--force", id) }()
	cmd := p.Command(ctx, "export", id)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	files := map[string]ImageFile{}
	tr := tar.NewReader(out)
	var readErr error
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			readErr = err
			break
		}
		name := "/" + strings.TrimPrefix(filepath.Clean("/"+h.Name), "/")
		files[name] = ImageFile{Type: h.Typeflag, Mode: h.FileInfo().Mode(), UID: h.Uid, GID: h.Gid, Size: h.Size, Link: h.Linkname}
	}
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("podman export %s: %w; stderr: %s", image, err, stderr.Bytes())
	}
	if readErr != nil {
		return nil, fmt.Errorf("podman export %s: %w", image, readErr)
	}
	return files, nil
}

// Mount is a bind mount of a host path into a container.
type Mount struct {
	Host, Container string
	ReadOnly        bool
}

// ContainerConfig is what `podman run` is told about one container: the
// parts of a pod's container spec that podman has a flag for.
type ContainerConfig struct {
	Name  string // container name, unique on the machine
	Image string
	// Command replaces the image's entrypoint when set; Args follow the
	// image name (the pod's args, or its command's arguments).
	Command []string
	Args    []string
	// User is --user (runAsUser); empty keeps the image's USER.
	User string
	// Env are KEY=VALUE pairs (the container's env).
	Env             []string
	Mounts          []Mount
	CapDrop, CapAdd []string
	ReadOnlyRoot    bool   // readOnlyRootFilesystem
	NoNewPrivileges bool   // allowPrivilegeEscalation: false
	HostNetwork     bool   // hostNetwork: the plugin's ports on the host's loopback
	Memory          string // memory limit, podman's syntax ("256m"); empty: none
	LogPath         string // podman's and the container's output
}

// RunArgs are the `podman run` arguments for cfg, in the foreground, so
// the container lives as long as the podman process, which forwards
// SIGTERM to it and exits with its status.
func (cfg ContainerConfig) RunArgs() []string {
	args := []string{"run", "--rm", "--pull", "never", "--name", cfg.Name, "--sig-proxy=true"}
	if cfg.User != "" {
		args = append(args, "--user", cfg.User)
	}
	for _, e := range cfg.Env {
		args = append(args, "--env", e)
	}
	for _, m := range cfg.Mounts {
		v := m.Host + ":" + m.Container
		if m.ReadOnly {
			v += ":ro"
		}
		args = append(args, "--volume", v)
	}
	for _, c := range cfg.CapDrop {
		args = append(args, "--cap-drop", c)
	}
	for _, c := range cfg.CapAdd {
		args = append(args, "--cap-add", c)
	}
	if cfg.ReadOnlyRoot {
		// Kubernetes mounts no tmpfs on a read-only root; neither does this.
		args = append(args, "--read-only", "--read-only-tmpfs=false")
	}
	if cfg.NoNewPrivileges {
		args = append(args, "--security-opt", "no-new-privileges")
	}
	if cfg.HostNetwork {
		args = append(args, "--network", "host")
	}
	if cfg.Memory != "" {
		args = append(args, "--memory", cfg.Memory)
	}
	if len(cfg.Command) > 0 {
		args = append(args, "--entrypoint", cfg.Command[0])
		args = append(args, cfg.Image)
		args = append(args, cfg.Command[1:]...)
	} else {
		args = append(args, cfg.Image)
	}
	return append(args, cfg.Args...)
}

// Container is a container run in the foreground by a podman process.
type Container struct {
	Name   string
	podman *Podman
	proc   *Process
}

// NewContainer prepares cfg; Start runs it.
func (p *Podman) NewContainer(cfg ContainerConfig) (*Container, error) {
	if cfg.Name == "" || cfg.Image == "" || cfg.LogPath == "" {
		return nil, fmt.Errorf("container: Name, Image and LogPath are required")
	}
	return &Container{
		Name:   cfg.Name,
		podman: p,
		proc: &Process{
			Name:    "podman run " + cfg.Name,
			Path:    p.Path,
			Args:    cfg.RunArgs(),
			LogPath: cfg.LogPath,
			Env:     []string{EnvContainersConf + "=" + p.Conf},
		},
	}, nil
}

// Process is the podman process running the container.
func (c *Container) Process() *Process { return c.proc }

// Start starts podman run and waits until the container is running; it
// returns the host PID of the container's first process.
func (c *Container) Start(ctx context.Context) (int, error) {
	if err := c.proc.Start(); err != nil {
		return 0, err
	}
	var pid int
	err := waitUntil(ctx, c.proc, time.Minute, 100*time.Millisecond, "container "+c.Name+" running", func(ctx context.Context) (bool, error) {
		var err error
		pid, err = c.PID(ctx)
		return err == nil && pid > 0, err
	})
	return pid, err
}

// PID is the host PID of the container's first process, from podman inspect.
func (c *Container) PID(ctx context.Context) (int, error) {
	out, err := c.podman.Output(ctx, "container", "inspect", "--format", "{{.State.Running}} {{.State.Pid}}", c.Name)
	if err != nil {
		return 0, err
	}
	running, pid, _ := strings.Cut(out, " ")
	if running != "true" {
		return 0, fmt.Errorf("container %s is not running (%q)", c.Name, out)
	}
	return strconv.Atoi(pid)
}

// Stop sends SIGTERM to podman, which forwards it to the container, and
// waits; it returns an error unless the container exited 0.
func (c *Container) Stop() error { return c.proc.Stop() }

// Remove removes the container, if it is still there, whatever its state;
// for cleanup.
func (c *Container) Remove(ctx context.Context) error {
	_, err := c.podman.Output(ctx, "rm", "--force", "--ignore", "--time", "5", c.Name)
	return errors.Join(err, c.proc.Kill())
}

// HostProcess is what the host's /proc/PID/status says about a process.
type HostProcess struct {
	UID, GID   int    // effective
	CapEff     uint64 // effective capability set
	NoNewPrivs bool
}

// ReadHostProcess reads /proc/PID/status.
func ReadHostProcess(pid int) (HostProcess, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return HostProcess{}, err
	}
	var hp HostProcess
	seen := 0
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(val)
		if len(f) == 0 {
			continue
		}
		switch key {
		case "Uid", "Gid":
			if len(f) < 2 {
				return HostProcess{}, fmt.Errorf("/proc/%d/status: %s line %q", pid, key, line)
			}
			n, err := strconv.Atoi(f[1])
			if err != nil {
				return HostProcess{}, fmt.Errorf("/proc/%d/status: %w", pid, err)
			}
			if key == "Uid" {
				hp.UID = n
			} else {
				hp.GID = n
			}
			seen++
		case "CapEff":
			if hp.CapEff, err = strconv.ParseUint(f[0], 16, 64); err != nil {
				return HostProcess{}, fmt.Errorf("/proc/%d/status: %w", pid, err)
			}
			seen++
		case "NoNewPrivs":
			hp.NoNewPrivs = f[0] == "1"
			seen++
		}
	}
	if seen != 4 {
		return HostProcess{}, fmt.Errorf("/proc/%d/status: Uid, Gid, CapEff or NoNewPrivs missing", pid)
	}
	return hp, nil
}

// capabilityBit is the Linux capability number (capability.h) of name,
// spelled as Kubernetes spells it (without CAP_), for the capabilities a
// plugin pod may add.
func capabilityBit(name string) (uint, bool) {
	switch name {
	case "CHOWN":
		return 0, true
	case "DAC_OVERRIDE":
		return 1, true
	case "DAC_READ_SEARCH":
		return 2, true
	case "FOWNER":
		return 3, true
	case "SETGID":
		return 6, true
	case "SETUID":
		return 7, true
	case "NET_BIND_SERVICE":
		return 10, true
	case "IPC_LOCK":
		return 14, true
	}
	return 0, false
}

// CapabilityMask is the capability set of names (as Kubernetes spells them,
// without CAP_); an unknown name is an error.
func CapabilityMask(names []string) (uint64, error) {
	var m uint64
	for _, n := range names {
		bit, ok := capabilityBit(strings.TrimPrefix(strings.ToUpper(n), "CAP_"))
		if !ok {
			return 0, fmt.Errorf("capability %q: not one the harness knows", n)
		}
		m |= 1 << bit
	}
	return m, nil
}
