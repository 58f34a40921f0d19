// Package enginetest is what the tests against a container engine that
// speaks the Docker API (Docker Engine, Podman) share: asking the engine
// about containers and compose services, and timing how soon the redirect
// follows a restart. It is apart from testenv because it imports
// internal/docker, whose own tests use testenv.
package enginetest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// Inspect asks the engine directly (faster than the CLI, which matters when
// timing a restart).
func Inspect(t testing.TB, c *docker.Client, id string) docker.Inspected {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	in, err := c.Inspect(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// PidOf is the pid of a running container, failing the test if it is not
// running.
func PidOf(t testing.TB, c *docker.Client, id string) int {
	t.Helper()
	in := Inspect(t, c, id)
	if !in.State.Running || in.State.Pid <= 0 {
		t.Fatalf("container %s is not running", id)
	}
	return in.State.Pid
}

// ByName finds a container by name or ID, for RestartLatency.
func ByName(c *docker.Client, name string) func() (docker.Inspected, bool) {
	return func() (docker.Inspected, bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		in, err := c.Inspect(ctx, name)
		return in, err == nil
	}
}

// ComposeService is the ID of the one running container of a compose
// project's service. It asks the engine by compose's labels rather than
// running `compose ps` (over half a second for docker-compose 1.29), which
// would blur the timings.
func ComposeService(c *docker.Client, project, service string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := c.Running(ctx, "com.docker.compose.project="+project)
	if err != nil {
		return "", err
	}
	var ids []string
	for _, ct := range list {
		if ct.Labels["com.docker.compose.service"] == service {
			ids = append(ids, ct.ID)
		}
	}
	if len(ids) != 1 {
		return "", fmt.Errorf("running containers of service %s: %v; want one", service, ids)
	}
	return ids[0], nil
}

// ComposeFinder finds a compose service's running container, for
// RestartLatency.
func ComposeFinder(c *docker.Client, project, service string) func() (docker.Inspected, bool) {
	return func() (docker.Inspected, bool) {
		id, err := ComposeService(c, project, service)
		if err != nil {
			return docker.Inspected{}, false
		}
		return ByName(c, id)()
	}
}

// RestartLatency runs action (a restart or recreate) while a poller waits
// for the new container that find returns to start, then connects to
// 127.0.0.1:80 inside it until the redirect works. It returns the time from
// the container's start (the engine's StartedAt) to the first redirected
// connect, and logs it against target (the 1 s). The target is a
// measurement, reported in the results tables, not an assertion: a loaded
// machine stretches it. Only a hang fails the test (no working redirect
// within 30 s past the target).
func RestartLatency(t testing.TB, what string, target time.Duration, action func(), find func() (docker.Inspected, bool)) time.Duration {
	t.Helper()
	before, _ := find()
	type result struct {
		in  docker.Inspected
		at  time.Time
		err error
	}
	res := make(chan result, 1)
	go func() {
		// 30 s caps a hang, longer by what target adds to the 1 s.
		wait := 30*time.Second + max(0, target-time.Second)
		deadline := time.Now().Add(wait)
		for time.Now().Before(deadline) {
			in, ok := find()
			if ok && in.State.Running && in.State.Pid > 0 && (in.ID != before.ID || in.State.StartedAt != before.State.StartedAt) {
				if _, err := testenv.DialPid(in.State.Pid, "127.0.0.1:80", 200*time.Millisecond); err == nil {
					res <- result{in: in, at: time.Now()}
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
		res <- result{err: fmt.Errorf("no new container with a working redirect within %s", wait)}
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
	verdict := "within"
	if latency > target {
		verdict = "over"
	}
	t.Logf("%s: redirect working %s after the container started (%s the %s target)", what, latency.Round(time.Millisecond), verdict, target)
	return latency
}
