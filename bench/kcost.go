package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// The in-kernel cost of nsredirect's connect programs, which run on every
// TCP connect of the host, enrolled netns or not: run_time_ns / run_cnt from
// the kernel's BPF statistics, beside an empty program (the floor:
// invocation plus the statistics themselves) attached at the same root in
// the same run, so each connect runs both.
//
// Every connect goes to a port nothing listens on, so it is refused at once
// and leaves no TIME_WAIT behind however many are made; the programs run
// the same either way. Non-loopback destinations are addresses of a dummy
// interface (a veth pair, both ends inside the benchmark's own netns):
// nothing leaves the machine.

const (
	closedPort = 3999 // nothing listens here in any benchmark netns
	hitPort    = 80   // the enrolled netns redirects 80=3999
)

var (
	nonLoop4 = netip.MustParseAddr("10.201.0.1")
	nonLoop6 = netip.MustParseAddr("fd00:201::1")
)

// kcase is one row: connects from one netns to one destination.
type kcase struct {
	hook     string // loader.HookConnect4 or loader.HookConnect6
	name     string
	enrolled bool
	dst      netip.AddrPort
	goal     float64 // ns over the floor the issue asks for; 0: none set
}

var kcases = []kcase{
	{loader.HookConnect4, "non-loopback (10.201.0.1), netns with no rules", false, netip.AddrPortFrom(nonLoop4, closedPort), 15},
	{loader.HookConnect4, "loopback 127.0.0.1, netns with no rules", false, netip.MustParseAddrPort("127.0.0.1:3999"), 60},
	{loader.HookConnect4, "loopback 127.0.0.1:3999, enrolled netns, no rule for the port", true, netip.MustParseAddrPort("127.0.0.1:3999"), 0},
	{loader.HookConnect4, "redirected hit, 127.0.0.1:80 → 3999", true, netip.MustParseAddrPort("127.0.0.1:80"), 400},
	{loader.HookConnect6, "non-loopback (fd00:201::1), netns with no rules", false, netip.AddrPortFrom(nonLoop6, closedPort), 15},
	{loader.HookConnect6, "::1, netns with no rules", false, netip.MustParseAddrPort("[::1]:3999"), 60},
	{loader.HookConnect6, "v4-mapped ::ffff:127.0.0.1, netns with no rules", false, netip.MustParseAddrPort("[::ffff:127.0.0.1]:3999"), 60},
	{loader.HookConnect6, "redirected hit, [::1]:80 → 3999", true, netip.MustParseAddrPort("[::1]:80"), 400},
	{loader.HookConnect6, "redirected hit, v4-mapped [::ffff:127.0.0.1]:80 → 3999", true, netip.MustParseAddrPort("[::ffff:127.0.0.1]:80"), 400},
}

// kcostRow holds every repeat of one case, in ns per run: the connect
// program, and the sock_release program as each connect's socket is closed.
type kcostRow struct {
	kcase
	ours, floor, over      sample
	rel, relFloor, relOver sample
	// With a trace running: ours over the floor, and the trace program.
	oursTraced, traceOver sample
}

// kernelCost is the table's data.
type kernelCost struct {
	connects int
	rows     []kcostRow
	// recursionMisses of our programs over the run (runs the kernel skipped).
	missed uint64
}

