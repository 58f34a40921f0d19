package docker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// sh runs a command with a deadline and returns its standard output, or on
// failure everything it printed. (Warnings on stderr, such as the CLI's about
// IPv4 forwarding, must not end up in a container ID.)
func sh(timeout time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return strings.TrimSpace(stdout.String() + stderr.String()), err
	}
	return strings.TrimSpace(stdout.String()), nil
}

func mustSh(t *testing.T, timeout time.Duration, env []string, name string, args ...string) string {
	t.Helper()
	out, err := sh(timeout, env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// dockerCLI runs the docker CLI.
func dockerCLI(t *testing.T, args ...string) string {
	t.Helper()
	return mustSh(t, 2*time.Minute, nil, testenv.Tool(t, "docker"), args...)
}

type images struct{ nsredirect, backend string }

var (
	imagesOnce sync.Once
	built      images
	buildErr   error
)

// buildImages builds the nsredirect and demo backend images from the
// repository's Dockerfile, packaging the binaries under test (FROM scratch:
// no registry needed), once per run, under tags unique to the run.
func buildImages(t *testing.T) images {
	t.Helper()
	nsr := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	demo := testenv.Binary(t, "DEMO_BACKEND_BIN", "github.com/nsredirect/nsredirect/cmd/demo-backend")
	dockerfile := repoFile(t, "Dockerfile")
	dockerBin := testenv.Tool(t, "docker")
	imagesOnce.Do(func() {
		ctxDir, err := os.MkdirTemp("", "nsr-image-")
		if err != nil {
			buildErr = err
			return
		}
		defer os.RemoveAll(ctxDir)
		for src, dst := range map[string]string{dockerfile: "Dockerfile", nsr: "bin/nsredirect", demo: "bin/demo-backend"} {
			if err := copyFile(src, filepath.Join(ctxDir, dst)); err != nil {
				buildErr = err
				return
			}
		}
		run := testenv.Name("nsrt")
		want := images{nsredirect: run + "-nsredirect:test", backend: run + "-demo-backend:test"}
		for tag, target := range map[string]string{want.nsredirect: "prebuilt", want.backend: "demo-backend-prebuilt"} {
			out, err := sh(3*time.Minute, nil, dockerBin, "build", "--target", target, "-t", tag, ctxDir)
			if err != nil {
				buildErr = fmt.Errorf("docker build --target %s: %v\n%s", target, err, out)
				return
			}
			suite.images = append(suite.images, tag)
		}
		built = want
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func copyFile(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// inspect asks the Engine directly (faster than the CLI, which matters when
// timing a restart).
func inspect(t *testing.T, id string) docker.Inspected {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	in, err := suite.client.Inspect(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func pidOf(t *testing.T, id string) int {
	t.Helper()
	in := inspect(t, id)
	if !in.State.Running || in.State.Pid <= 0 {
		t.Fatalf("container %s is not running", id)
	}
	return in.State.Pid
}

// runContainer starts a demo backend container, removed at cleanup.
func runContainer(t *testing.T, image, name string, labels ...string) string {
	t.Helper()
	args := []string{"run", "-d", "--name", name}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	id := dockerCLI(t, append(args, image)...)
	t.Cleanup(func() { _, _ = sh(time.Minute, nil, "docker", "rm", "-f", "-v", name) })
	return id
}

// dial connects to addr from inside the netns of pid and returns the peer
// address getpeername() reports there.
func dial(pid int, addr string, timeout time.Duration) (string, error) {
	target, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
	if err != nil {
		return "", err
	}
	return testenv.DialIn(target, "tcp", addr, timeout)
}

func mustDial(t *testing.T, pid int, addr string) string {
	t.Helper()
	peer, err := dial(pid, addr, 2*time.Second)
	if err != nil {
		t.Fatalf("connect %s from netns of pid %d: %v", addr, pid, err)
	}
	return peer
}

func mustRefuse(t *testing.T, pid int, addr, why string) {
	t.Helper()
	_, err := dial(pid, addr, 2*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connect %s from netns of pid %d: %v; want connection refused (%s)", addr, pid, err, why)
	}
}

// waitRedirect waits until a connect to addr from pid's netns succeeds.
func waitRedirect(t *testing.T, pid int, addr string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		_, err := dial(pid, addr, 200*time.Millisecond)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect %s from netns of pid %d still fails after %s: %v", addr, pid, within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inNetns runs a foreign client (curl, node) in pid's netns through nsenter.
func inNetns(t *testing.T, pid int, name string, args ...string) string {
	t.Helper()
	nsenter := testenv.Tool(t, "nsenter")
	bin := testenv.Tool(t, name)
	return mustSh(t, 20*time.Second, nil, nsenter, append([]string{"-t", strconv.Itoa(pid), "-n", bin}, args...)...)
}

func curl(t *testing.T, pid int, url string) string {
	t.Helper()
	return inNetns(t, pid, "curl", "-sS", "--max-time", "5", url)
}

// nodeFetch fetches url with Node's fetch, as a Convex Node action does.
func nodeFetch(t *testing.T, pid int, url string) string {
	t.Helper()
	script := fmt.Sprintf(`fetch(%q).then(r => r.text()).then(b => console.log(b.trim())).catch(e => { console.error(e.cause || e); process.exit(1) })`, url)
	return inNetns(t, pid, "node", "-e", script)
}

// restartLatency runs action (a restart or recreate) while a poller waits
// for the new container that find returns to start, then connects to
// 127.0.0.1:80 inside it until the redirect works. It reports and checks the
// time from the container's start (Docker's StartedAt) to the first
// redirected connect.
func restartLatency(t *testing.T, what string, action func(), find func() (docker.Inspected, bool)) time.Duration {
	t.Helper()
	before, _ := find()
	type result struct {
		in  docker.Inspected
		at  time.Time
		err error
	}
	res := make(chan result, 1)
	go func() {
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			in, ok := find()
			if ok && in.State.Running && in.State.Pid > 0 && (in.ID != before.ID || in.State.StartedAt != before.State.StartedAt) {
				if _, err := dial(in.State.Pid, "127.0.0.1:80", 200*time.Millisecond); err == nil {
					res <- result{in: in, at: time.Now()}
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
		res <- result{err: errors.New("no new container with a working redirect within 30s")}
	}()
	action()
	r := <-res
	if r.err != nil {
		t.Fatalf("%s: %v", what, r.err)
	}
	started, err := time.Parse(time.RFC3339Nano, r.in.State.StartedAt)
	if err != nil {
		t.Fatalf("StartedAt %q: %v", r.in.State.StartedAt, err)
	}
	latency := r.at.Sub(started)
	t.Logf("%s: redirect working %s after the new container started", what, latency.Round(time.Millisecond))
	if latency > time.Second {
		t.Errorf("%s: redirect took %s after the container started; want < 1s", what, latency)
	}
	return latency
}

// byName finds a container by name, for restartLatency.
func byName(name string) func() (docker.Inspected, bool) {
	return func() (docker.Inspected, bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		in, err := suite.client.Inspect(ctx, name)
		return in, err == nil
	}
}

// connectLoop dials addr from pid's netns until stop is closed (at most
// limit, at most 100000 times) and counts outcomes.
type loopResult struct {
	ok, failed int
	firstErr   error
}

func connectLoop(pid int, addr string, limit time.Duration, stop <-chan struct{}) <-chan loopResult {
	res := make(chan loopResult, 1)
	go func() {
		var r loopResult
		target, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
		if err == nil {
			err = target.Do(func() error {
				end := time.Now().Add(limit)
				for i := 0; i < 100000 && time.Now().Before(end); i++ {
					select {
					case <-stop:
						return nil
					default:
					}
					c, err := net.DialTimeout("tcp", addr, time.Second)
					if err != nil {
						r.failed++
						if r.firstErr == nil {
							r.firstErr = err
						}
					} else {
						r.ok++
						c.Close()
					}
					time.Sleep(2 * time.Millisecond)
				}
				return nil
			})
		}
		if err != nil && r.firstErr == nil {
			r.firstErr, r.failed = err, r.failed+1
		}
		res <- r
	}()
	return res
}

// capEff reads a process's effective capability mask.
func capEff(t *testing.T, pid int) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("CapEff:")); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(string(v)), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no CapEff line")
	return 0
}
