package manifests

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The two descriptions of the kms-plugin image: the Dockerfile, for builders
// with a registry, and the Containerfile `make image` builds with podman
// from the context hack/image/build.sh assembles.
const (
	dockerfilePath    = "../Dockerfile"
	containerfilePath = "../hack/image/Containerfile"
	imageBuildScript  = "../hack/image/build.sh"
)

// imageStage is what the final stage of a Dockerfile says about the image.
type imageStage struct {
	From       string            // base of the final stage
	Files      map[string]string // path in the image -> base name of its source
	CopyFrom   map[string]string // path in the image -> the stage it comes from ("" = the context)
	Sources    []string          // context sources of the final stage's COPYs
	Dirs       map[string]string // directory sources (ending in /) -> where their contents go
	User       string
	Entrypoint []string
	Cmd        []string
	Labels     map[string]string
	Args       map[string]string // ARG name -> default
	Runs       int               // RUN instructions (none: there is no shell)
}

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	line int
	cmd  string // upper case
	rest string
}

// splitInstructions joins continuation lines and drops comments and blank
// lines.
func splitInstructions(src string) ([]instruction, error) {
	var out []instruction
	var cur strings.Builder
	start := 0
	for i, line := range strings.Split(src, "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		} else if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue // a blank line or comment inside a continued instruction
		}
		if body, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, rest, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{line: start, cmd: strings.ToUpper(cmd), rest: strings.TrimSpace(rest)})
		cur.Reset()
	}
	if cur.Len() != 0 {
		return nil, fmt.Errorf("line %d: instruction continues past the end of the file", start)
	}
	return out, nil
}

// parseFinalStage parses a Dockerfile and returns its final stage.
func parseFinalStage(src string) (imageStage, error) {
	ins, err := splitInstructions(src)
	if err != nil {
		return imageStage{}, err
	}
	var st imageStage
	stages := 0
	for _, in := range ins {
		fail := func(format string, args ...any) (imageStage, error) {
			return imageStage{}, fmt.Errorf("line %d (%s): %s", in.line, in.cmd, fmt.Sprintf(format, args...))
		}
		switch in.cmd {
		case "FROM":
			f := strings.Fields(in.rest)
			if len(f) != 1 && !(len(f) == 3 && strings.EqualFold(f[1], "AS")) {
				return fail("want FROM IMAGE [AS NAME], got %q", in.rest)
			}
			stages++
			st = imageStage{From: f[0], Files: map[string]string{}, CopyFrom: map[string]string{}, Dirs: map[string]string{}, Labels: map[string]string{}, Args: map[string]string{}}
		case "ARG":
			name, def, _ := strings.Cut(in.rest, "=")
			if st.Args != nil {
				st.Args[name] = def
			}
		case "COPY", "ADD":
			if stages == 0 {
				return fail("before FROM")
			}
			if in.cmd == "ADD" {
				return fail("ADD fetches and unpacks; use COPY")
			}
			f := strings.Fields(in.rest)
			from := ""
			for len(f) > 0 && strings.HasPrefix(f[0], "--") {
				if v, ok := strings.CutPrefix(f[0], "--from="); ok {
					from = v
				} else {
					return fail("flag %s: only --from is used, so both builders give the same owner and mode", f[0])
				}
				f = f[1:]
			}
			if len(f) < 2 {
				return fail("want COPY SRC... DEST, got %q", in.rest)
			}
			srcs, dest := f[:len(f)-1], f[len(f)-1]
			if len(srcs) > 1 && !strings.HasSuffix(dest, "/") {
				return fail("several sources into %s, which does not end in /", dest)
			}
			for _, s := range srcs {
				if strings.ContainsAny(s, "*?[") {
					return fail("source %s is a pattern; name each file", s)
				}
				if strings.HasSuffix(s, "/") {
					if len(srcs) != 1 || from != "" {
						return fail("directory %s: copy a directory of the context on its own", s)
					}
					st.Dirs[s] = dest
					continue
				}
				to := dest
				if strings.HasSuffix(dest, "/") {
					to = dest + path.Base(s)
				}
				if _, dup := st.Files[to]; dup {
					return fail("%s copied twice", to)
				}
				st.Files[to] = path.Base(s)
				st.CopyFrom[to] = from
				if from == "" {
					st.Sources = append(st.Sources, s)
				}
			}
		case "USER":
			st.User = in.rest
		case "ENTRYPOINT", "CMD":
			var v []string
			if err := json.Unmarshal([]byte(in.rest), &v); err != nil {
				return fail("not the exec (JSON array) form, which needs no shell: %v", err)
			}
			if in.cmd == "ENTRYPOINT" {
				st.Entrypoint = v
			} else {
				st.Cmd = v
			}
		case "LABEL":
			kvs, err := splitLabels(in.rest)
			if err != nil {
				return fail("%v", err)
			}
			maps.Copy(st.Labels, kvs)
		case "RUN":
			st.Runs++
		case "WORKDIR", "ENV", "EXPOSE", "VOLUME", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "ONBUILD":
		default:
			return fail("unknown instruction")
		}
	}
	if stages == 0 {
		return imageStage{}, fmt.Errorf("no FROM")
	}
	return st, nil
}

