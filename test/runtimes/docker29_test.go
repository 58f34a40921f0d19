//go:build runtimes

package runtimes_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginetest"
)

// compose drives one project with one compose command (`docker compose`
// or a `docker-compose` binary) against an engine.
type compose struct {
	t    *testing.T
	e    *engine
	cmd  []string
	env  []string
	name string
}

func newCompose(t *testing.T, e *engine, cmd []string, files []string, env ...string) *compose {
	t.Helper()
	name := testenv.Name("nsrt")
	full := slicesClone(cmd)
	for _, f := range files {
		full = append(full, "-f", f)
	}
	full = append(full, "-p", name)
	c := &compose{t: t, e: e, cmd: full, env: append(slicesClone(e.env), env...), name: name}
	t.Cleanup(func() {
		if out, err := sh(3*time.Minute, c.env, c.cmd[0], append(c.cmd[1:], "down", "-t", "5", "-v", "--remove-orphans")...); err != nil {
			t.Errorf("compose down: %v\n%s", err, out)
		}
	})
	return c
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

func (c *compose) run(args ...string) string {
	c.t.Helper()
	return mustSh(c.t, 3*time.Minute, c.env, c.cmd[0], append(c.cmd[1:], args...)...)
}

// find asks the engine by compose's labels rather than `compose ps`, which
// would blur the timings.
func (c *compose) find(service string) (string, error) {
	return enginetest.ComposeService(c.e.client, c.name, service)
}

func (c *compose) id(service string) string {
	c.t.Helper()
	id, err := c.find(service)
	if err != nil {
		c.t.Fatal(err)
	}
	return id
}

func (c *compose) service(name string) func() (docker.Inspected, bool) {
	return enginetest.ComposeFinder(c.e.client, c.name, name)
}

// composeCommands are the two ways compose v5 is typed: the `docker
// compose` plugin (in the engine's DOCKER_CONFIG) and `docker-compose`.
func composeCommands(t *testing.T, e *engine) map[string][]string {
	return map[string][]string{
		"docker compose": {dockerCLI(t), "compose"},
		"docker-compose": {filepath.Join(runtimesBin(t), "docker-compose")},
	}
}

// TestDocker29Compose is the compose path of docs/docker.md on Docker Engine 29:
// `make image`, `docker compose up -d` of the shipped docker-compose.yml,
// 127.0.0.1:80 and [::1]:80 inside the backend reach :3210 (curl and Node
// fetch), restart and force-recreate of the backend followed within 1 s,
// nsredirect recreated under a connect loop with nothing refused, and
// `down` leaving nothing attached or pinned. Once with the `docker compose`
// plugin, once with `docker-compose` (both v5).
func TestDocker29Compose(t *testing.T) {
	e := docker29(t)
	img, size := e.makeImage(t)
	for _, how := range []string{"docker compose", "docker-compose"} {
		t.Run(strings.ReplaceAll(how, " ", "_"), func(t *testing.T) {
			c := newCell(t, e.name+" + compose v5 (`"+how+"`)", "shipped docker-compose.yml")
			if how == "docker compose" {
				c.measure("`make image`: %s", size)
			}
			composeCell(t, c, e, composeCommands(t, e)[how], img)
		})
	}
}

func composeCell(t *testing.T, c *cell, e *engine, cmd []string, img images) {
	pin := testenv.BPFFS(t)
	cp := newCompose(t, e, cmd, []string{filepath.Join(repoDir(t), "docker-compose.yml")},
		"NSREDIRECT_IMAGE="+img.nsredirect,
		"DEMO_BACKEND_IMAGE="+img.backend,
		"NSREDIRECT_HOST_BPFFS="+filepath.Dir(pin),
		"NSREDIRECT_HOST_DOCKER_SOCK="+e.sock,
		// No NSREDIRECT_HOST_CGROUP2: on this hybrid host the default
		// /sys/fs/cgroup is a v1 root, and nsredirect attaches at its
		// unified/ part itself, as a user's would.
	)
	cp.run("up", "-d")
	nsr := cp.id("nsredirect")
	if h := e.docker(t, "inspect", "-f", "{{.State.Health.Status}}", nsr); h != "healthy" {
		t.Fatalf("nsredirect is %q after compose up; backend should only start once it is healthy", h)
	}
	backend := cp.id("backend")
	pid := e.pidOf(t, backend)
	waitRedirect(t, pid, "127.0.0.1:80", followCap)
	clients(t, pid, "backend")
	if out := inNetns(t, pid, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:3210/action"); !strings.Contains(out, "-> 200 hello from demo-backend") {
		t.Errorf("backend /action: %q", out)
	}
	progs := testenv.ProgIDs(t, pin)
	testenv.AssertAttached(t, progs)

	d := restartLatency(t, "compose restart backend", func() { cp.run("restart", "-t", "2", "backend") }, cp.service("backend"))
	c.measure("restart followed in %s%s", ms(d), e.eventLag(cp.service("backend")))
	d = restartLatency(t, "compose up -d --force-recreate backend", func() { cp.run("up", "-d", "--force-recreate", "backend") }, cp.service("backend"))
	c.measure("force-recreate followed in %s%s", ms(d), e.eventLag(cp.service("backend")))
	if nb := cp.id("backend"); nb == backend {
		t.Errorf("--force-recreate kept container %s", nb)
	}
	pid = e.pidOf(t, cp.id("backend"))
	clients(t, pid, "recreated backend")

	// Recreate nsredirect itself under a connect loop: nothing refused.
	oldDaemon := e.pidOf(t, cp.id("nsredirect"))
	stop := make(chan struct{})
	loop4 := connectLoop(pid, "127.0.0.1:80", 90*time.Second, stop)
	loop6 := connectLoop(pid, "[::1]:80", 90*time.Second, stop)
	time.Sleep(300 * time.Millisecond) // some connects before the recreate
	cp.run("up", "-d", "--force-recreate", "--no-deps", "nsredirect")
	newDaemon := e.pidOf(t, cp.id("nsredirect"))
	if newDaemon == oldDaemon {
		t.Fatalf("nsredirect was not recreated (pid %d)", newDaemon)
	}
	backendName := e.inspect(t, cp.id("backend")).Name
	testenv.WaitStatus(t, pin, "the backend adopted by the new nsredirect", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, backendName)
		return len(r) == 1 && r[0].Alive && r[0].OwnerPID == newDaemon
	})
	time.Sleep(300 * time.Millisecond) // and some after
	close(stop)
	r4, r6 := <-loop4, <-loop6
	c.measure("nsredirect recreated under load: %d/%d connects refused", r4.failed+r6.failed, r4.ok+r4.failed+r6.ok+r6.failed)
	for _, r := range []loopResult{r4, r6} {
		if r.failed != 0 || r.ok < 50 {
			t.Errorf("recreating nsredirect: %d ok, %d failed (first: %v); want zero failures", r.ok, r.failed, r.firstErr)
		}
	}
	progs = append(progs, testenv.ProgIDs(t, pin)...) // link.Update swapped the programs in place

	cp.run("down", "-t", "5")
	testenv.AssertGone(t, pin, progs)
	c.measure("`down`: nothing attached or pinned")
}

