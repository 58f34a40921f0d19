//go:build runtimes

package runtimes_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginetest"
)

// engine is one running container engine that speaks the Docker API on its
// own unix socket.
type engine struct {
	name   string // for the table: "Docker Engine 29.8.0"
	sock   string
	client *docker.Client
	// env is the environment for the docker CLI and compose against this
	// engine (DOCKER_HOST, DOCKER_CONFIG with the compose plugin).
	env []string
	dir string
}

func (e *engine) host() string { return "unix://" + e.sock }

// sh runs a command with a deadline and returns its standard output, or on
// failure everything it printed.
func sh(timeout time.Duration, env []string, name string, args ...string) (string, error) {
	return testenv.Sh(timeout, env, name, args...)
}

func mustSh(t *testing.T, timeout time.Duration, env []string, name string, args ...string) string {
	t.Helper()
	return testenv.MustSh(t, timeout, env, name, args...)
}

// docker runs the docker CLI against e.
func (e *engine) docker(t *testing.T, args ...string) string {
	t.Helper()
	return mustSh(t, 3*time.Minute, e.env, dockerCLI(t), args...)
}

var (
	cliOnce sync.Once
	cliPath string
	cliErr  string
)

// dockerCLI finds a docker client that Docker 29 accepts (API >= 1.44,
// Docker 25 or later; Debian's 20.10 client speaks 1.41 and is refused).
func dockerCLI(t *testing.T) string {
	t.Helper()
	cliOnce.Do(func() {
		var tried []string
		for _, p := range []string{"docker", "/usr/local/bin/docker", "/usr/bin/docker"} {
			path, err := exec.LookPath(p)
			if err != nil {
				continue
			}
			v, _ := sh(10*time.Second, []string{"DOCKER_HOST=unix:///nonexistent"}, path, "version", "-f", "{{.Client.APIVersion}}")
			v = strings.TrimSpace(strings.SplitN(v, "\n", 2)[0])
			if apiAtLeast(v, "1.44") {
				cliPath = path
				return
			}
			tried = append(tried, fmt.Sprintf("%s (API %q)", path, v))
		}
		cliErr = fmt.Sprintf("no docker CLI speaking API >= 1.44 (Docker 25+), which Docker 29 requires; found %v", tried)
	})
	need(t, cliPath != "", cliErr)
	return cliPath
}

func apiAtLeast(v, min string) bool {
	a, b := strings.SplitN(v, ".", 2), strings.SplitN(min, ".", 2)
	if len(a) != 2 {
		return false
	}
	am, _ := strconv.Atoi(a[0])
	an, err := strconv.Atoi(a[1])
	if err != nil {
		return false
	}
	bm, _ := strconv.Atoi(b[0])
	bn, _ := strconv.Atoi(b[1])
	return am > bm || am == bm && an >= bn
}

var (
	dockerdOnce sync.Once
	dockerd     *engine
	dockerdErr  error
)

// docker29 starts Docker Engine 29 (once for the run; stopped at the end).
func docker29(t *testing.T) *engine {
	t.Helper()
	need(t, os.Geteuid() == 0, "needs root: run `sudo make test-runtimes`")
	bin := runtimesBin(t)
	cli := dockerCLI(t)
	dockerdOnce.Do(func() { dockerd, dockerdErr = startDockerd(bin, cli) })
	if dockerdErr != nil {
		t.Fatal(dockerdErr)
	}
	return dockerd
}

