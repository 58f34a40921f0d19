package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// traceEvent is one line of `nsredirect trace --json`.
type traceEvent struct {
	Netns    string `json:"netns"`
	PID      int    `json:"pid"`
	Comm     string `json:"comm"`
	UID      uint32 `json:"uid"`
	Sock     uint64 `json:"socket_cookie"`
	Proto    string `json:"protocol"`
	Family   string `json:"family"`
	Hook     string `json:"hook"`
	Dialled  string `json:"dialled"`
	Verdict  string `json:"verdict"`
	Target   string `json:"target"`
	NetnsCkv uint64 `json:"netns_cookie"`
}

// startTrace starts `nsredirect trace ARGS` and waits until its programs
// are attached.
func startTrace(t *testing.T, pin string, args ...string) *testenv.Proc {
	t.Helper()
	p := testenv.StartNsredirect(t, pin, append([]string{"trace"}, args...)...)
	p.WaitOutput(t, "Ctrl-C ends it", 20*time.Second)
	return p
}

func traceEvents(t *testing.T, out string) []traceEvent {
	t.Helper()
	var evs []traceEvent
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var e traceEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("trace --json line %q: %v", line, err)
		}
		evs = append(evs, e)
	}
	return evs
}

func findEvent(evs []traceEvent, ok func(traceEvent) bool) *traceEvent {
	for i := range evs {
		if ok(evs[i]) {
			return &evs[i]
		}
	}
	return nil
}