// systemdUnit reads the shipped unit's ExecStart and Environment lines,
// so the host daemon runs with exactly the unit's command line.
func systemdUnit(t *testing.T) (args, env []string) {
	t.Helper()
	f, err := os.Open(filepath.Join(repoDir(t), "deploy", "systemd", "nsredirect.service"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			args = strings.Fields(v)
		}
		if v, ok := strings.CutPrefix(line, "Environment="); ok {
			env = append(env, strings.Fields(v)...)
		}
	}
	if len(args) < 2 || args[0] != "/usr/local/bin/nsredirect" {
		t.Fatalf("unit ExecStart = %q; want /usr/local/bin/nsredirect ...", args)
	}
	return args[1:], env
}

// hostDaemon starts `nsredirect` with the systemd unit's arguments and
// environment, pointed at engine sock through the overrides the unit
// documents (what /etc/default/nsredirect would hold).
func hostDaemon(t *testing.T, pin, sock, label string) *testenv.Proc {
	t.Helper()
	args, env := systemdUnit(t)
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	cmd := exec.Command(bin, args...)
	cmd.Env = append(env,
		"PATH="+os.Getenv("PATH"),
		"NSREDIRECT_DOCKER_HOST=unix://"+sock,
		"NSREDIRECT_LABEL="+label,
		"NSREDIRECT_PIN_DIR="+pin,
		"NSREDIRECT_CGROUP="+testenv.RootCgroup(t),
	)
	p := testenv.Start(t, cmd)
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	return p
}

