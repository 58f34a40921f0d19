//go:build runtimes

package runtimes_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// dpkgQueryShim puts a dpkg-query that answers nothing first in the
// service's PATH (see startPodman); the qemu guest sets it.
var dpkgQueryShim bool

// podman is one `podman system service` with its own configuration,
// storage, run and tmp dirs (none of the machine's defaults are touched),
// as root or as a rootless user.
type podman struct {
	*engine
	bin  string
	env  []string // for the podman CLI: the same configuration as the service
	cred *syscall.Credential
	// cgroupParent is where the containers' cgroups go (rootful), removed
	// at cleanup.
	cgroupParent string
}

// removeCgroups removes the cgroup name at the top of every hierarchy
// mounted under /sys/fs/cgroup, deepest first, once its processes are gone.
func removeCgroups(name string) {
	tops, _ := filepath.Glob("/sys/fs/cgroup/*/" + name)
	if d := "/sys/fs/cgroup/" + name; fileExists(d) {
		tops = append(tops, d)
	}
	for _, top := range tops {
		var dirs []string
		_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			for try := 0; try < 50 && os.Remove(dirs[i]) != nil && fileExists(dirs[i]); try++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// rootless is a throwaway unprivileged user with subordinate ids, removed
// at cleanup.
type rootless struct {
	name     string
	uid, gid int
}

func newRootless(t *testing.T) *rootless {
	t.Helper()
	useradd := testenv.Tool(t, "useradd")
	userdel := testenv.Tool(t, "userdel")
	testenv.Tool(t, "newuidmap")
	name := testenv.Name("nsrt")
	// Not a system user: useradd gives it ranges in /etc/subuid and
	// /etc/subgid, which a rootless engine maps its user namespace from.
	mustSh(t, time.Minute, nil, useradd, "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name)
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	t.Cleanup(func() {
		// Rootless podman re-executes itself inside its user namespace
		// and the process we started may exit first, so the service and
		// its pause process are found by the uid, which only this test's
		// processes have.
		stopUser(uid)
		if out, err := sh(time.Minute, nil, userdel, name); err != nil {
			t.Errorf("userdel %s: %v: %s", name, err, out)
		}
	})
	if b, _ := os.ReadFile("/etc/subuid"); !strings.Contains(string(b), name+":") {
		t.Fatalf("useradd gave %s no /etc/subuid range (SUB_UID_COUNT in /etc/login.defs?)", name)
	}
	return &rootless{name: name, uid: uid, gid: gid}
}

// stopUser ends every process of uid (a user the test created): SIGTERM,
// then SIGKILL what is left after 10 s.
func stopUser(uid int) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			pids := pidsOf(uid)
			if len(pids) == 0 {
				return
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, sig)
			}
			if time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// pidsOf lists the live processes whose real uid is uid.
func pidsOf(uid int) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Uid:"); ok {
				if f := strings.Fields(v); len(f) > 0 && f[0] == strconv.Itoa(uid) {
					if !strings.Contains(string(b), "State:\tZ") {
						pids = append(pids, pid)
					}
				}
			}
		}
	}
	return pids
}