func measureKernelCost(e *env) (*kernelCost, error) {
	if e.pinDir == "" {
		if err := e.bpffs(); err != nil {
			return nil, err
		}
	}
	stamp := time.Now().UnixNano() % 100000
	bare, err := e.costNetns(fmt.Sprintf("nsr-kcost-bare-%d", stamp))
	if err != nil {
		return nil, err
	}
	enrolled, err := e.costNetns(fmt.Sprintf("nsr-kcost-enr-%d", stamp))
	if err != nil {
		return nil, err
	}
	bin, _ := filepath.Abs(e.cfg.nsredirect)
	daemon, err := e.start(bin, "run", "--netns", enrolled.Path, "--redirect", fmt.Sprintf("%d=%d", hitPort, closedPort), "--pin-dir", e.pinDir, "--log-level", "warn", "--remove-on-exit")
	if err != nil {
		return nil, err
	}
	defer stopNow(daemon)
	if err := waitLive(e, bin, enrolled); err != nil {
		return nil, err
	}
	ours := map[string]*ebpf.Program{}
	for _, hook := range []string{loader.HookConnect4, loader.HookConnect6, loader.HookSockRelease} {
		p, err := pinnedProgram(loader.LinkPin(e.pinDir, hook))
		if err != nil {
			return nil, err
		}
		defer p.Close()
		ours[hook] = p
	}
	root, err := cgroupRoot()
	if err != nil {
		return nil, err
	}
	floor := map[string]*ebpf.Program{}
	for hook, at := range map[string]ebpf.AttachType{loader.HookConnect4: ebpf.AttachCGroupInet4Connect, loader.HookConnect6: ebpf.AttachCGroupInet6Connect, loader.HookSockRelease: ebpf.AttachCgroupInetSockRelease} {
		p, l, err := attachFloor(root, at)
		if err != nil {
			return nil, fmt.Errorf("floor program for %s: %w", hook, err)
		}
		defer p.Close()
		defer l.Close()
		floor[hook] = p
	}
	// The statistics cost every BPF program of the host a little: on only
	// while this measurement runs. The kernel drops them when the fd closes,
	// also if the benchmark is killed.
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time statistics (kernel.bpf_stats_enabled): %w", err)
	}
	defer stats.Close()

	n := 20000
	if e.cfg.quick {
		n = 2000
	}
	k := &kernelCost{connects: n, rows: make([]kcostRow, len(kcases))}
	missedBefore := recursionMisses(ours)
	for rep := 0; rep < e.cfg.reps; rep++ {
		fmt.Printf("in-kernel cost: repeat %d/%d\n", rep+1, e.cfg.reps)
		for i := range kcases {
			idx := (i + rep) % len(kcases)
			c := kcases[idx]
			if err := e.ctx.Err(); err != nil {
				return nil, err
			}
			ns := bare
			if c.enrolled {
				ns = enrolled
			}
			o0, f0, err := snap(ours[c.hook], floor[c.hook])
			if err != nil {
				return nil, err
			}
			r0, rf0, err := snap(ours[loader.HookSockRelease], floor[loader.HookSockRelease])
			if err != nil {
				return nil, err
			}
			if err := refusedConnects(ns, c.dst, n); err != nil {
				return nil, fmt.Errorf("%s: %w", c.name, err)
			}
			o1, f1, err := snap(ours[c.hook], floor[c.hook])
			if err != nil {
				return nil, err
			}
			r1, rf1, err := snap(ours[loader.HookSockRelease], floor[loader.HookSockRelease])
			if err != nil {
				return nil, err
			}
			o, f := perRun(o0, o1), perRun(f0, f1)
			r, rf := perRun(r0, r1), perRun(rf0, rf1)
			row := &k.rows[idx]
			row.kcase = c
			row.ours = append(row.ours, o)
			row.floor = append(row.floor, f)
			row.over = append(row.over, o-f)
			row.rel = append(row.rel, r)
			row.relFloor = append(row.relFloor, rf)
			row.relOver = append(row.relOver, r-rf)
		}
	}
	k.missed = recursionMisses(ours) - missedBefore
	if err := measureTraced(e, k, bin, root, ours, floor, bare, enrolled, n); err != nil {
		return nil, err
	}
	// The hit rows must have been redirected: the daemon's counter says so.
	hits := 0
	for _, c := range kcases {
		if c.dst.Port() == hitPort {
			hits++
		}
	}
	if got, err := redirectCount(bin, e.pinDir, enrolled.Path); err != nil {
		return nil, err
	} else if want := uint64(hits * n * e.cfg.reps); got < want {
		return nil, fmt.Errorf("the daemon counted %d redirects in %s, want at least the %d hit connects made", got, enrolled.Path, want)
	}
	return k, nil
}

// measureTraced repeats the cases while `nsredirect trace` runs (its
// output dropped): what our programs cost then, and what the trace
// program attached beside them costs, each over the floor.
func measureTraced(e *env, k *kernelCost, bin, root string, ours, floor map[string]*ebpf.Program, bare, enrolled netnsx.Target, n int) error {
	ready := &lineWaiter{want: "Ctrl-C ends it", seen: make(chan struct{})}
	tracer, err := e.startTo(ready, bin, "trace", "--pin-dir", e.pinDir)
	if err != nil {
		return err
	}
	defer stopNow(tracer)
	select {
	case <-ready.seen:
	case <-time.After(20 * time.Second):
		return errors.New("nsredirect trace did not start within 20s")
	}
	traced := map[string]*ebpf.Program{}
	for hook, at := range map[string]ebpf.AttachType{"connect4": ebpf.AttachCGroupInet4Connect, "connect6": ebpf.AttachCGroupInet6Connect} {
		p, err := attachedNamed(root, at, "trace_"+hook)
		if err != nil {
			return err
		}
		defer p.Close()
		traced[hook] = p
	}
	for rep := 0; rep < e.cfg.reps; rep++ {
		fmt.Printf("in-kernel cost with a trace running: repeat %d/%d\n", rep+1, e.cfg.reps)
		for i := range kcases {
			idx := (i + rep) % len(kcases)
			c := kcases[idx]
			if err := e.ctx.Err(); err != nil {
				return err
			}
			ns := bare
			if c.enrolled {
				ns = enrolled
			}
			o0, f0, err := snap(ours[c.hook], floor[c.hook])
			if err != nil {
				return err
			}
			t0, _, err := snap(traced[c.hook], floor[c.hook])
			if err != nil {
				return err
			}
			if err := refusedConnects(ns, c.dst, n); err != nil {
				return fmt.Errorf("%s, traced: %w", c.name, err)
			}
			o1, f1, err := snap(ours[c.hook], floor[c.hook])
			if err != nil {
				return err
			}
			t1, _, err := snap(traced[c.hook], floor[c.hook])
			if err != nil {
				return err
			}
			f := perRun(f0, f1)
			row := &k.rows[idx]
			row.oursTraced = append(row.oursTraced, perRun(o0, o1)-f)
			row.traceOver = append(row.traceOver, perRun(t0, t1)-f)
		}
	}
	return nil
}

