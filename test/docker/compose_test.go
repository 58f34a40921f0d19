package docker_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginetest"
)

// composeProject drives the repository's docker-compose.yml under a project
// name unique to the test, with the `docker compose` plugin when present,
// else docker-compose (1.29 on Debian 12).
type composeProject struct {
	t    *testing.T
	cmd  []string
	env  []string
	name string
}

func newCompose(t *testing.T, env ...string) *composeProject {
	t.Helper()
	var cmd []string
	if out, err := exec.Command("docker", "compose", "version").CombinedOutput(); err == nil && strings.Contains(string(out), "version") {
		cmd = []string{"docker", "compose"}
	} else {
		cmd = []string{testenv.Tool(t, "docker-compose")}
	}
	name := testenv.Name("nsrt")
	cmd = append(cmd, "-f", repoFile(t, "docker-compose.yml"), "-p", name)
	c := &composeProject{t: t, cmd: cmd, env: append(os.Environ(), env...), name: name}
	t.Logf("compose: %s", strings.Join(cmd, " "))
	return c
}

func (c *composeProject) run(args ...string) string {
	c.t.Helper()
	return testenv.MustSh(c.t, 3*time.Minute, c.env, c.cmd[0], append(c.cmd[1:], args...)...)
}

// id returns the ID of the running container of a service.
func (c *composeProject) id(service string) string {
	c.t.Helper()
	id, err := c.find(service)
	if err != nil {
		c.t.Fatal(err)
	}
	return id
}

// find asks the Engine by compose's labels rather than `compose ps`, which
// would blur the timings.
func (c *composeProject) find(service string) (string, error) {
	return enginetest.ComposeService(suite.client, c.name, service)
}

// service finds a service's running container, for restartLatency.
func (c *composeProject) service(name string) func() (docker.Inspected, bool) {
	return enginetest.ComposeFinder(suite.client, c.name, name)
}