// startDockerd runs bin/dockerd on its own socket, data root, exec root and
// pid file under one short temp dir (unix socket paths are limited to 108
// bytes, and containerd's live under the exec root). Loopback-only tests
// need no firewall rules and no default bridge; compose's project networks
// still get a bridge each.
func startDockerd(bin, cli string) (*engine, error) {
	dir, err := os.MkdirTemp("", "nsrd-")
	if err != nil {
		return nil, err
	}
	e := &engine{dir: dir, sock: filepath.Join(dir, "docker.sock")}
	cleanDir := func() { removeTree(dir) }
	// runc 1.1 (Debian 12) has no time namespaces, which Docker 29 asks for.
	cfg := `{"features": {"time-namespaces": false}}`
	if err := os.WriteFile(filepath.Join(dir, "daemon.json"), []byte(cfg), 0o644); err != nil {
		cleanDir()
		return nil, err
	}
	// The CLI's config dir, with compose v5 as the `docker compose` plugin.
	plugins := filepath.Join(dir, "config", "cli-plugins")
	if err := os.MkdirAll(plugins, 0o755); err != nil {
		cleanDir()
		return nil, err
	}
	if err := os.Symlink(filepath.Join(bin, "docker-compose"), filepath.Join(plugins, "docker-compose")); err != nil {
		cleanDir()
		return nil, err
	}
	// The CLI found first, so `make image` and compose run that one too.
	path := filepath.Dir(cli) + ":" + bin + ":" + os.Getenv("PATH")
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		cleanDir()
		return nil, err
	}
	cmd := exec.Command(filepath.Join(bin, "dockerd"),
		"--config-file", filepath.Join(dir, "daemon.json"),
		"-H", e.host(),
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
	)
	cmd.Env = append(os.Environ(), "PATH="+path)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startTied(cmd); err != nil {
		logf.Close()
		cleanDir()
		return nil, fmt.Errorf("start dockerd: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	e.env = append(os.Environ(), "DOCKER_HOST="+e.host(), "DOCKER_CONFIG="+filepath.Join(dir, "config"), "PATH="+path)
	stop := func() {
		bridges := e.bridges()
		stopPid(cmd.Process, done, 30*time.Second)
		// dockerd stops the containerd it started; if it was killed, that
		// containerd is still ours to stop, by the pid it recorded.
		if b, err := os.ReadFile(filepath.Join(dir, "exec", "containerd", "containerd.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 && isChildOf(pid, cmd.Process.Pid) {
				_ = syscall.Kill(pid, syscall.SIGTERM)
			}
		}
		for _, br := range bridges {
			if l, err := netlink.LinkByName(br); err == nil {
				_ = netlink.LinkDel(l)
			}
		}
		logf.Close()
		cleanDir()
	}
	c, err := docker.New(e.host())
	if err != nil {
		stop()
		return nil, err
	}
	e.client = c
	if err := waitAPI(c, "dockerd", done, logf.Name(), 90*time.Second); err != nil {
		stop()
		return nil, err
	}
	v, err := sh(30*time.Second, e.env, cli, "version", "-f", "{{.Server.Version}} (API {{.Server.APIVersion}}); client {{.Client.Version}}")
	if err != nil {
		stop()
		return nil, fmt.Errorf("docker version: %v: %s", err, v)
	}
	e.name = "Docker Engine " + strings.Fields(v)[0]
	fmt.Fprintf(os.Stderr, "started dockerd %s, pid %d, %s\n", v, cmd.Process.Pid, e.host())
	atExit(stop)
	return e, nil
}

// waitAPI waits until the engine answers on c. An engine that exits first
// (done closed) or does not answer within the bound fails, with the last
// lines of its log.
func waitAPI(c *docker.Client, what string, done <-chan struct{}, logPath string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.Negotiate(ctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s exited: %s", what, lastLines(string(b), 8))
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s did not answer within %s (%v): %s", what, within, err, lastLines(string(b), 8))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// bridges are the Linux bridges of the engine's networks (br-<id>), which
// dockerd leaves behind when it stops without `compose down`.
func (e *engine) bridges() []string {
	out, err := sh(20*time.Second, e.env, cliPath, "network", "ls", "-q", "--no-trunc", "--filter", "driver=bridge")
	if err != nil {
		return nil
	}
	var brs []string
	for _, id := range strings.Fields(out) {
		if len(id) >= 12 {
			brs = append(brs, "br-"+id[:12])
		}
	}
	return brs
}

// startTied starts cmd so that it gets SIGTERM if the test binary dies
// before stopping it (a -timeout panic skips every cleanup): Pdeathsig fires
// when the forking thread ends, so the fork happens on a thread locked to a
// goroutine that never returns (threads that entered a netns, which the
// tests discard, are never this one).
func startTied(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGTERM
	errc := make(chan error)
	go func() {
		runtime.LockOSThread()
		errc <- cmd.Start()
		select {}
	}()
	return <-errc
}

// stopPid ends a process we started, by its pid: SIGTERM, then SIGKILL
// after timeout.
func stopPid(p *os.Process, done <-chan struct{}, timeout time.Duration) {
	select {
	case <-done:
		return
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(timeout):
		_ = p.Kill()
		<-done
	}
}

// isChildOf says whether pid's parent was ppid (or is gone: reparented to
// init, as a daemon's child is once the daemon died).
func isChildOf(pid, ppid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return false
	}
	parent, _ := strconv.Atoi(f[1])
	return parent == ppid || parent == 1
}

// removeTree unmounts whatever is mounted under dir (engines leave
// overlay, shm and netns mounts when they are killed), deepest first, then
// removes dir.
func removeTree(dir string) {
	var mounts []string
	if f, err := os.Open("/proc/self/mountinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
				mounts = append(mounts, fields[4])
			}
		}
		f.Close()
	}
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	for _, m := range mounts {
		_ = unix.Unmount(m, unix.MNT_DETACH)
	}
	if err := os.RemoveAll(dir); err != nil {
		// Files the user namespace of a rootless engine owns need no more
		// than root; a busy mount is what remains.
		fmt.Fprintf(os.Stderr, "remove %s: %v\n", dir, err)
	}
}