// startPodman runs the Docker-compatible API of Podman on a socket of its
// own, as root (u == nil) or as u, and stops it (by pid), its pause
// process and every container at cleanup.
func startPodman(t *testing.T, u *rootless) *podman {
	t.Helper()
	need(t, os.Geteuid() == 0, "needs root: run `sudo make test-runtimes`")
	bin, err := exec.LookPath("podman")
	need(t, err == nil, "podman is not installed: `sudo make test-runtimes` installs Debian's")
	dir, err := os.MkdirTemp("", "nsrp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(dir) })
	p := &podman{engine: &engine{dir: dir, sock: filepath.Join(dir, "run", "podman.sock")}, bin: bin}
	// What podman creates outside its configured dirs whatever it is told:
	// cgroups (conmon's under the cgroup parent, libpod_parent by default)
	// and, as root, an image blob cache under /var/lib/containers.
	p.cgroupParent = testenv.Name("nsrt-podman-")
	t.Cleanup(func() { removeCgroups(p.cgroupParent) })
	if _, err := os.Stat("/sys/fs/cgroup/unified/libpod_parent"); os.IsNotExist(err) {
		t.Cleanup(func() { removeCgroups("libpod_parent") })
	}
	if _, err := os.Stat("/var/lib/containers"); os.IsNotExist(err) && u == nil {
		t.Cleanup(func() { _ = os.RemoveAll("/var/lib/containers") })
	}
	for _, d := range []string{"home", "run", "tmp", "storage", "cni"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// This host's root cannot raise rlimits (no CAP_SYS_RESOURCE), and
	// podman's default ulimits would raise them; no systemd, so cgroupfs
	// and a file for events (which is also how the service sees the
	// containers the CLI starts).
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "%[1]s/events.log"
tmp_dir = "%[1]s/tmp"

[network]
network_config_dir = "%[1]s/cni"
`, dir)
	storage := fmt.Sprintf(`[storage]
driver = "overlay"
graphroot = "%[1]s/storage"
runroot = "%[1]s/run/storage"
`, dir)
	for name, body := range map[string]string{"containers.conf": conf, "storage.conf": storage} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	path := os.Getenv("PATH")
	if dpkgQueryShim {
		// podman info (behind /version) runs `dpkg -S` for runc and
		// conmon; over the guest's shared root under TCG that reads every
		// dpkg .list file for minutes, and the API's answers wait for it.
		// A dpkg-query that knows nothing makes it say "Unknown" at once.
		shim := filepath.Join(dir, "shim")
		if err := os.MkdirAll(shim, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(shim, "dpkg-query"), []byte("#!/bin/sh\nexit 1\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		path = shim + ":" + path
	}
	p.env = []string{
		"PATH=" + path,
		"HOME=" + filepath.Join(dir, "home"),
		"XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"),
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "home", ".config"),
		"XDG_DATA_HOME=" + filepath.Join(dir, "home", ".local", "share"),
		"CONTAINERS_CONF=" + filepath.Join(dir, "containers.conf"),
		"CONTAINERS_STORAGE_CONF=" + filepath.Join(dir, "storage.conf"),
	}
	if u != nil {
		p.cred = &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid)}
		if err := filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Lchown(path, u.uid, u.gid)
		}); err != nil {
			t.Fatal(err)
		}
	}
	logf, err := os.Create(filepath.Join(dir, "service.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "system", "service", "--time=0", "unix://"+p.sock)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	if err := startTied(cmd); err != nil {
		t.Fatalf("start podman system service: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		if out, err := p.cli(2*time.Minute, "rm", "-f", "-a", "-t", "1"); err != nil {
			t.Errorf("podman rm -a: %v: %s", err, out)
		}
		stopPid(cmd.Process, done, 20*time.Second)
		// A rootless podman keeps its user namespace in a pause process,
		// which outlives the service; it is ours, by the pid it records.
		for _, f := range []string{filepath.Join(dir, "run", "libpod", "tmp", "pause.pid"), filepath.Join(dir, "tmp", "pause.pid")} {
			if b, err := os.ReadFile(f); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("podman service log:\n%s", lastLines(string(b), 30))
		}
	})
	c, err := docker.New(p.host())
	if err != nil {
		t.Fatal(err)
	}
	p.client = c
	if err := waitAPI(c, "podman system service", done, logf.Name(), 60*time.Second+followBound); err != nil {
		t.Fatal(err)
	}
	v, _ := p.cli(time.Minute, "version", "-f", "{{.Server.Version}}")
	p.name = "Podman " + v
	return p
}

// cli runs the podman CLI with the service's configuration and user.
func (p *podman) cli(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.bin, args...)
	cmd.Env = p.env
	cmd.Dir = p.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return strings.TrimSpace(string(out) + string(ee.Stderr)), err
		}
		return strings.TrimSpace(string(out)), err
	}
	return strings.TrimSpace(string(out)), nil
}

func (p *podman) mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := p.cli(3*time.Minute, args...)
	if err != nil {
		t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// buildImage builds the demo backend's image from the repository's
// Dockerfile (its FROM scratch target: no registry) with podman.
func (p *podman) buildImage(t *testing.T) string {
	t.Helper()
	ctxDir := filepath.Join(p.dir, "build")
	if err := os.MkdirAll(filepath.Join(ctxDir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	demo := testenv.Binary(t, "DEMO_BACKEND_BIN", "github.com/nsredirect/nsredirect/cmd/demo-backend")
	for src, dst := range map[string]string{filepath.Join(repoDir(t), "Dockerfile"): "Dockerfile", demo: "bin/demo-backend"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ctxDir, dst), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if p.cred != nil {
		_ = filepath.Walk(ctxDir, func(path string, _ os.FileInfo, err error) error {
			if err == nil {
				err = os.Lchown(path, int(p.cred.Uid), int(p.cred.Gid))
			}
			return err
		})
	}
	tag := "localhost/nsrt-demo-backend:test"
	p.mustCLI(t, "build", "--target", "demo-backend-prebuilt", "-t", tag, ctxDir)
	return tag
}

// TestPodman is `nsredirect docker --docker-host unix://<podman socket>`
// (the systemd unit's command line) against Podman's Docker-compatible
// API: a labelled rootful container, then a rootless user's container
// enrolled by the root daemon; v4 and v6 loopback reach :3210, `podman
// restart` and a recreate are followed within 1 s, and the last one out
// leaves nothing. (Containers run with --network none: the redirect is on
// loopback, and podman's default network would add firewall rules to this
// shared host.)
func TestPodman(t *testing.T) {
	for _, mode := range []string{"rootful", "rootless"} {
		t.Run(mode, func(t *testing.T) {
			var u *rootless
			if mode == "rootless" {
				need(t, os.Geteuid() == 0, "needs root: run `sudo make test-runtimes`")
				u = newRootless(t)
			}
			p := startPodman(t, u)
			c := newCell(t, p.name+" Docker API, "+mode, "host daemon: `podman run`, `podman restart`")
			podmanCell(t, c, p)
		})
	}
}

func podmanCell(t *testing.T, c *cell, p *podman) {
	img := p.buildImage(t)
	pin := testenv.BPFFS(t)
	run := testenv.Name("nsrt")
	label := run + ".redirect"
	runCtr := func(name string) {
		args := []string{"run", "-d", "--network", "none", "--name", name, "--label", label + "=80=3210"}
		if p.cred == nil {
			args = append(args, "--cgroup-parent", "/"+p.cgroupParent)
		}
		p.mustCLI(t, append(args, img)...)
	}
	runCtr(run + "-a")
	d := hostDaemon(t, pin, p.sock, label)
	progs := testenv.ProgIDs(t, pin)
	pa := p.pidOf(t, run+"-a")
	waitRedirect(t, pa, "127.0.0.1:80", 5*time.Second)
	clients(t, pa, "podman container")

	l := restartLatency(t, "podman restart", func() { p.mustCLI(t, "restart", "-t", "1", run+"-a") }, p.byName(run+"-a"))
	c.measure("`podman restart` followed in %s", ms(l))
	l = restartLatency(t, "podman rm -f && podman run", func() {
		p.mustCLI(t, "rm", "-f", "-t", "1", run+"-a")
		runCtr(run + "-a")
	}, p.byName(run+"-a"))
	c.measure("recreate followed in %s", ms(l))
	clients(t, p.pidOf(t, run+"-a"), "recreated podman container")

	p.mustCLI(t, "stop", "-t", "1", run+"-a")
	testenv.WaitStatus(t, pin, "no rule once the container stopped", func(rows []testenv.StatusRow) bool { return len(rows) == 0 })
	if err := d.Stop(syscall.SIGTERM, 15*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d.Output())
	}
	testenv.AssertGone(t, pin, progs)
}