// splitLabels parses LABEL's KEY="VALUE" pairs (values quoted or bare).
func splitLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	for s = strings.TrimSpace(s); s != ""; s = strings.TrimSpace(s) {
		key, rest, ok := strings.Cut(s, "=")
		if !ok || key == "" || strings.ContainsAny(key, " \t\"") {
			return nil, fmt.Errorf("want KEY=VALUE at %q", s)
		}
		var val string
		if strings.HasPrefix(rest, `"`) {
			end := strings.Index(rest[1:], `"`)
			if end < 0 {
				return nil, fmt.Errorf("unterminated quote in %q", s)
			}
			val, s = rest[1:end+1], rest[end+2:]
		} else {
			val, s, _ = strings.Cut(rest, " ")
		}
		out[key] = val
	}
	return out, nil
}

func readStage(t *testing.T, file string) imageStage {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	st, err := parseFinalStage(string(data))
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return st
}

// TestImageLayoutsAgree checks that the Dockerfile and the Containerfile of
// make image describe the same image: FROM scratch, the same files from the
// same sources, the same non-root numeric user, labels, entrypoint and
// default arguments, and no RUN (there is no shell to run it).
func TestImageLayoutsAgree(t *testing.T) {
	docker := readStage(t, dockerfilePath)
	podman := readStage(t, containerfilePath)

	wantFiles := map[string]string{
		"/etc/passwd":                        "passwd",
		"/etc/group":                         "group",
		"/etc/ssl/certs/ca-certificates.crt": "ca-certificates.crt",
		"/usr/local/bin/kms-plugin":          "kms-plugin",
		"/usr/local/bin/kms-plugin-serve":    "kms-plugin-serve",
	}
	for name, st := range map[string]imageStage{"Dockerfile": docker, "Containerfile": podman} {
		if st.From != "scratch" {
			t.Errorf("%s: final stage FROM %s, want scratch", name, st.From)
		}
		if st.Runs != 0 {
			t.Errorf("%s: final stage has %d RUN instructions; the image has no shell", name, st.Runs)
		}
		if !maps.Equal(st.Files, wantFiles) {
			t.Errorf("%s: files %v, want %v", name, st.Files, wantFiles)
		}
		if len(st.Dirs) != 0 {
			t.Errorf("%s: copies directories %v; the static image is single files", name, st.Dirs)
		}
		for _, l := range []string{"org.opencontainers.image.version", "org.opencontainers.image.revision", "org.opencontainers.image.source"} {
			if st.Labels[l] == "" {
				t.Errorf("%s: no label %s", name, l)
			}
		}
	}
	if docker.User != podman.User {
		t.Errorf("USER: Dockerfile %q, Containerfile %q", docker.User, podman.User)
	}
	if !slices.Equal(docker.Entrypoint, podman.Entrypoint) || !slices.Equal(docker.Cmd, podman.Cmd) {
		t.Errorf("ENTRYPOINT/CMD: Dockerfile %q %q, Containerfile %q %q", docker.Entrypoint, docker.Cmd, podman.Entrypoint, podman.Cmd)
	}
	if !maps.Equal(docker.Labels, podman.Labels) {
		t.Errorf("LABEL: Dockerfile %v, Containerfile %v", docker.Labels, podman.Labels)
	}
	for _, arg := range []string{"VERSION", "REVISION", "SOURCE"} {
		if docker.Args[arg] != podman.Args[arg] {
			t.Errorf("ARG %s default: Dockerfile %q, Containerfile %q", arg, docker.Args[arg], podman.Args[arg])
		}
	}

	// Same sources: the Dockerfile copies hack/image's passwd and group, as
	// build.sh puts them into the Containerfile's context, and both make the
	// CA bundle with hack/image/ca-bundle.sh.
	for _, s := range docker.Sources {
		if !strings.HasPrefix(s, "hack/image/") {
			t.Errorf("Dockerfile: final stage copies %s from the context; want files of hack/image/ only", s)
		}
	}
	df, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile(imageBuildScript)
	if err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{"Dockerfile": string(df), "build.sh": string(script)} {
		if !strings.Contains(text, "ca-bundle.sh") {
			t.Errorf("%s does not make the CA bundle with hack/image/ca-bundle.sh", name)
		}
	}
	// Every context file of the Containerfile is one build.sh assembles.
	for _, s := range podman.Sources {
		if !strings.Contains(string(script), `"${ctx}/`+s+`"`) && !strings.Contains(string(script), `"${here}/`+s+`"`) {
			t.Errorf("Containerfile copies %s, which build.sh does not put into the context", s)
		}
	}
}