// Two traces at once, one filtered, see the decisions for connects made
// with curl and python in an enrolled netns: a redirect, and a loopback
// port with no rule; and the UDP rewrites of a datagram and its reply. An
// unfiltered text trace says the same in lines, and Ctrl-C ends each with
// its summary.
func TestTraceShowsDecisions(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns, other := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	udpPort := startUDPServer(t, &ns, "::", 0, "traced")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--redirect", fmt.Sprintf("53=%d/udp", udpPort))
	testenv.Daemon(t, pin, "run", "--netns", other.Path, "--redirect", "80=3210")

	all := startTrace(t, pin, "--json")
	text := startTrace(t, pin, "--netns", ns.Path)
	noRule := startTrace(t, pin, "--json", "--verdict", "no-rule", "--port", "81")
	peer := startTrace(t, pin, "--json", "--peer", "--verdict", "peer-rewritten")

	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Fatalf("curl 127.0.0.1:80 in %s: %q", ns.Path, got)
	}
	py := testenv.Tool(t, "python3")
	_, _ = client(t, ns, py, "-c", "import socket\ntry: socket.create_connection(('127.0.0.1', 81), 2)\nexcept OSError: pass")
	mustClient(t, ns, py, "-c", udpClient, "127.0.0.1", "53")
	if got := mustClient(t, ns, py, "-c", "import socket\nprint(socket.create_connection(('127.0.0.1', 80), 2).getpeername())"); got != "('127.0.0.1', 80)" {
		t.Errorf("getpeername of a redirected connect: %s", got)
	}
	// In the other netns: not in the --netns trace.
	_, _ = client(t, other, py, "-c", "import socket\ntry: socket.create_connection(('127.0.0.1', 82), 2)\nexcept OSError: pass")

	// What one trace takes: its resident memory and the kernel memory
	// charged for its maps and programs (memlock in their fdinfo).
	rss, memlock := procMemory(t, all.Cmd.Process.Pid, pinnedMapIDs(t, pin))
	t.Logf("one trace: %d KiB resident, %d KiB of kernel memory for its own maps and programs", rss>>10, memlock>>10)
	if rss+memlock > 64<<20 {
		t.Errorf("one trace takes %d MiB (resident and kernel): more than half the DaemonSet pod's 128 MiB limit", (rss+memlock)>>20)
	}

	redirected := func(e traceEvent) bool {
		return e.Verdict == "redirected" && e.Hook == "connect" && e.Proto == "tcp" && e.Dialled == "127.0.0.1:80" && e.Target == "127.0.0.1:3210"
	}
	var evs []traceEvent
	waitFor(t, "the trace to show curl's redirect", 10*time.Second, func() bool {
		evs = traceEvents(t, all.Output())
		return findEvent(evs, redirected) != nil && findEvent(evs, func(e traceEvent) bool { return e.Dialled == "127.0.0.1:82" }) != nil
	})
	e := findEvent(evs, redirected)
	if e.Netns != "netns "+ns.Path || e.Family != "ipv4" {
		t.Errorf("curl's event: %+v; want netns %q, ipv4", *e, "netns "+ns.Path)
	}
	// The pid and process name where the kernel gives them, else the uid
	// and socket cookie, said so at the start.
	if strings.Contains(all.Output(), "no pid") {
		if e.PID != 0 || e.Sock == 0 {
			t.Errorf("curl's event without task helpers: %+v; want no pid and a socket cookie", *e)
		}
	} else if e.PID == 0 || e.Comm != "curl" {
		t.Errorf("curl's event: %+v; want curl's pid and name", *e)
	}
	if findEvent(evs, func(e traceEvent) bool {
		return e.Verdict == "no-rule" && e.Dialled == "127.0.0.1:81" && e.Proto == "tcp"
	}) == nil {
		t.Errorf("no no-rule event for 127.0.0.1:81:\n%s", all.Output())
	}
	for _, want := range []func(traceEvent) bool{
		func(e traceEvent) bool {
			return e.Hook == "sendmsg" && e.Verdict == "redirected" && e.Dialled == "127.0.0.1:53" && e.Target == fmt.Sprintf("127.0.0.1:%d", udpPort)
		},
		func(e traceEvent) bool {
			return e.Hook == "connect" && e.Proto == "udp" && e.Verdict == "redirected" && e.Dialled == "127.0.0.1:53"
		},
		func(e traceEvent) bool {
			return e.Hook == "recvmsg" && e.Verdict == "source-rewritten" && e.Dialled == "127.0.0.1:53" && e.Target == fmt.Sprintf("127.0.0.1:%d", udpPort)
		},
	} {
		if findEvent(evs, want) == nil {
			t.Errorf("a UDP event is missing:\n%s", all.Output())
		}
	}

	// The filtered trace saw only its one event; the text one only ns.
	for _, p := range []*testenv.Proc{all, text, noRule, peer} {
		if err := p.Stop(syscall.SIGINT, 10*time.Second); err != nil {
			t.Errorf("trace after Ctrl-C: %v\n%s", err, p.Output())
		}
		if !strings.Contains(p.Output(), "trace ended: ") || !strings.Contains(p.Output(), " dropped") {
			t.Errorf("no summary line after Ctrl-C:\n%s", p.Output())
		}
	}
	got := traceEvents(t, noRule.Output())
	if len(got) != 1 || got[0].Dialled != "127.0.0.1:81" {
		t.Errorf("trace --verdict no-rule --port 81: %+v; want the one connect to 127.0.0.1:81", got)
	}
	if !strings.Contains(noRule.Output(), "trace ended: 1 event(s) shown") {
		t.Errorf("summary of the filtered trace:\n%s", noRule.Output())
	}
	if got := traceEvents(t, peer.Output()); findEvent(got, func(e traceEvent) bool {
		return e.Hook == "getpeername" && e.Comm != "curl" && e.Dialled == "127.0.0.1:80" && e.Target == "127.0.0.1:3210"
	}) == nil || findEvent(got, func(e traceEvent) bool { return e.Verdict != "peer-rewritten" }) != nil {
		t.Errorf("trace --peer --verdict peer-rewritten: %+v; want python's getpeername of 127.0.0.1:80, nothing else", got)
	}
	out := text.Output()
	t.Logf("trace --netns %s:\n%s", ns.Path, out)
	if !strings.Contains(out, "netns "+ns.Path) || !strings.Contains(out, "127.0.0.1:80 → redirected to 127.0.0.1:3210") ||
		!strings.Contains(out, "127.0.0.1:81 → not redirected") || strings.Contains(out, "127.0.0.1:82") {
		t.Errorf("trace --netns %s:\n%s", ns.Path, out)
	}
}