// TestCompose is the compose sidecar end to end: the backend's Node-style
// calls to 127.0.0.1:80 reach it, it survives restart and recreate of the
// backend (timed) and of nsredirect itself (under load, zero failures), other
// containers are untouched, a bad label disturbs nothing, and `compose down`
// leaves nothing attached or pinned.
func TestCompose(t *testing.T) {
	testenv.Privileged(t)
	needDocker(t)
	img := buildImages(t)
	for _, ref := range []string{img.nsredirect, img.backend} {
		// What a user loads: the `docker save` archive, as `make image`
		// measures it (`.Size` differs between image stores).
		out, err := exec.Command(testenv.Tool(t, "docker"), "save", ref).Output()
		if size := len(out); err != nil || size >= 25_000_000 {
			t.Errorf("image %s: docker save is %d bytes (%v); want < 25 MB", ref, size, err)
		}
	}
	pin := testenv.BPFFS(t) // <private bpffs>/nsredirect, as the container sees /sys/fs/bpf/nsredirect
	cp := newCompose(t,
		"NSREDIRECT_IMAGE="+img.nsredirect,
		"DEMO_BACKEND_IMAGE="+img.backend,
		"NSREDIRECT_HOST_BPFFS="+filepath.Dir(pin),
		"NSREDIRECT_METRICS_ADDR=127.0.0.1:9590",
	)
	// Runs before the bpffs is unmounted (cleanups run last first).
	t.Cleanup(func() {
		if out, err := testenv.Sh(2*time.Minute, cp.env, cp.cmd[0], append(cp.cmd[1:], "down", "-t", "5", "-v", "--remove-orphans")...); err != nil {
			t.Errorf("compose down: %v\n%s", err, out)
		}
	})

	cp.run("up", "-d")
	nsr := cp.id("nsredirect")
	if h := inspectHealth(t, nsr); h != "healthy" {
		t.Fatalf("nsredirect is %q after compose up; backend should only start once it is healthy", h)
	}
	// With no NSREDIRECT_HOST_CGROUP2 the host's /sys/fs/cgroup is bound
	// in; on a hybrid host nsredirect must attach at its unified/ and say so.
	if testenv.RootCgroup(t) != "/sys/fs/cgroup" {
		// The daemon logs to stderr, which `docker logs` replays on its own.
		logs, err := exec.Command(testenv.Tool(t, "docker"), "logs", nsr).CombinedOutput()
		if err != nil || !strings.Contains(string(logs), "/host/cgroup2/unified") {
			t.Errorf("hybrid host: nsredirect did not log attaching at /host/cgroup2/unified (%v):\n%s", err, logs)
		}
	}
	daemonPID := pidOf(t, nsr)
	// Least privilege: uid 0 with SYS_ADMIN, NET_ADMIN, SYS_PTRACE and nothing else.
	want := uint64(1)<<unix.CAP_SYS_ADMIN | 1<<unix.CAP_NET_ADMIN | 1<<unix.CAP_SYS_PTRACE
	if got := capEff(t, daemonPID); got != want {
		t.Errorf("nsredirect container runs with CapEff %#x; want %#x (SYS_ADMIN|NET_ADMIN|SYS_PTRACE)", got, want)
	}

	backend := cp.id("backend")
	pid := pidOf(t, backend)
	testenv.WaitConnect(t, pid, "127.0.0.1:80", 5*time.Second)
	if out := curl(t, pid, "http://127.0.0.1:80/"); !strings.Contains(out, "hello from demo-backend") {
		t.Errorf("curl 127.0.0.1:80 in backend: %q", out)
	}
	// (Docker disables IPv6 in containers unless the network enables it, so
	// there is no ::1 to dial here; v4 and dual-stack sockets are covered.)
	if out := nodeFetch(t, pid, "http://127.0.0.1/"); !strings.Contains(out, "hello from demo-backend") {
		t.Errorf("node fetch http://127.0.0.1/ in backend: %q", out)
	}
	// The Convex story: the backend's own action calls http://127.0.0.1.
	if out := curl(t, pid, "http://127.0.0.1:3210/action"); !strings.Contains(out, "-> 200 hello from demo-backend") {
		t.Errorf("backend /action: %q", out)
	}
	if peer := mustDial(t, pid, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("getpeername in backend = %s; want 127.0.0.1:80", peer)
	}
	progs := testenv.ProgIDs(t, pin)
	testenv.AssertAttached(t, progs)

	// Another container on the host, unlabelled: untouched.
	plain := runContainer(t, img.backend, cp.name+"-plain")
	plainPID := pidOf(t, plain)
	testenv.WaitConnect(t, plainPID, "127.0.0.1:3210", 5*time.Second)
	testenv.AssertRefused(t, plainPID, "127.0.0.1:80", "an unlabelled container gets no rule")

	// A container with a bad label: an error for it alone.
	bad := runContainer(t, img.backend, cp.name+"-bad", "nsredirect.redirect=80=99999")
	badPID := pidOf(t, bad)
	waitLogs(t, nsr, cp.name+"-bad", "99999")
	testenv.AssertRefused(t, badPID, "127.0.0.1:80", "a bad label enrolls nothing")
	metrics := curl(t, daemonPID, "http://127.0.0.1:9590/metrics")
	if v := testenv.MetricValue(metrics, fmt.Sprintf(`nsredirect_enroll_errors_total{netns="%s-bad"}`, cp.name)); v < 1 {
		t.Errorf("enroll errors of the bad-label container = %v; want >= 1 in:\n%s", v, metrics)
	}
	if in := inspect(t, nsr); !in.State.Running || in.State.Pid != daemonPID {
		t.Fatalf("nsredirect did not survive the bad label: running=%v pid %d (was %d)", in.State.Running, in.State.Pid, daemonPID)
	}
	mustDial(t, pid, "127.0.0.1:80")

	// Backend restarts and is recreated: redirect working again within 1 s.
	restartLatency(t, "compose restart backend", func() { cp.run("restart", "-t", "2", "backend") }, cp.service("backend"))
	restartLatency(t, "compose up -d --force-recreate backend", func() { cp.run("up", "-d", "--force-recreate", "backend") }, cp.service("backend"))
	if nb := cp.id("backend"); nb == backend {
		t.Errorf("--force-recreate kept container %s", nb)
	}
	backend = cp.id("backend")
	pid = pidOf(t, backend)
	if out := nodeFetch(t, pid, "http://127.0.0.1/"); !strings.Contains(out, "hello from demo-backend") {
		t.Errorf("node fetch after recreate: %q", out)
	}
	testenv.AssertRefused(t, plainPID, "127.0.0.1:80", "still untouched")
	backendName := strings.TrimPrefix(inspect(t, backend).Name, "/")
	testenv.WaitStatus(t, pin, "the backend owned by a live daemon", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, backendName)
		return len(r) == 1 && r[0].Alive && r[0].Mode == "docker"
	})

	// Upgrade nsredirect itself under a connect loop: zero failures.
	nsr = cp.id("nsredirect")
	oldDaemon := pidOf(t, nsr)
	stop := make(chan struct{})
	loop := testenv.PacedConnects(pid, "127.0.0.1:80", 90*time.Second, time.Second, stop)
	time.Sleep(300 * time.Millisecond)
	cp.run("up", "-d", "--force-recreate", "--no-deps", "nsredirect")
	nsr = cp.id("nsredirect")
	newDaemon := pidOf(t, nsr)
	if newDaemon == oldDaemon {
		t.Fatalf("nsredirect was not recreated (pid %d)", newDaemon)
	}
	testenv.WaitStatus(t, pin, "the backend adopted by the new nsredirect", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, backendName)
		return len(r) == 1 && r[0].Alive && r[0].OwnerPID == newDaemon
	})
	time.Sleep(300 * time.Millisecond)
	close(stop)
	res := <-loop
	t.Logf("connects across the nsredirect recreate: %d ok, %d failed", res.OK, res.Failed)
	if res.Failed != 0 || res.OK < 50 {
		t.Errorf("recreating nsredirect: %d ok, %d failed (first: %v); want zero failures", res.OK, res.Failed, res.FirstErr)
	}
	if got := testenv.ProgIDs(t, pin); len(got) != len(testenv.Hooks) {
		t.Errorf("after the upgrade: links %v", got)
	} else {
		progs = append(progs, got...) // link.Update swapped the programs in place
	}

	// compose down: backend stops first, then nsredirect finds nothing to
	// hand over and removes everything.
	cp.run("down", "-t", "5")
	testenv.AssertGone(t, pin, progs)
	testenv.AssertRefused(t, plainPID, "127.0.0.1:80", "after down")
}

func inspectHealth(t *testing.T, id string) string {
	t.Helper()
	return dockerCLI(t, "inspect", "-f", "{{.State.Health.Status}}", id)
}

// waitLogs waits until the container's log holds every one of words on one line.
func waitLogs(t *testing.T, id string, words ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The daemon logs to stderr, which `docker logs` replays on its own.
		b, _ := exec.Command("docker", "logs", id).CombinedOutput()
		out := string(b)
		for _, line := range strings.Split(out, "\n") {
			all := true
			for _, w := range words {
				all = all && strings.Contains(line, w)
			}
			if all {
				t.Logf("log of %.12s: %s", id, line)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("log of %.12s never mentioned %v:\n%s", id, words, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