// TestDocker29HostDaemon is the host daemon of docs/docker.md on Docker Engine 29:
// `nsredirect docker` with the systemd unit's command line follows
// labelled `docker run` containers: v4 and v6 loopback reach :3210,
// restart and recreate are followed within 1 s, SIGTERM with a container
// running hands over, the next daemon adopts, and once the last labelled
// container stops, SIGTERM leaves nothing.
func TestDocker29HostDaemon(t *testing.T) {
	e := docker29(t)
	c := newCell(t, e.name+" (`docker run`)", "host daemon (systemd unit's command line)")
	img, _ := e.makeImage(t)
	pin := testenv.BPFFS(t)
	run := testenv.Name("nsrt")
	label := run + ".redirect" // a label of this run only
	runCtr := func(name string, labels ...string) {
		args := []string{"run", "-d", "--name", name}
		for _, l := range labels {
			args = append(args, "--label", l)
		}
		e.docker(t, append(args, img.backend)...)
	}
	t.Cleanup(func() {
		_, _ = sh(time.Minute, e.env, cliPath, "rm", "-f", "-v", run+"-a", run+"-plain")
	})
	runCtr(run+"-a", label+"=80=3210")
	runCtr(run + "-plain")

	d := hostDaemon(t, pin, e.sock, label)
	progs := testenv.ProgIDs(t, pin)
	pa := e.pidOf(t, run+"-a")
	waitRedirect(t, pa, "127.0.0.1:80", followCap)
	clients(t, pa, "labelled container")
	mustRefuse(t, e.pidOf(t, run+"-plain"), "127.0.0.1:80", "an unlabelled container gets no rule")

	l := restartLatency(t, "docker restart", func() { e.docker(t, "restart", "-t", "1", run+"-a") }, e.byName(run+"-a"))
	c.measure("`docker restart` followed in %s%s", ms(l), e.eventLag(e.byName(run+"-a")))
	l = restartLatency(t, "docker rm -f && docker run", func() {
		e.docker(t, "rm", "-f", run+"-a")
		runCtr(run+"-a", label+"=80=3210")
	}, e.byName(run+"-a"))
	c.measure("recreate followed in %s%s", ms(l), e.eventLag(e.byName(run+"-a")))
	pa = e.pidOf(t, run+"-a")
	clients(t, pa, "recreated container")

	// SIGTERM with the container running: handed over, the redirect kept;
	// the next daemon adopts it. A connect loop across both refuses nothing
	// (a `systemctl restart`).
	stop := make(chan struct{})
	loop := connectLoop(pa, "127.0.0.1:80", 90*time.Second, stop)
	time.Sleep(200 * time.Millisecond) // some connects before the stop
	if err := d.Stop(syscall.SIGTERM, 15*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d.Output())
	}
	if !strings.Contains(d.Output(), `"handover":true`) {
		t.Errorf("daemon did not hand over with a container running:\n%s", d.Output())
	}
	if _, err := dial(pa, "127.0.0.1:80", 2*time.Second); err != nil {
		t.Errorf("redirect lost across the handover: %v", err)
	}
	d2 := hostDaemon(t, pin, e.sock, label)
	testenv.WaitStatus(t, pin, "the container adopted by the next daemon", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, run+"-a")
		return len(r) == 1 && r[0].Alive && r[0].OwnerPID == d2.Cmd.Process.Pid
	})
	time.Sleep(200 * time.Millisecond) // and some after
	close(stop)
	res := <-loop
	c.measure("daemon restarted under a connect loop: %d/%d refused", res.failed, res.ok+res.failed)
	if res.failed != 0 || res.ok < 20 {
		t.Errorf("across the daemon's restart: %d ok, %d failed (first: %v); want zero failures", res.ok, res.failed, res.firstErr)
	}
	e.docker(t, "stop", "-t", "1", run+"-a")
	testenv.WaitStatus(t, pin, "no rule once the container stopped", func(rows []testenv.StatusRow) bool { return len(rows) == 0 })
	if err := d2.Stop(syscall.SIGTERM, 15*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d2.Output())
	}
	testenv.AssertGone(t, pin, progs)
	c.measure("handover on SIGTERM, adopted, nothing left after the last container")
}
