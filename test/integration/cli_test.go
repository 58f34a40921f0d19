package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestBadInputRefused: every kind of bad input exits 2 with one line that
// names the bad value, and leaves nothing attached or pinned.
func TestBadInputRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	notBPF := filepath.Join(t.TempDir(), "nsredirect")
	before := testenv.AttachedAtRoot(t)
	env := func(kv ...string) []string { return append([]string{"PATH=" + os.Getenv("PATH")}, kv...) }

	for _, tc := range []struct {
		name    string
		env     []string
		args    []string
		mention string
	}{
		{"no command", nil, nil, "Usage"},
		{"unknown command", nil, []string{"frobnicate"}, `"frobnicate"`},
		{"unknown flag", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--frob"}, "-frob"},
		{"stray argument", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "extra"}, `"extra"`},
		{"missing netns", nil, []string{"run", "--redirect", "80=3210"}, "--netns is required"},
		{"missing redirect", nil, []string{"run", "--netns", ns.Path}, "--redirect is required"},
		{"bad spec", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=99999"}, `"99999"`},
		{"non-loopback spec", nil, []string{"run", "--netns", ns.Path, "--redirect", "10.0.0.1:80=3210"}, "10.0.0.1"},
		{"duplicate spec", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--redirect", "127.0.0.1:80=3211"}, "already redirected"},
		{"bad spec from env", env("NSREDIRECT_NETNS="+ns.Path, "NSREDIRECT_REDIRECT=80=3210,http=1"), []string{"run"}, `"http"`},
		{"netns does not exist", nil, []string{"run", "--netns", "/run/netns/nsr-does-not-exist", "--redirect", "80=3210"}, "/run/netns/nsr-does-not-exist"},
		{"not a netns", nil, []string{"run", "--netns", "/etc/hostname", "--redirect", "80=3210"}, "not a network namespace"},
		{"relative netns", nil, []string{"run", "--netns", "run/netns/x", "--redirect", "80=3210"}, `"run/netns/x"`},
		{"pid not a number", nil, []string{"run", "--netns", "pid:abc", "--redirect", "80=3210"}, `"pid:abc"`},
		{"pid does not exist", nil, []string{"run", "--netns", "pid:2147483646", "--redirect", "80=3210"}, "pid:2147483646"},
		{"cgroup not cgroup2", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--cgroup", "/tmp"}, `"/tmp"`},
		{"cgroup missing", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--cgroup", "/nonexistent/cg"}, "/nonexistent/cg"},
		{"pin dir not on bpffs", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", notBPF}, notBPF},
		{"pin dir relative", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", "bpf/x"}, `"bpf/x"`},
		{"bad log format", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--log-format", "xml"}, `"xml"`},
		{"bad log level", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--log-level", "loud"}, `"loud"`},
		{"bad metrics addr", nil, []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--metrics-addr", "localhost"}, `"localhost"`},
		{"bad log format from env", env("NSREDIRECT_LOG_FORMAT=yaml"), []string{"run", "--netns", ns.Path, "--redirect", "80=3210"}, `"yaml"`},
		{"check without netns", nil, []string{"check"}, "--netns is required"},
		{"check bad dial", nil, []string{"check", "--netns", ns.Path, "--dial", "127.0.0.1"}, `"127.0.0.1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if len(args) > 0 && args[0] == "run" && !contains(args, "--pin-dir") {
				args = append(args, "--pin-dir", pin)
			}
			e := tc.env
			if e == nil {
				e = env()
			}
			code, stdout, stderr := testenv.Run(t, e, args...)
			if code != 2 {
				t.Errorf("exit %d, want 2\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			if !strings.Contains(stderr, tc.mention) {
				t.Errorf("stderr %q does not mention %q", stderr, tc.mention)
			}
			if tc.args != nil && strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
				t.Errorf("error is not one line:\n%s", stderr)
			}
			if strings.Contains(stderr, "goroutine") || strings.Contains(stderr, "panic") {
				t.Errorf("stack trace printed:\n%s", stderr)
			}
		})
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("bad input left the pin dir %s behind", pin)
	}
	if _, err := os.Stat(notBPF); !os.IsNotExist(err) {
		t.Errorf("bad input created %s", notBPF)
	}
	for id, name := range testenv.AttachedAtRoot(t) {
		if _, was := before[id]; !was && strings.HasPrefix(name, "nsr_") {
			// Another suite may attach its own nsr_ programs concurrently;
			// ours never got a pin dir, so anything new must not be pinned here.
			t.Logf("note: program %d (%s) attached meanwhile (another suite?)", id, name)
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestMissingPrivilegesRefused drops to an unprivileged user: the daemon must
// name the missing capability, exit 2 and leave nothing.
func TestMissingPrivilegesRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	setpriv := testenv.Tool(t, "setpriv")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	// Keep CAP_BPF and CAP_NET_ADMIN: CAP_SYS_ADMIN is missing. (Without
	// CAP_BPF alone it runs: CAP_SYS_ADMIN stands in, as in the kernel;
	// TestLeastPrivilege covers each capability.)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, "--inh-caps=-all", "--bounding-set=-all,+bpf,+net_admin", "--",
		bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", pin)
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "missing CAP_SYS_ADMIN") {
		t.Errorf("without CAP_SYS_ADMIN: %v, output %q; want exit 2 naming CAP_SYS_ADMIN", err, out)
	}
	cmd = exec.CommandContext(ctx, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--",
		bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", pin)
	out, err = cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "missing CAP_") {
		t.Errorf("as nobody: %v, output %q; want exit 2 naming a capability", err, out)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("refused daemon left %s", pin)
	}
}

func TestMetrics(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--redirect", "8080=3210",
		"--metrics-addr", "127.0.0.1:0", "--log-format", "json")
	url := testenv.MetricsURL(t, d)
	if !strings.Contains(d.Output(), `"msg":"redirect live"`) || !strings.Contains(d.Output(), `"cookie":`) {
		t.Errorf("json log lacks fields:\n%s", d.Output())
	}

	const n = 25
	for i := 0; i < n; i++ {
		if _, err := ns.Dial("tcp", "127.0.0.1:80"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ns.Dial("tcp", "[::1]:8080"); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Dial("tcp", "127.0.0.1:3210"); err != nil { // direct: not counted
		t.Fatal(err)
	}
	code, body := testenv.HTTPGet(t, url+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	label := `netns="` + ns.Path + `"`
	if got := metricValue(t, body, `nsredirect_redirects_total{`+label+`,rule="80=3210"}`); got != n {
		t.Errorf("redirects for 80=3210 = %v, want %d", got, n)
	}
	if got := metricValue(t, body, `nsredirect_redirects_total{`+label+`,rule="8080=3210"}`); got != 1 {
		t.Errorf("redirects for 8080=3210 = %v, want 1", got)
	}
	if got := metricValue(t, body, "nsredirect_rules "); got != 2 {
		t.Errorf("nsredirect_rules = %v, want 2", got)
	}
	metricValue(t, body, "nsredirect_build_info{")
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, b := testenv.HTTPGet(t, url+p); code != 200 {
			t.Errorf("%s: %d %s", p, code, b)
		}
	}
}

func TestCheckStatusCleanup(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns, other := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")

	if code, _, stderr := testenv.Run(t, nil, "check", "--netns", ns.Path, "--pin-dir", pin); code != 1 {
		t.Errorf("check before any daemon: exit %d (%s), want 1", code, stderr)
	}
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	if code, out, stderr := testenv.Run(t, nil, "check", "--netns", ns.Path, "--dial", "127.0.0.1:80", "--pin-dir", pin); code != 0 {
		t.Errorf("check --dial on a live rule: exit %d\n%s%s", code, out, stderr)
	}
	if code, _, stderr := testenv.Run(t, nil, "check", "--netns", other.Path, "--pin-dir", pin); code != 1 || !strings.Contains(stderr, "no rule") {
		t.Errorf("check of an unenrolled netns: exit %d, %q; want 1", code, stderr)
	}
	if code, _, stderr := testenv.Run(t, nil, "check", "--netns", ns.Path, "--dial", "127.0.0.1:81", "--pin-dir", pin); code != 1 || !strings.Contains(stderr, "127.0.0.1:81") {
		t.Errorf("check --dial to a closed port: exit %d, %q; want 1", code, stderr)
	}
	_, text, _ := testenv.Run(t, nil, "status", "--pin-dir", pin)
	if !strings.Contains(text, ns.Path) || !strings.Contains(text, "80=3210") || !strings.Contains(text, "alive") {
		t.Errorf("status:\n%s", text)
	}

	ids := testenv.ProgIDs(t, pin)
	d.Kill()
	rows := testenv.Status(t, pin)
	if len(rows) != 1 || rows[0].Alive || rows[0].OwnerPID != d.Cmd.Process.Pid {
		t.Errorf("status after kill -9: %+v; want owner pid %d dead", rows, d.Cmd.Process.Pid)
	}
	// The pinned link keeps redirecting for a crashed daemon.
	if code, _, stderr := testenv.Run(t, nil, "check", "--netns", ns.Path, "--dial", "127.0.0.1:80", "--pin-dir", pin); code != 0 {
		t.Errorf("check after kill -9: exit %d %s; the rule must still be live", code, stderr)
	}
	code, out, stderr := testenv.Run(t, nil, "cleanup", "--pin-dir", pin)
	if code != 0 || !strings.Contains(out, "removed netns "+ns.Path) {
		t.Errorf("cleanup: exit %d\n%s%s", code, out, stderr)
	}
	testenv.AssertGone(t, pin, ids)
	if code, out, _ := testenv.Run(t, nil, "cleanup", "--pin-dir", pin); code != 0 || !strings.Contains(out, "nothing to clean") {
		t.Errorf("second cleanup: %d %s", code, out)
	}
}

func TestCleanupKeepsLiveOwnersUnlessAll(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	ids := testenv.ProgIDs(t, pin)
	if code, out, _ := testenv.Run(t, nil, "cleanup", "--pin-dir", pin); code != 0 || !strings.Contains(out, "0 enrollment(s) removed") {
		t.Errorf("cleanup with a live owner: %d %s", code, out)
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("cleanup broke a live daemon's rule: %q", got)
	}
	if code, out, _ := testenv.Run(t, nil, "cleanup", "--all", "--pin-dir", pin); code != 0 || !strings.Contains(out, "1 enrollment(s) removed") {
		t.Errorf("cleanup --all: %d %s", code, out)
	}
	testenv.AssertGone(t, pin, ids)
	// The daemon notices its state is gone and exits 1 for its supervisor,
	// instead of running on with nothing attached.
	code, err := d.Wait(5 * time.Second)
	if err != nil || code != 1 || !strings.Contains(d.Output(), "cleanup --all") {
		t.Errorf("daemon after cleanup --all: exit %d (%v); want exit 1 saying why\n%s", code, err, d.Output())
	}
	testenv.AssertGone(t, pin, ids)
}

// TestStatusShowsMapFill: after N netns are enrolled with specs of their
// own, `status` (text) and `status --json` show the fill of each map
// (entries and capacity) as the kernel maps hold them: rule entries as each
// spec expands, one counter per spec, one record per netns.
func TestStatusShowsMapFill(t *testing.T) {
	pin := testenv.BPFFS(t)
	l := attachLoader(t, pin)
	const n = 5
	specs := "80=3210,127.0.0.2:8080=3211,53=5353/udp"
	rules := mustRules(t, specs)
	perNetns := 0
	for _, r := range rules {
		perNetns += len(r.Entries)
	}
	for i := 0; i < n; i++ {
		ns := testenv.NewNetns(t)
		if err := l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: ns.Path, Owner: "test", Rules: rules}); err != nil {
			t.Fatal(err)
		}
	}
	capOf := func(name string) int { return int(openPinnedMap(t, loader.MapPin(pin, name)).MaxEntries()) }
	want := map[string][2]int{
		"rules":       {n * perNetns, capOf("nsr_rules")},
		"counters":    {n * len(rules), capOf("nsr_counters")},
		"enrollments": {n, capOf("nsr_records")},
		"peers":       {0, capOf("nsr_peers")},
	}
	// The kernel's own count, as a witness of what status should say.
	var inKernel int
	it := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrRules)).Iterate()
	var k, v []byte
	for it.Next(&k, &v) {
		inKernel++
	}
	if inKernel != want["rules"][0] {
		t.Fatalf("the rule map holds %d entries; the test expects %d", inKernel, want["rules"][0])
	}

	code, out, stderr := testenv.Run(t, nil, "status", "--json", "--pin-dir", pin)
	if code != 0 {
		t.Fatalf("status --json: exit %d: %s", code, stderr)
	}
	var st struct {
		Maps []struct {
			Map      string `json:"map"`
			Entries  int    `json:"entries"`
			Capacity int    `json:"capacity"`
		} `json:"maps"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	got := map[string][2]int{}
	for _, m := range st.Maps {
		got[m.Map] = [2]int{m.Entries, m.Capacity}
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("status --json: map %s = %v entries/capacity; want %v", name, got[name], w)
		}
	}

	code, out, stderr = testenv.Run(t, nil, "status", "--pin-dir", pin)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, stderr)
	}
	for name, w := range want {
		line := fmt.Sprintf("%s %d %d %.1f%%", name, w[0], w[1], 100*float64(w[0])/float64(w[1]))
		found := false
		for _, l := range strings.Split(out, "\n") {
			if strings.Join(strings.Fields(l), " ") == line {
				found = true
			}
		}
		if !found {
			t.Errorf("status shows no line %q:\n%s", line, out)
		}
	}
	t.Logf("fill after %d netns x %d specs: %v", n, len(rules), got)
}