// attachedNamed opens the program named name attached at root for at.
func attachedNamed(root string, at ebpf.AttachType, name string) (*ebpf.Program, error) {
	cg, err := os.Open(root)
	if err != nil {
		return nil, err
	}
	defer cg.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
	if err != nil {
		return nil, fmt.Errorf("query the programs at %s: %w", root, err)
	}
	for _, ap := range res.Programs {
		p, err := ebpf.NewProgramFromID(ap.ID)
		if err != nil {
			continue
		}
		if info, err := p.Info(); err == nil && info.Name == name {
			return p, nil
		}
		p.Close()
	}
	return nil, fmt.Errorf("no program %s attached at %s", name, root)
}

// lineWaiter is a Writer that closes seen once want was written.
type lineWaiter struct {
	mu   sync.Mutex
	buf  []byte
	want string
	seen chan struct{}
	done bool
}

func (w *lineWaiter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.buf = append(w.buf, p...)
		if strings.Contains(string(w.buf), w.want) {
			w.done = true
			close(w.seen)
		}
	}
	return len(p), nil
}

// redirectCount sums the redirect counters of a netns in `nsredirect status`.
func redirectCount(bin, pinDir, netns string) (uint64, error) {
	out, err := exec.Command(bin, "status", "--json", "--pin-dir", pinDir).Output()
	if err != nil {
		return 0, fmt.Errorf("nsredirect status: %w", err)
	}
	var st struct {
		Rules []struct {
			Netns     string `json:"netns"`
			Redirects uint64 `json:"redirects"`
		} `json:"rules"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, fmt.Errorf("nsredirect status --json: %w", err)
	}
	var n uint64
	for _, r := range st.Rules {
		if r.Netns == netns {
			n += r.Redirects
		}
	}
	return n, nil
}

// costNetns is a netns with lo up and a veth pair carrying the
// non-loopback addresses, and no server.
func (e *env) costNetns(name string) (netnsx.Target, error) {
	cmds := [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "set", "lo", "up"},
		// Both ends inside the netns (no dummy module everywhere).
		{"-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"},
		{"-n", name, "addr", "add", nonLoop4.String() + "/24", "dev", "v0"},
		{"-n", name, "addr", "add", nonLoop6.String() + "/64", "dev", "v0", "nodad"},
		{"-n", name, "link", "set", "v0", "up"},
		{"-n", name, "link", "set", "v1", "up"},
	}
	for i, args := range cmds {
		if out, err := runIP(args...); err != nil {
			return netnsx.Target{}, fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		if i == 0 {
			e.onClose(func() { _, _ = runIP("netns", "del", name) })
		}
	}
	return netnsx.ParseTarget("/run/netns/" + name)
}

func waitLive(e *env, bin string, ns netnsx.Target) error {
	deadline := time.Now().Add(10 * time.Second)
	for execQuiet(bin, "check", "--netns", ns.Path, "--pin-dir", e.pinDir) != nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("nsredirect did not become live in %s", ns)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// pinnedProgram opens the program behind one of our pinned links.
func pinnedProgram(pin string) (*ebpf.Program, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", pin, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return nil, fmt.Errorf("info of %s: %w", pin, err)
	}
	return ebpf.NewProgramFromID(info.Program)
}

// attachFloor loads an empty program for a hook (return 1: proceed) and
// attaches it at root, beside ours: cgroup/sock for sock_release, sock_addr
// for the connect hooks.
func attachFloor(root string, at ebpf.AttachType) (*ebpf.Program, link.Link, error) {
	typ := ebpf.CGroupSockAddr
	if at == ebpf.AttachCgroupInetSockRelease {
		typ = ebpf.CGroupSock
	}
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "bench_floor",
		Type:         typ,
		AttachType:   at,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.LoadImm(asm.R0, 1, asm.DWord), asm.Return()},
	})
	if err != nil {
		return nil, nil, err
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: at, Program: p})
	if err != nil {
		p.Close()
		return nil, nil, err
	}
	return p, l, nil
}

type progStats struct {
	runtime time.Duration
	count   uint64
}

func snap(ours, floor *ebpf.Program) (o, f progStats, err error) {
	so, err := ours.Stats()
	if err != nil {
		return o, f, fmt.Errorf("stats of our program: %w", err)
	}
	sf, err := floor.Stats()
	if err != nil {
		return o, f, fmt.Errorf("stats of the floor program: %w", err)
	}
	return progStats{so.Runtime, so.RunCount}, progStats{sf.Runtime, sf.RunCount}, nil
}

func perRun(a, b progStats) float64 {
	if b.count <= a.count {
		return 0
	}
	return float64(b.runtime-a.runtime) / float64(b.count-a.count)
}

func recursionMisses(progs map[string]*ebpf.Program) (n uint64) {
	for _, p := range progs {
		if s, err := p.Stats(); err == nil {
			n += s.RecursionMisses
		}
	}
	return n
}

// refusedConnects makes n blocking connects to dst from inside ns; each
// must be refused (nothing listens), which also proves it stayed local.
func refusedConnects(ns netnsx.Target, dst netip.AddrPort, n int) error {
	return ns.Do(func() error {
		family := unix.AF_INET6
		var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
		if dst.Addr().Is4() {
			family = unix.AF_INET
			sa = &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
		}
		deadline := time.Now().Add(2 * time.Minute)
		for i := 0; i < n; i++ {
			fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			if family == unix.AF_INET6 {
				// Dual-stack, so v4-mapped destinations are allowed.
				_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
			}
			err = unix.Connect(fd, sa)
			unix.Close(fd)
			if !errors.Is(err, unix.ECONNREFUSED) {
				return fmt.Errorf("connect %s: %v; want connection refused (nothing listens on it)", dst, err)
			}
			if i%1000 == 0 && time.Now().After(deadline) {
				return fmt.Errorf("%d connects to %s took over 2 minutes", i, dst)
			}
		}
		return nil
	})
}

func renderKernelCost(k *kernelCost) string {
	if k == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nIn-kernel cost per connect (kernel BPF statistics, run_time_ns / run_cnt over %d connects per repeat; floor = an empty program attached at the same root in the same run; median ± spread over repeats):\n\n", k.connects)
	var rows [][]string
	for _, r := range k.rows {
		goal := "—"
		if r.goal > 0 {
			verdict := "met"
			if r.over.median() > r.goal {
				verdict = "**missed**"
			}
			goal = fmt.Sprintf("≤ +%.0f ns: %s", r.goal, verdict)
		}
		rows = append(rows, []string{r.hook, r.name, cell(r.ours, "%.0f ns"), cell(r.floor, "%.0f ns"), cell(r.over, "%+.0f ns"), goal})
	}
	b.WriteString(table([]string{"hook", "connect", "nsr_connect4/6", "floor", "over the floor", "goal (issue 14)"}, rows))
	b.WriteString("\nThe close() of each of those sockets runs nsr_sock_release, which deletes a redirected socket's record (same method, its own floor):\n\n")
	rows = nil
	for _, r := range k.rows {
		rows = append(rows, []string{r.hook, r.name, cell(r.rel, "%.0f ns"), cell(r.relFloor, "%.0f ns"), cell(r.relOver, "%+.0f ns")})
	}
	b.WriteString(table([]string{"hook", "socket closed after", "nsr_sock_release", "floor", "over the floor"}, rows))
	b.WriteString("\nWith `nsredirect trace` running (all netns, output dropped): our connect program, and the trace program attached beside it, each over the floor. With no trace running nothing of the trace is attached: the first table is the cost then.\n\n")
	rows = nil
	for _, r := range k.rows {
		rows = append(rows, []string{r.hook, r.name, cell(r.over, "%+.0f ns"), cell(r.oursTraced, "%+.0f ns"), cell(r.traceOver, "%+.0f ns")})
	}
	b.WriteString(table([]string{"hook", "connect", "nsr_connect4/6, tracing off", "nsr_connect4/6, tracing on", "trace_connect4/6, tracing on"}, rows))
	if k.missed > 0 {
		fmt.Fprintf(&b, "\n(%d runs of our programs were skipped by the kernel for recursion during the measurement.)\n", k.missed)
	}
	return b.String()
}

func runIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func execQuiet(name string, args ...string) error { return exec.Command(name, args...).Run() }

func cgroupRoot() (string, error) {
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	return loader.Cgroup2Root("", "/proc/self/mountinfo", quiet)
}
