package docker_test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginetest"
)

// dockerCLI runs the docker CLI.
func dockerCLI(t *testing.T, args ...string) string {
	t.Helper()
	return testenv.MustSh(t, 2*time.Minute, nil, testenv.Tool(t, "docker"), args...)
}

type images struct{ nsredirect, backend string }

// hostRun is what a test of the host daemon starts from: the images, a
// private pin dir, and a name and a label unique to the run (other
// containers on the host are not ours).
func hostRun(t *testing.T) (img images, pin, run, label string) {
	t.Helper()
	testenv.Privileged(t)
	needDocker(t)
	img = buildImages(t)
	pin = testenv.BPFFS(t)
	run = testenv.Name("nsrt")
	return img, pin, run, run + ".redirect"
}

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
			out, err := testenv.Sh(3*time.Minute, nil, dockerBin, "build", "--target", target, "-t", tag, ctxDir)
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
	return enginetest.Inspect(t, suite.client, id)
}

func pidOf(t *testing.T, id string) int {
	t.Helper()
	return enginetest.PidOf(t, suite.client, id)
}

// runContainer starts a demo backend container, removed at cleanup.
func runContainer(t *testing.T, image, name string, labels ...string) string {
	t.Helper()
	args := []string{"run", "-d", "--name", name}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	id := dockerCLI(t, append(args, image)...)
	t.Cleanup(func() { _, _ = testenv.Sh(time.Minute, nil, "docker", "rm", "-f", "-v", name) })
	return id
}

func mustDial(t *testing.T, pid int, addr string) string {
	t.Helper()
	peer, err := testenv.DialPid(pid, addr, 2*time.Second)
	if err != nil {
		t.Fatalf("connect %s from netns of pid %d: %v", addr, pid, err)
	}
	return peer
}

// inNetns runs a foreign client (curl, node) in pid's netns through nsenter.
func inNetns(t *testing.T, pid int, name string, args ...string) string {
	t.Helper()
	return testenv.InNetns(t, pid, 20*time.Second, name, args...)
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
// 127.0.0.1:80 inside it until the redirect works. It reports the time from
// the container's start (Docker's StartedAt) to the first redirected
// connect against the 1 s target.
func restartLatency(t *testing.T, what string, action func(), find func() (docker.Inspected, bool)) time.Duration {
	t.Helper()
	return enginetest.RestartLatency(t, what, time.Second, action, find)
}

// byName finds a container by name, for restartLatency.
func byName(name string) func() (docker.Inspected, bool) {
	return enginetest.ByName(suite.client, name)
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
