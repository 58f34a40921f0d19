package integration

import (
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// explain walks the decision for a destination in a target: every step
// passes and it exits 0 for a rule in effect (and, with --dial, the kernel
// is seen redirecting a real connect); it exits 1 naming the failing step
// and its fix for a port with no rule, a netns not enrolled and a link
// detached; 2 for bad input.
func TestExplain(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns, other := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	explain := func(args ...string) (int, string, string) {
		return testenv.Run(t, nil, append([]string{"explain", "--pin-dir", pin}, args...)...)
	}

	code, out, stderr := explain("--netns", ns.Path, "--dial", "127.0.0.1:80")
	if code != 0 {
		t.Errorf("explain --dial of a live rule: exit %d\n%s%s", code, out, stderr)
	}
	for _, want := range []string{"PASS  state", "PASS  netns", "PASS  rule      127.0.0.1:80/tcp → 127.0.0.1:3210 (rule 80=3210)",
		"PASS  programs  connect4 program", "PASS  owner", "PASS  version", "PASS  dial      tcp connect 127.0.0.1:80: the kernel said redirected to 127.0.0.1:3210",
		"127.0.0.1:80/tcp would be redirected to 127.0.0.1:3210"} {
		if !strings.Contains(out, want) {
			t.Errorf("explain --dial lacks %q:\n%s", want, out)
		}
	}
	t.Logf("explain --netns %s --dial 127.0.0.1:80:\n%s", ns.Path, out)
	jcode, jout, jerr := explain("--json", "--netns", ns.Path, "127.0.0.1:81")
	var js struct {
		Redirected bool `json:"redirected"`
		Steps      []struct{ Step, Result, Fix string }
	}
	if err := json.Unmarshal([]byte(jout), &js); err != nil || jcode != 1 || js.Redirected || len(js.Steps) == 0 ||
		js.Steps[len(js.Steps)-1].Step != "rule" || js.Steps[len(js.Steps)-1].Result != "fail" || js.Steps[len(js.Steps)-1].Fix == "" {
		t.Errorf("explain --json of a port with no rule: exit %d, %v\n%s%s", jcode, err, jout, jerr)
	}
	// The demo backend's cgroup is where its connects are decided.
	if !strings.Contains(out, "in effect for cgroup ") || !strings.Contains(out, "(pid ") {
		t.Errorf("explain names no cgroup of the netns's processes:\n%s", out)
	}

	for _, tc := range []struct {
		args      []string
		step, fix string
	}{
		{[]string{"--netns", ns.Path, "127.0.0.1:81"}, "FAIL  rule", "--redirect 81=PORT"},
		{[]string{"--netns", ns.Path, "127.0.0.1:80/udp"}, "FAIL  rule", "--redirect 80=PORT/udp"},
		{[]string{"--netns", other.Path, "127.0.0.1:80"}, "FAIL  netns", "nsredirect run --netns " + other.Path},
		{[]string{"--netns", ns.Path, "10.0.0.1:80"}, "FAIL  dest", "127.0.0.1"},
	} {
		code, out, stderr := explain(tc.args...)
		if code != 1 || !strings.Contains(out, tc.step) || !strings.Contains(out, "fix: ") || !strings.Contains(out, tc.fix) ||
			strings.Count(strings.TrimSpace(stderr), "\n") != 0 || !strings.Contains(stderr, "would not be redirected") {
			t.Errorf("explain %v: exit %d; want 1, %q with a fix naming %q\n%s%s", tc.args, code, tc.step, tc.fix, out, stderr)
		}
	}

	// A link detached while no daemon heals it: the programs step fails.
	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	detachLink(t, pin, loader.HookConnect4)
	code, out, _ = explain("--netns", ns.Path, "127.0.0.1:80")
	if code != 1 || !strings.Contains(out, "FAIL  programs  the connect4 link is not attached") || !strings.Contains(out, "NOTE  owner") {
		t.Errorf("explain with the connect4 link detached and no daemon: exit %d\n%s", code, out)
	}

	for _, args := range [][]string{
		{"--netns", ns.Path},
		{"--netns", ns.Path, "127.0.0.1"},
		{"--netns", ns.Path, "127.0.0.1:80/sctp"},
		{"127.0.0.1:80"},
		{"--pod", "nons", "127.0.0.1:80"},
	} {
		code, _, stderr := explain(args...)
		if code != 2 || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("explain %v: exit %d, %q; want 2 and one line", args, code, stderr)
		}
	}
}
