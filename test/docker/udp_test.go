package docker_test

import (
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestHostDaemonUDP: the label nsredirect.redirect=53=5353/udp (here under
// the run's own label key) redirects a container's UDP: a datagram to
// 127.0.0.1:53 inside the container's netns is answered by its server on
// 5353 and reported from port 53, connected or not. A bad protocol suffix
// is logged with the label quoted and counted as an enroll error, as any
// bad label; and the container that held the host's last UDP rule stopping
// takes the UDP programs off the cgroup2 root.
func TestHostDaemonUDP(t *testing.T) {
	img, pin, run, label := hostRun(t)
	dns := runContainer(t, img.backend, run+"-dns", label+"=53=5353/udp")
	runContainer(t, img.backend, run+"-badudp", label+"=53=5353/sctp")
	pid := pidOf(t, dns)
	// The container's image has no Python: the server runs from the host,
	// in the container's netns only, as a sidecar sharing it would.
	testenv.StartUDPServer(t, []string{testenv.Tool(t, "nsenter"), "-t", strconv.Itoa(pid), "-n"}, "::", 5353, "ctr")

	d := testenv.Daemon(t, pin, "docker", "--label", label, "--metrics-addr", "127.0.0.1:0", "--cgroup", testenv.RootCgroup(t))
	metrics := testenv.MetricsURL(t, d)
	testenv.WaitStatus(t, pin, run+"-dns enrolled", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, run+"-dns")
		return len(r) == 1 && r[0].Rule == "53=5353/udp"
	})
	got := inNetns(t, pid, "python3", "-c", testenv.UDPClientPy, "127.0.0.1", "53")
	for _, want := range []string{"unconnected ctr:unconnected 127.0.0.1 53", "connected ctr:connected 127.0.0.1 53", "peer 127.0.0.1 53", "mapped ctr:mapped ::ffff:127.0.0.1 53"} {
		if !strings.Contains(got, want+"\n") {
			t.Errorf("UDP in the labelled container: want %q in\n%s", want, got)
		}
	}
	ids := testenv.UDPProgIDs(t, pin)
	if got := testenv.AttachedOf(t, ids); len(got) != len(ids) {
		t.Errorf("UDP programs at the root with the container's UDP rule: %v; want all %d", got, len(ids))
	}

	d.WaitOutput(t, run+"-badudp", 10*time.Second)
	if !strings.Contains(d.Output(), `label `+label+`=\"53=5353/sctp\"`) || !strings.Contains(d.Output(), `\"sctp\"`) {
		t.Errorf("the log does not quote the bad label and name its suffix:\n%s", d.Output())
	}
	_, body := testenv.HTTPGet(t, metrics+"/metrics")
	if v := testenv.MetricValue(body, fmt.Sprintf(`nsredirect_enroll_errors_total{netns="%s-badudp"}`, run)); v < 1 {
		t.Errorf("enroll errors of %s-badudp = %v; want >= 1", run, v)
	}
	if r := testenv.RowsOf(testenv.Status(t, pin), run+"-badudp"); len(r) != 0 {
		t.Errorf("the badly labelled container was enrolled: %+v", r)
	}

	dockerCLI(t, "stop", "-t", "1", run+"-dns")
	testenv.WaitStatus(t, pin, "no rule once dns stopped", func(rows []testenv.StatusRow) bool { return len(testenv.RowsOf(rows, run+"-dns")) == 0 })
	testenv.WaitUnattached(t, ids, 5*time.Second)
	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, d.Output())
	}
}
