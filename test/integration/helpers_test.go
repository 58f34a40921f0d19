package integration

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// client runs a foreign client inside ns and returns its trimmed output.
func client(t *testing.T, ns testenv.Netns, name string, args ...string) (string, error) {
	t.Helper()
	// A hang bound, not a speed limit: Node alone takes several seconds to
	// start under qemu without KVM (make test-kernels).
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := ns.Command(ctx, name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func mustClient(t *testing.T, ns testenv.Netns, name string, args ...string) string {
	t.Helper()
	out, err := client(t, ns, name, args...)
	if err != nil {
		t.Fatalf("%s %s in netns %s: %v\n%s", name, strings.Join(args, " "), ns.Name, err, out)
	}
	return out
}

func curl(t *testing.T, ns testenv.Netns, url string) string {
	t.Helper()
	return mustClient(t, ns, testenv.Tool(t, "curl"), "-sS", "--max-time", "5", url)
}

func redirects(t *testing.T, pinDir, netnsName string) uint64 {
	t.Helper()
	var n uint64
	for _, r := range testenv.Status(t, pinDir) {
		if r.Netns == netnsName {
			n += r.Redirects
		}
	}
	return n
}

// metricValue returns the value of the sample whose line starts with
// prefix, failing the test when there is none.
func metricValue(t *testing.T, body, prefix string) float64 {
	t.Helper()
	v := testenv.MetricValue(body, prefix)
	if v < 0 {
		t.Fatalf("no metric %s in:\n%s", prefix, body)
	}
	return v
}

func hostPeer(ns testenv.Netns, addr string) string {
	peer, err := ns.Dial("tcp", addr)
	if err != nil {
		return "error: " + err.Error()
	}
	return peer
}

func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) time.Duration {
	t.Helper()
	return testenv.WaitFor(t, what, timeout, ok)
}

func fmtIDs(ids []int) string { return fmt.Sprint(ids) }

func testenvIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	return string(out), err
}
