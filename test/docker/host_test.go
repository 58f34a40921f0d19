package docker_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestHostDaemon runs `nsredirect docker` as a host process (the systemd
// unit's way) with two labelled containers of different specs, an
// unlabelled one and a badly labelled one; restarts and recreates are
// followed within 1 s, SIGTERM hands running containers' rules over, a
// successor adopts them and drops those of containers that went meanwhile,
// and the last one out leaves nothing.
func TestHostDaemon(t *testing.T) {
	img, pin, run, label := hostRun(t)

	a := runContainer(t, img.backend, run+"-a", label+"=80=3210")
	b := runContainer(t, img.backend, run+"-b", label+"=8080=3210, 127.0.0.2:81=127.0.0.1:3210")
	plain := runContainer(t, img.backend, run+"-plain")
	bad := runContainer(t, img.backend, run+"-bad", label+"=80=3210,80=3211")

	args := []string{"docker", "--label", label, "--metrics-addr", "127.0.0.1:0", "--cgroup", testenv.RootCgroup(t)}
	d := testenv.Daemon(t, pin, args...)
	metrics := testenv.MetricsURL(t, d)
	progs := testenv.ProgIDs(t, pin)

	pa, pb := pidOf(t, a), pidOf(t, b)
	testenv.WaitConnect(t, pa, "127.0.0.1:80", 5*time.Second)
	testenv.WaitConnect(t, pb, "127.0.0.1:8080", 5*time.Second)
	if out := curl(t, pa, "http://127.0.0.1/"); !strings.Contains(out, "hello from demo-backend") {
		t.Errorf("curl 127.0.0.1:80 in a: %q", out)
	}
	if out := nodeFetch(t, pb, "http://127.0.0.1:8080/"); !strings.Contains(out, "hello from demo-backend") {
		t.Errorf("node fetch 127.0.0.1:8080 in b: %q", out)
	}
	if peer := mustDial(t, pb, "127.0.0.2:81"); peer != "127.0.0.2:81" {
		t.Errorf("b: 127.0.0.2:81 peer %s; want the address dialled", peer)
	}
	// Each container has its own specs only.
	testenv.AssertRefused(t, pa, "127.0.0.1:8080", "8080 is b's rule, not a's")
	testenv.AssertRefused(t, pb, "127.0.0.1:80", "80 is a's rule, not b's")
	testenv.AssertRefused(t, pidOf(t, plain), "127.0.0.1:80", "unlabelled")
	testenv.AssertRefused(t, pidOf(t, bad), "127.0.0.1:80", "its label does not parse")
	d.WaitOutput(t, run+"-bad", 5*time.Second)
	_, body := testenv.HTTPGet(t, metrics+"/metrics")
	if v := testenv.MetricValue(body, fmt.Sprintf(`nsredirect_enroll_errors_total{netns="%s-bad"}`, run)); v < 1 {
		t.Errorf("enroll errors of %s-bad = %v; want >= 1", run, v)
	}
	if v := testenv.MetricValue(body, fmt.Sprintf(`nsredirect_redirects_total{netns="%s-a",rule="80=3210"}`, run)); v < 2 {
		t.Errorf("redirects counted for a = %v; want >= 2", v)
	}
	// A labelled container in the host's netns: refused, the host untouched.
	dockerCLI(t, "run", "-d", "--name", run+"-hostnet", "--network", "host", "--label", label+"=80=3210", img.backend, "--listen", "127.0.0.1:0")
	t.Cleanup(func() { _, _ = testenv.Sh(time.Minute, nil, "docker", "rm", "-f", run+"-hostnet") })
	d.WaitOutput(t, "container "+run+"-hostnet uses the host network namespace", 5*time.Second)
	if r := testenv.RowsOf(testenv.Status(t, pin), run+"-hostnet"); len(r) != 0 {
		t.Errorf("host-network container enrolled: %+v", r)
	}
	if !strings.Contains(d.Output(), `label `+label+`=\"80=3210,80=3211\"`) {
		t.Errorf("the log does not quote the bad label:\n%s", d.Output())
	}

	// Restart and recreate are followed within 1 s.
	restartLatency(t, "docker restart a", func() { dockerCLI(t, "restart", "-t", "1", run+"-a") }, byName(run+"-a"))
	restartLatency(t, "docker rm -f b && docker run b (recreate)", func() {
		dockerCLI(t, "rm", "-f", run+"-b")
		dockerCLI(t, "run", "-d", "--name", run+"-b", "--label", label+"=80=3210", img.backend)
	}, byName(run+"-b"))
	pa, pb = pidOf(t, run+"-a"), pidOf(t, run+"-b")
	// The recreated b came with other specs: only those apply.
	mustDial(t, pb, "127.0.0.1:80")
	testenv.AssertRefused(t, pb, "127.0.0.1:8080", "the recreated b's label has only 80=3210")
	if d.Exited() {
		t.Fatalf("daemon exited:\n%s", d.Output())
	}

	// SIGTERM while a and b run: their rules are handed over and keep working.
	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d.Output())
	}
	if !strings.Contains(d.Output(), "handover=true") {
		t.Errorf("daemon did not hand over with containers running:\n%s", d.Output())
	}
	rows := testenv.Status(t, pin)
	for _, n := range []string{run + "-a", run + "-b"} {
		if r := testenv.RowsOf(rows, n); len(r) != 1 || r[0].Alive {
			t.Errorf("status of %s after handover: %+v; want one rule, owner gone", n, r)
		}
	}
	mustDial(t, pa, "127.0.0.1:80")
	testenv.AssertAttached(t, progs)

	// While no daemon runs, b goes and a is recreated under the same name
	// (a new netns): the successor serves the new a and drops both b's
	// record and the old a's.
	dockerCLI(t, "rm", "-f", run+"-b")
	dockerCLI(t, "rm", "-f", run+"-a")
	dockerCLI(t, "run", "-d", "--name", run+"-a", "--label", label+"=80=3210", img.backend)
	d2 := testenv.Daemon(t, pin, args...)
	pa = pidOf(t, run+"-a")
	rows = testenv.Status(t, pin)
	if r := testenv.RowsOf(rows, run+"-a"); len(r) != 1 || !r[0].Alive || r[0].OwnerPID != d2.Cmd.Process.Pid {
		t.Errorf("a after restart: %+v; want one rule, for the recreated a, owned by pid %d", r, d2.Cmd.Process.Pid)
	}
	if r := testenv.RowsOf(rows, run+"-b"); len(r) != 0 {
		t.Errorf("b's rules outlived b: %+v", r)
	}
	mustDial(t, pa, "127.0.0.1:80")

	// The last labelled container stops: its rules go at once, and SIGTERM
	// then leaves nothing attached or pinned.
	dockerCLI(t, "stop", "-t", "1", run+"-a")
	testenv.WaitStatus(t, pin, "no rule once a stopped", func(rows []testenv.StatusRow) bool { return len(testenv.RowsOf(rows, run+"-a")) == 0 })
	// No namespace file is held open: a stopped container's netns can die.
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d2.Cmd.Process.Pid))
	for _, fd := range fds {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", d2.Cmd.Process.Pid, fd.Name())); strings.HasPrefix(l, "net:") {
			t.Errorf("daemon holds fd %s -> %s", fd.Name(), l)
		}
	}
	if err := d2.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d2.Output())
	}
	if !strings.Contains(d2.Output(), "handover=false") {
		t.Errorf("daemon handed over with nothing running:\n%s", d2.Output())
	}
	testenv.AssertGone(t, pin, progs)
}