// tracePrograms are the trace programs in progs (by ID, name).
func tracePrograms(progs map[int]string) []string {
	var out []string
	for _, name := range progs {
		if strings.HasPrefix(name, "trace_") {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// A trace killed with SIGKILL leaves the programs the kernel runs exactly
// as they were before it started, with a daemon running and with its rules
// handed over and no daemon: the links are the tracer's, never pinned.
func TestTraceSIGKILLLeavesTheHotPath(t *testing.T) {
	for _, daemon := range []bool{true, false} {
		t.Run(map[bool]string{true: "daemon running", false: "no daemon"}[daemon], func(t *testing.T) {
			pin := testenv.BPFFS(t)
			ns := testenv.NewNetns(t)
			testenv.Server(t, ns, ":3210")
			d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
			if !daemon {
				if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
					t.Fatalf("stop the daemon: %v", err)
				}
			}
			before, beforeRoot := testenv.EffectiveForSelf(t), testenv.AttachedAtRoot(t)
			if names := tracePrograms(before); len(names) > 0 {
				t.Fatalf("trace programs in effect before any trace: %v", names)
			}
			var traces []*testenv.Proc
			for range 2 {
				traces = append(traces, startTrace(t, pin, "--peer"))
			}
			during := tracePrograms(testenv.EffectiveForSelf(t))
			if len(during) != 2*8 {
				t.Errorf("two traces --peer have %d programs in effect (%v); want 16", len(during), during)
			}
			if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
				t.Errorf("curl while tracing: %q", got)
			}
			if daemon {
				// The daemon heals every second; there is no event for a
				// heal that found nothing to do, so let two pass. It must
				// neither take the trace programs for foreign ones on its
				// links nor touch them.
				time.Sleep(2500 * time.Millisecond)
				if out := d.Output(); strings.Contains(out, "put ours back") || strings.Contains(out, "repair") {
					t.Errorf("the daemon repaired something while traces ran:\n%s", out)
				}
				if got := tracePrograms(testenv.EffectiveForSelf(t)); !slices.Equal(got, during) {
					t.Errorf("trace programs after two heals: %v; want %v", got, during)
				}
			}
			for _, p := range traces {
				p.Kill()
			}
			waitFor(t, "the programs in effect to be as before the traces", 5*time.Second, func() bool {
				return maps.Equal(testenv.EffectiveForSelf(t), before) && maps.Equal(testenv.AttachedAtRoot(t), beforeRoot)
			})
			if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
				t.Errorf("curl after the traces were killed: %q", got)
			}
			if files := testenv.Links(t, pin); len(files) == 0 {
				t.Errorf("the daemon's pinned links are gone")
			}
			if code, out, stderr := testenv.Run(t, nil, "check", "--netns", ns.Path, "--pin-dir", pin); code != 0 {
				t.Errorf("check after the traces were killed: exit %d\n%s%s", code, out, stderr)
			}
		})
	}
}

// Bad input gets one line naming it, exit 2, and nothing is attached.
func TestTraceBadInput(t *testing.T) {
	pin := testenv.BPFFS(t)
	for _, tc := range []struct {
		args    []string
		code    int
		mention string
	}{
		{[]string{"--port", "70000"}, 2, "70000"},
		{[]string{"--verdict", "maybe"}, 2, `"maybe"`},
		{[]string{"--buffer-kib", "3"}, 2, "--buffer-kib 3"},
		{[]string{"--pod", "web"}, 2, `"web"`},
		{[]string{"--netns", "/nonexistent/ns"}, 2, "/nonexistent/ns"},
		{[]string{"--container", "a", "--pod", "b/c"}, 2, "give one"},
		{nil, 1, "nothing is enrolled"},
	} {
		code, _, stderr := testenv.Run(t, nil, append([]string{"trace", "--pin-dir", pin}, tc.args...)...)
		if code != tc.code || !strings.Contains(stderr, tc.mention) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("trace %v: exit %d, %q; want %d and one line naming %s", tc.args, code, stderr, tc.code, tc.mention)
		}
	}
	// Without privileges, with a daemon's state to trace.
	ns := testenv.NewNetns(t)
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	for _, args := range [][]string{{"trace"}, {"explain", "--netns", ns.Path, "127.0.0.1:80"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, testenv.Tool(t, "setpriv"), append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--", bin}, append(args, "--pin-dir", pin)...)...)
		out, err := cmd.CombinedOutput()
		cancel()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "missing CAP_") || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 {
			t.Errorf("%v as nobody: %v, output %q; want exit 2 and one line naming a capability", args, err, out)
		}
	}
	if left := tracePrograms(testenv.AttachedAtRoot(t)); len(left) > 0 {
		t.Errorf("bad input left trace programs attached: %v", left)
	}
}

