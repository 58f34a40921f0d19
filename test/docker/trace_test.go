package docker_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// trace and explain name a container as a person does: --container NAME,
// events labelled "container NAME (ID)", explain's fix in Docker's terms.
func TestTraceAndExplainContainer(t *testing.T) {
	img, pin, run, label := hostRun(t)
	name := run + "-web"
	id := runContainer(t, img.backend, name, label+"=80=3210")
	testenv.Daemon(t, pin, "docker", "--label", label, "--cgroup", testenv.RootCgroup(t))
	pid := pidOf(t, id)
	testenv.WaitConnect(t, pid, "127.0.0.1:80", 5*time.Second)

	tr := testenv.StartNsredirect(t, pin, "trace", "--container", name, "--json")
	tr.WaitOutput(t, "Ctrl-C ends it", 20*time.Second)
	if out := curl(t, pid, "http://127.0.0.1/"); !strings.Contains(out, "hello from demo-backend") {
		t.Fatalf("curl 127.0.0.1:80 in %s: %q", name, out)
	}
	want := "container " + name + " (" + id[:12] + ")"
	var got struct {
		Netns, Comm, Verdict, Dialled, Target string
	}
	testenv.WaitFor(t, "the trace to show curl's redirect", 10*time.Second, func() bool {
		for _, line := range strings.Split(tr.Output(), "\n") {
			if strings.HasPrefix(line, "{") && json.Unmarshal([]byte(line), &got) == nil && got.Comm == "curl" {
				return true
			}
		}
		return false
	})
	if got.Netns != want || got.Verdict != "redirected" || got.Dialled != "127.0.0.1:80" || !strings.HasSuffix(got.Target, ":3210") {
		t.Errorf("trace --container %s: %+v; want netns %q, redirected from 127.0.0.1:80 to :3210", name, got, want)
	}

	code, out, stderr := testenv.Run(t, nil, "explain", "--pin-dir", pin, "--container", name, "--dial", "127.0.0.1:80")
	if code != 0 || !strings.Contains(out, "PASS  programs") || !strings.Contains(out, "PASS  dial") || !strings.Contains(out, "enrolled by docker as "+name) {
		t.Errorf("explain --container %s --dial 127.0.0.1:80: exit %d\n%s%s", name, code, out, stderr)
	}
	t.Logf("explain --container %s --dial 127.0.0.1:80:\n%s", name, out)
	code, out, _ = testenv.Run(t, nil, "explain", "--pin-dir", pin, "--container", name, "127.0.0.1:81")
	if code != 1 || !strings.Contains(out, "FAIL  rule") || !strings.Contains(out, "label the container nsredirect.redirect=81=PORT") {
		t.Errorf("explain --container %s 127.0.0.1:81: exit %d\n%s", name, code, out)
	}
}