func lastLines(s string, n int) string { return testenv.LastLines(s, n) }

// inspect asks the engine directly (faster than the CLI, which matters when
// timing a restart).
func (e *engine) inspect(t *testing.T, id string) docker.Inspected {
	t.Helper()
	return enginetest.Inspect(t, e.client, id)
}

func (e *engine) pidOf(t *testing.T, id string) int {
	t.Helper()
	return enginetest.PidOf(t, e.client, id)
}

// byName finds a container by name or ID, for restartLatency.
func (e *engine) byName(name string) func() (docker.Inspected, bool) {
	return enginetest.ByName(e.client, name)
}

// images are the two images built for a test run.
type images struct{ nsredirect, backend string }

var (
	makeImageOnce sync.Once
	madeImages    images
	makeImageErr  error
	imageSize     string
)

// makeImage runs `make image` against e, as docs/docker.md says, under tags
// unique to the run, and removes the images at the end. It returns the
// tags, and the size line make printed.
func (e *engine) makeImage(t *testing.T) (images, string) {
	t.Helper()
	repo := repoDir(t)
	makeImageOnce.Do(func() {
		run := fmt.Sprintf("nsrt%d", os.Getpid())
		img := images{nsredirect: run + "-nsredirect:test", backend: run + "-demo-backend:test"}
		out, err := sh(5*time.Minute, e.env, "make", "-C", repo, "--no-print-directory", "image", "IMAGE="+img.nsredirect, "DEMO_IMAGE="+img.backend)
		atExit(func() { _, _ = sh(time.Minute, e.env, cliPath, "rmi", "-f", img.nsredirect, img.backend) })
		if err != nil {
			makeImageErr = fmt.Errorf("make image against %s: %v\n%s", e.name, err, out)
			return
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, img.nsredirect+":") {
				imageSize = strings.TrimSpace(strings.TrimPrefix(l, img.nsredirect+":"))
			}
		}
		madeImages = img
	})
	if makeImageErr != nil {
		t.Fatal(makeImageErr)
	}
	return madeImages, imageSize
}

// repoDir is the repository's root.
func repoDir(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(p, "docker-compose.yml")); err != nil {
		t.Fatal(err)
	}
	return p
}