// TestImageUser checks that the image's USER is numeric (kubelet's
// runAsNonRoot can only check a number), not root, and named in the
// image's passwd and group files; and that no account there has a shell.
func TestImageUser(t *testing.T) {
	st := readStage(t, containerfilePath)
	uid, gid, ok := strings.Cut(st.User, ":")
	u, errU := strconv.Atoi(uid)
	g, errG := strconv.Atoi(gid)
	if !ok || errU != nil || errG != nil {
		t.Fatalf("USER %q: want numeric UID:GID", st.User)
	}
	if u == 0 || g == 0 {
		t.Fatalf("USER %q: the image must not run as root by default", st.User)
	}
	passwd := readLines(t, "../hack/image/passwd")
	group := readLines(t, "../hack/image/group")
	found := false
	for _, l := range passwd {
		f := strings.Split(l, ":")
		if len(f) != 7 {
			t.Fatalf("passwd line %q: want 7 fields", l)
		}
		if f[6] != "/sbin/nologin" {
			t.Errorf("passwd: %s has shell %s, want /sbin/nologin", f[0], f[6])
		}
		if f[1] != "x" {
			t.Errorf("passwd: %s has a password field %q, want x", f[0], f[1])
		}
		found = found || (f[2] == uid && f[3] == gid)
	}
	if !found {
		t.Errorf("passwd has no account with uid %s and gid %s", uid, gid)
	}
	if !slices.ContainsFunc(group, func(l string) bool { return strings.Split(l, ":")[2] == gid }) {
		t.Errorf("group has no group %s", gid)
	}
}

func readLines(t *testing.T, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

// TestImageCmdConfigIsMounted checks that the config file the image's CMD
// names is inside a directory the static pod mounts, so `podman run IMAGE`
// and the static pod read the same file.
func TestImageCmdConfigIsMounted(t *testing.T) {
	st := readStage(t, containerfilePath)
	i := slices.Index(st.Cmd, "--config")
	if i < 0 || i+1 >= len(st.Cmd) {
		t.Fatalf("CMD %q has no --config FILE", st.Cmd)
	}
	cfg := st.Cmd[i+1]
	pod := docs(t, "kms-plugin.static-pod.yaml")[0]
	c := get(pod, "spec", "containers", 0)
	args := strs(t, get(c, "args"))
	if !slices.Contains(args, "--config="+cfg) {
		t.Errorf("static pod args %q do not name the image's default config %s", args, cfg)
	}
	mounted := false
	for i := 0; get(c, "volumeMounts", i) != nil; i++ {
		if p, _ := get(c, "volumeMounts", i, "mountPath").(string); strings.HasPrefix(cfg, p+"/") {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("static pod mounts nothing above %s", cfg)
	}
}

// TestParseFinalStage checks the parser on what the image files must not
// do, so a layout check cannot pass by misreading them.
func TestParseFinalStage(t *testing.T) {
	for _, tc := range []struct {
		name, src, err string
	}{
		{"no FROM", "COPY a /a\n", "before FROM"},
		{"empty", "# only a comment\n", "no FROM"},
		{"shell-form entrypoint", "FROM scratch\nENTRYPOINT /bin/x serve\n", "exec (JSON array) form"},
		{"chmod flag", "FROM scratch\nCOPY --chmod=0755 a /a\n", "only --from"},
		{"pattern", "FROM scratch\nCOPY bin/* /usr/local/bin/\n", "pattern"},
		{"directory with files", "FROM scratch\nCOPY rootfs/ a /\n", "on its own"},
		{"directory from a stage", "FROM scratch\nCOPY --from=b rootfs/ /\n", "on its own"},
		{"several into a file", "FROM scratch\nCOPY a b /x\n", "does not end in /"},
		{"ADD", "FROM scratch\nADD a.tar /\n", "use COPY"},
		{"twice", "FROM scratch\nCOPY a /x/\nCOPY b/a /x/\n", "copied twice"},
		{"dangling continuation", "FROM scratch\nLABEL a=b \\\n", "past the end"},
		{"bad label", "FROM scratch\nLABEL a=\"b\n", "unterminated"},
		{"unknown", "FROM scratch\nFROBNICATE x\n", "unknown instruction"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseFinalStage(tc.src)
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("error %v, want one containing %q", err, tc.err)
			}
		})
	}

	st, err := parseFinalStage("FROM a AS b\nRUN x\nFROM scratch\nLABEL k=\"v 1\" \\\n  # note\n  j=w\nCOPY --from=b /o/x /o/y /bin/\nUSER 1:2\nENTRYPOINT [\"/bin/x\"]\n")
	if err != nil {
		t.Fatal(err)
	}
	want := imageStage{
		From: "scratch", Files: map[string]string{"/bin/x": "x", "/bin/y": "y"},
		CopyFrom: map[string]string{"/bin/x": "b", "/bin/y": "b"},
		User:     "1:2", Entrypoint: []string{"/bin/x"}, Labels: map[string]string{"k": "v 1", "j": "w"},
	}
	if st.From != want.From || !maps.Equal(st.Files, want.Files) || !maps.Equal(st.CopyFrom, want.CopyFrom) ||
		st.User != want.User || !slices.Equal(st.Entrypoint, want.Entrypoint) || !maps.Equal(st.Labels, want.Labels) || st.Runs != 0 {
		t.Errorf("parsed %+v, want %+v", st, want)
	}
}

