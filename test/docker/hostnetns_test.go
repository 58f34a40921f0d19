package docker_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestChainedHostNetnsRefused: a labelled container joined to the netns of
// an unlabelled `--network host` container (`--network container:X`) is in
// the host's netns without saying host anywhere in its own config: the
// daemon refuses it by netns identity, names it and the host network
// namespace, counts it and enrolls nothing.
func TestChainedHostNetnsRefused(t *testing.T) {
	img, pin, run, label := hostRun(t)

	d := testenv.Daemon(t, pin, "docker", "--label", label, "--metrics-addr", "127.0.0.1:0", "--cgroup", testenv.RootCgroup(t))
	metrics := testenv.MetricsURL(t, d)
	dockerCLI(t, "run", "-d", "--name", run+"-host", "--network", "host", img.backend, "--listen", "127.0.0.1:0")
	t.Cleanup(func() { _, _ = testenv.Sh(time.Minute, nil, "docker", "rm", "-f", run+"-host") })
	dockerCLI(t, "run", "-d", "--name", run+"-chain", "--network", "container:"+run+"-host", "--label", label+"=80=3210", img.backend, "--listen", "127.0.0.1:0")
	t.Cleanup(func() { _, _ = testenv.Sh(time.Minute, nil, "docker", "rm", "-f", run+"-chain") })

	d.WaitOutput(t, "container "+run+"-chain: its network namespace is the host network namespace", 5*time.Second)
	if rows := testenv.Status(t, pin); len(rows) != 0 {
		t.Errorf("status %+v; want nothing enrolled", rows)
	}
	_, body := testenv.HTTPGet(t, metrics+"/metrics")
	if v := testenv.MetricValue(body, fmt.Sprintf(`nsredirect_enroll_errors_total{netns="%s-chain"}`, run)); v < 1 {
		t.Errorf("enroll errors of %s-chain = %v; want >= 1", run, v)
	}
	if strings.Contains(d.Output(), "redirect live") {
		t.Errorf("something was enrolled:\n%s", d.Output())
	}
}