// A burst larger than the ring buffer drops events and says how many; no
// connect waits for the tracer.
func TestTraceBurstDrops(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	p := startTrace(t, pin, "--buffer-kib", "4")
	// Stop the tracer reading, so the ring fills whatever its pace.
	if err := p.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	const n = 500
	burst := fmt.Sprintf("import socket\nok = 0\nfor i in range(%d):\n    try: socket.create_connection(('127.0.0.1', 81), 2).close()\n    except ConnectionRefusedError: ok += 1\nprint(ok)", n)
	start := time.Now()
	if got := mustClient(t, ns, testenv.Tool(t, "python3"), "-c", burst); got != fmt.Sprint(n) {
		t.Errorf("burst: %s of %d connects refused at once", got, n)
	}
	t.Logf("%d connects in %v with a stopped tracer", n, time.Since(start))
	_ = p.Cmd.Process.Signal(syscall.SIGCONT)
	if err := p.Stop(syscall.SIGINT, 10*time.Second); err != nil {
		t.Fatalf("trace after Ctrl-C: %v", err)
	}
	var shown, filtered, dropped int
	if _, err := fmt.Sscanf(p.Output()[strings.Index(p.Output(), "trace ended: "):], "trace ended: %d event(s) shown, %d filtered out, %d dropped", &shown, &filtered, &dropped); err != nil {
		t.Fatalf("summary: %v\n%s", err, p.Output())
	}
	if dropped == 0 || shown+dropped != n {
		t.Errorf("burst of %d no-rule connects through a 4 KiB buffer: %d shown, %d dropped; want drops, and every connect counted", n, shown, dropped)
	}
}

// pinnedMapIDs are the IDs of the maps pinned in the state dir of pin: the
// daemon's, which a trace only reads.
func pinnedMapIDs(t *testing.T, pin string) map[string]bool {
	t.Helper()
	dir := filepath.Dir(loader.MapPin(pin, "nsr_rules"))
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, e := range entries {
		m := openPinnedMap(t, filepath.Join(dir, e.Name()))
		if info, err := m.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ids[fmt.Sprint(id)] = true
			}
		}
	}
	return ids
}

// procMemory is pid's resident memory and the memlock its bpf file
// descriptors (maps, programs, links) are charged, but for the maps of
// skip (by ID), in bytes.
func procMemory(t *testing.T, pid int, skip map[string]bool) (rss, memlock uint64) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			rss = kib << 10
		}
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	for _, fd := range fds {
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		var n uint64
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "memlock:"); ok {
				n, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			}
			if v, ok := strings.CutPrefix(line, "map_id:"); ok && skip[strings.TrimSpace(v)] {
				n = 0
				break
			}
		}
		memlock += n
	}
	return rss, memlock
}

// A trace attached before our program (our link re-created by heal after
// the trace started, so it now runs after the trace's) reports the same
// verdicts: from the rule that is about to apply rather than from what
// ours left on the socket.
func TestTraceBeforeOurProgram(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	p := startTrace(t, pin, "--json")
	old := detachLink(t, pin, loader.HookConnect4)
	waitFor(t, "the daemon to re-create its connect4 link", 10*time.Second, func() bool {
		return testenv.LinkOf(t, pin, loader.HookConnect4).ID != old && linkAttachedAt(t, pin, loader.HookConnect4)
	})
	// The order the kernel runs them in now: the trace's first.
	var order []string
	for _, name := range testenv.EffectiveOrder(t, ebpf.AttachCGroupInet4Connect) {
		if name == "trace_connect4" || name == "nsr_connect4" {
			order = append(order, name)
		}
	}
	if !slices.Equal(order, []string{"trace_connect4", "nsr_connect4"}) {
		t.Fatalf("connect4 programs in effect, in order: %v; want the trace's before ours", order)
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Fatalf("curl: %q", got)
	}
	_, _ = client(t, ns, testenv.Tool(t, "python3"), "-c", "import socket\ntry: socket.create_connection(('127.0.0.1', 81), 2)\nexcept OSError: pass")
	var evs []traceEvent
	waitFor(t, "the trace to show both connects", 10*time.Second, func() bool {
		evs = traceEvents(t, p.Output())
		return len(evs) >= 2
	})
	if findEvent(evs, func(e traceEvent) bool {
		return e.Comm == "curl" && e.Verdict == "redirected" && e.Dialled == "127.0.0.1:80" && e.Target == "127.0.0.1:3210"
	}) == nil || findEvent(evs, func(e traceEvent) bool { return e.Verdict == "no-rule" && e.Dialled == "127.0.0.1:81" }) == nil {
		t.Errorf("trace before our program: %+v", evs)
	}
}