// TestDockerBadInput: bad flags and an unreachable Engine are refused with
// exit 2 and one line naming the value and the fix, before anything is
// attached.
func TestDockerBadInput(t *testing.T) {
	testenv.Privileged(t)
	pin := testenv.BPFFS(t)
	missing := "unix://" + t.TempDir() + "/docker.sock"
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"tcp host", []string{"--docker-host", "tcp://127.0.0.1:2375"}, `bad docker host "tcp://127.0.0.1:2375": use unix:///PATH`},
		{"no socket", []string{"--docker-host", missing}, "is dockerd running? point --docker-host"},
		{"bad label key", []string{"--label", "a=b"}, `--label "a=b"`},
		{"bad cgroup", []string{"--cgroup", "/tmp"}, "/tmp"},
	} {
		code, _, stderr := testenv.Run(t, nil, append(append([]string{"docker"}, tc.args...), "--pin-dir", pin)...)
		if code != 2 || !strings.Contains(stderr, tc.want) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%s: exit %d, stderr %q; want exit 2 and one line containing %q", tc.name, code, stderr, tc.want)
		}
	}
	code, _, stderr := testenv.Run(t, []string{"NSREDIRECT_DOCKER_HOST=udp://x"}, "docker", "--pin-dir", pin)
	if code != 2 || !strings.Contains(stderr, `"udp://x"`) {
		t.Errorf("NSREDIRECT_DOCKER_HOST=udp://x: exit %d, %q; want exit 2 naming it", code, stderr)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("refused runs left %s behind", pin)
	}
}