// TestPKCS11ImageAgrees checks the PKCS#11 image's Containerfile against
// the static image's: FROM scratch, no RUN, the same user, labels, default
// arguments and passwd, group and CA bundle; its one binary (every
// command) as the entrypoint and at the path the CronJobs run; the rest is
// the rootfs build-pkcs11.sh unpacks from Debian packages, libc6 among them.
func TestPKCS11ImageAgrees(t *testing.T) {
	static := readStage(t, containerfilePath)
	p11 := readStage(t, "../hack/image/Containerfile.pkcs11")
	if p11.From != "scratch" || p11.Runs != 0 {
		t.Errorf("Containerfile.pkcs11: FROM %s with %d RUN; want scratch and none", p11.From, p11.Runs)
	}
	if p11.User != static.User || !slices.Equal(p11.Cmd, static.Cmd) || !maps.Equal(p11.Labels, static.Labels) || !maps.Equal(p11.Args, static.Args) {
		t.Errorf("Containerfile.pkcs11: USER %q CMD %q LABEL %v ARG %v; want the static image's %q %q %v %v",
			p11.User, p11.Cmd, p11.Labels, p11.Args, static.User, static.Cmd, static.Labels, static.Args)
	}
	if !slices.Equal(p11.Entrypoint, []string{"/usr/local/bin/kms-plugin"}) {
		t.Errorf("Containerfile.pkcs11: ENTRYPOINT %q, want [/usr/local/bin/kms-plugin]", p11.Entrypoint)
	}
	want := map[string]string{
		"/etc/passwd":                        "passwd",
		"/etc/group":                         "group",
		"/etc/ssl/certs/ca-certificates.crt": "ca-certificates.crt",
		"/usr/local/bin/kms-plugin":          "kms-plugin",
	}
	if !maps.Equal(p11.Files, want) {
		t.Errorf("Containerfile.pkcs11: files %v, want %v", p11.Files, want)
	}
	if !maps.Equal(p11.Dirs, map[string]string{"rootfs/": "/"}) {
		t.Errorf("Containerfile.pkcs11: directories %v, want rootfs/ into /", p11.Dirs)
	}
	script, err := os.ReadFile("../hack/image/build-pkcs11.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append([]string{"rootfs", "ca-bundle.sh", "dpkg-deb -x"}, p11.Sources...) {
		if !strings.Contains(string(script), s) {
			t.Errorf("build-pkcs11.sh does not mention %q, which the image needs", s)
		}
	}
	pkgs := readLines(t, "../hack/image/pkcs11-packages")
	if !slices.Contains(pkgs, "libc6") {
		t.Errorf("pkcs11-packages %q: no libc6, which the cgo build needs", pkgs)
	}
}
