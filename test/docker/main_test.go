// Package docker_test proves `nsredirect docker` against a real Docker
// Engine: the compose sidecar, the host daemon, restarts and recreates of
// both, and that `compose down` leaves nothing of ours in the kernel.
//
// It starts dockerd when none answers (and stops it afterwards, only then),
// builds its images offline from the repository's Dockerfile (FROM scratch
// targets) under tags unique to the run, and removes them at the end. Under
// CI=true anything missing fails the tests instead of skipping them.
package docker_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// suite is what TestMain set up for every test.
var suite struct {
	// unavailable says why Docker cannot be used here; empty when it can.
	unavailable string
	client      *docker.Client
	// images built by this run, removed at the end.
	images []string
}

func TestMain(m *testing.M) {
	stop := setUp()
	code := m.Run()
	for _, img := range suite.images {
		if out, err := exec.Command("docker", "rmi", "-f", img).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "remove image %s: %v\n%s", img, err, out)
		}
	}
	stop()
	os.Exit(code)
}

// setUp finds or starts dockerd and returns what undoes it.
func setUp() (stop func()) {
	stop = func() {}
	if os.Geteuid() != 0 {
		suite.unavailable = "needs root: run `sudo make test`"
		return
	}
	c, err := docker.New(docker.DefaultHost)
	if err != nil {
		suite.unavailable = err.Error()
		return
	}
	suite.client = c
	if negotiate(c) == nil {
		return // someone else's dockerd: use it, leave it running
	}
	dockerd, err := exec.LookPath("dockerd")
	if err != nil {
		suite.unavailable = "dockerd is not installed (`make deps` installs docker.io) and no Docker Engine answers at " + docker.DefaultHost
		return
	}
	logf, err := os.CreateTemp("", "nsr-dockerd-*.log")
	if err != nil {
		suite.unavailable = err.Error()
		return
	}
	// No firewall rules, no ip_forward, no masquerading: the tests need no
	// traffic to leave a container, and the host is shared with other suites.
	_, bridgeErr := net.InterfaceByName("docker0")
	cmd := exec.Command(dockerd, "--iptables=false", "--ip-forward=false")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		suite.unavailable = fmt.Sprintf("start dockerd: %v", err)
		return
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stop = func() {
		// Only the dockerd this run started, by its pid.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		logf.Close()
		_ = os.Remove(logf.Name())
		if bridgeErr != nil { // the default bridge is ours: dockerd leaves it behind
			if l, err := netlink.LinkByName("docker0"); err == nil {
				_ = netlink.LinkDel(l)
			}
		}
	}
	// Another suite may be starting one at the same moment, and ours then
	// exits (its pid file is taken): whichever answers will do.
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := negotiate(c)
		if err == nil {
			select {
			case <-done:
				fmt.Fprintln(os.Stderr, "using a dockerd another process started")
			default:
				fmt.Fprintf(os.Stderr, "started dockerd (pid %d) for this suite; log %s\n", cmd.Process.Pid, logf.Name())
			}
			return stop
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			suite.unavailable = fmt.Sprintf("no Docker Engine answered within 60s (%v); dockerd log: %s", err, testenv.LastLines(string(b), 5))
			return stop
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func negotiate(c *docker.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Negotiate(ctx)
}

// needDocker skips, or under CI=true fails, when Docker cannot be used.
func needDocker(t *testing.T) {
	t.Helper()
	if suite.unavailable == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("Docker suite cannot run: %s", suite.unavailable)
	}
	t.Skip(suite.unavailable)
}

// repoFile is a path in the repository, from this package's directory.
func repoFile(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}