// TestDockerReconnect cuts the daemon off from Docker (through a socket
// proxy standing in for a restarting dockerd), changes containers
// meanwhile, and checks that on reconnection the daemon relists and misses
// nothing.
func TestDockerReconnect(t *testing.T) {
	img, pin, run, label := hostRun(t)
	proxy := newSocketProxy(t, suite.client.Socket())
	proxy.start(t)

	a := runContainer(t, img.backend, run+"-a", label+"=80=3210")
	d := testenv.Daemon(t, pin, "docker", "--docker-host", "unix://"+proxy.path, "--label", label, "--cgroup", testenv.RootCgroup(t))
	progs := testenv.ProgIDs(t, pin)
	testenv.WaitConnect(t, pidOf(t, a), "127.0.0.1:80", 5*time.Second)

	proxy.stop()
	d.WaitOutput(t, "lost the Docker event stream", 5*time.Second)
	dockerCLI(t, "stop", "-t", "1", run+"-a")
	c := runContainer(t, img.backend, run+"-c", label+"=80=3210")
	time.Sleep(500 * time.Millisecond) // a few failed reconnects
	if r := testenv.RowsOf(testenv.Status(t, pin), run+"-c"); len(r) != 0 {
		t.Fatalf("c enrolled while Docker was unreachable? %+v", r)
	}
	proxy.start(t)
	testenv.WaitConnect(t, pidOf(t, c), "127.0.0.1:80", 10*time.Second)
	testenv.WaitStatus(t, pin, "a's rules gone after the relisting", func(rows []testenv.StatusRow) bool { return len(testenv.RowsOf(rows, run+"-a")) == 0 })

	dockerCLI(t, "stop", "-t", "1", run+"-c")
	testenv.WaitStatus(t, pin, "no rules once c stopped", func(rows []testenv.StatusRow) bool { return len(rows) == 0 })
	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d.Output())
	}
	testenv.AssertGone(t, pin, progs)
}

// socketProxy forwards a unix socket to Docker's. stop closes the listener
// and every connection, as a dockerd going away does; start listens again.
type socketProxy struct {
	path, target string
	mu           sync.Mutex
	ln           net.Listener
	conns        map[net.Conn]bool
}

func newSocketProxy(t *testing.T, target string) *socketProxy {
	p := &socketProxy{path: filepath.Join(t.TempDir(), "docker.sock"), target: target, conns: map[net.Conn]bool{}}
	t.Cleanup(p.stop)
	return p
}

func (p *socketProxy) start(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("unix", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns[c], p.conns[up] = true, true
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
}

func (p *socketProxy) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close() // removes the socket file
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}
