package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// The UDP part (--only udp): the request/response rate of a DNS-shaped
// exchange (one datagram each way, one request in flight) inside a netns,
// direct to the server on 127.0.0.1:5353, through nsredirect's 53=5353/udp,
// and through a socat UDP-RECVFROM sidecar; then what the UDP programs cost
// per datagram inside the kernel (BPF statistics, as for connect), with and
// without UDP rules on the host. Without one the UDP programs are not
// attached at all, which the table checks (BPF_PROG_QUERY at the cgroup2
// root) rather than assumes.

const (
	udpBackendPort = 5353
	udpRulePort    = 53
	udpSocatPort   = 5354
)

type udpResults struct {
	secs, reps int
	rate       map[string]sample // requests per second, per path
	rateOrder  []string
	// In-kernel cost per run, ns: our program, the floor and the difference,
	// for sendmsg4/6 and recvmsg4/6 on a redirected exchange and on one
	// that no rule matches, and for the UDP connect4 program per connect.
	cost      []udpCostRow
	exchanges int
	connects  int
	attached  string // what BPF_PROG_QUERY found attached at the root with no UDP rule
}

type udpCostRow struct {
	hook, name        string
	ours, floor, over sample
}

func measureUDP(e *env) (*udpResults, error) {
	if e.pinDir == "" {
		if err := e.bpffs(); err != nil {
			return nil, err
		}
	}
	stamp := time.Now().UnixNano() % 100000
	ns, err := e.costNetns(fmt.Sprintf("nsr-udp-%d", stamp))
	if err != nil {
		return nil, err
	}
	for _, addr := range []string{fmt.Sprintf("127.0.0.1:%d", udpBackendPort), fmt.Sprintf("[::1]:%d", udpBackendPort)} {
		stopServer, err := udpEcho(ns, addr)
		if err != nil {
			return nil, err
		}
		defer stopServer()
	}
	r := &udpResults{secs: 3, reps: e.cfg.reps, rate: map[string]sample{}}
	if e.cfg.quick {
		r.secs = 1
	}
	_, err = e.start("ip", "netns", "exec", filepath.Base(ns.Path), "socat",
		fmt.Sprintf("UDP4-RECVFROM:%d,bind=127.0.0.1,fork,reuseaddr", udpSocatPort), fmt.Sprintf("UDP4:127.0.0.1:%d", udpBackendPort))
	if err != nil {
		return nil, err
	}
	if err := waitUDP(ns, fmt.Sprintf("127.0.0.1:%d", udpSocatPort)); err != nil {
		return nil, fmt.Errorf("socat: %w", err)
	}
	bin, _ := filepath.Abs(e.cfg.nsredirect)

	// Without any UDP rule: a TCP rule only, no UDP program may be attached.
	tcpOnly, err := e.start(bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", e.pinDir, "--log-level", "warn", "--remove-on-exit")
	if err != nil {
		return nil, err
	}
	if err := waitLive(e, bin, ns); err != nil {
		return nil, err
	}
	ours := udpProgs{}
	if err := ours.addPinned(e.pinDir); err != nil {
		return nil, err
	}
	if r.attached, err = ours.attached(); err != nil {
		return nil, err
	}
	if r.attached != "none" {
		return nil, fmt.Errorf("UDP programs attached with only a TCP rule on the host: %s", r.attached)
	}
	stopNow(tcpOnly)

	// Each repeat measures every path: first with no UDP rule on the host
	// (no UDP program attached), then with the daemon's 53=5353/udp, which
	// --remove-on-exit takes away again, so drift on a shared machine hits
	// every path alike.
	without := []struct{ name, addr string }{
		{"direct to :5353, no UDP rule on the host", fmt.Sprintf("127.0.0.1:%d", udpBackendPort)},
		{"socat UDP-RECVFROM sidecar :5354 → :5353", fmt.Sprintf("127.0.0.1:%d", udpSocatPort)},
	}
	with := []struct{ name, addr string }{
		{"nsredirect 127.0.0.1:53 → :5353 (53=5353/udp)", fmt.Sprintf("127.0.0.1:%d", udpRulePort)},
		{"direct to :5353, UDP programs attached (no rule for the port)", fmt.Sprintf("127.0.0.1:%d", udpBackendPort)},
	}
	measure := func(rep int, paths []struct{ name, addr string }) error {
		for _, p := range paths {
			fmt.Printf("udp: %s, repeat %d/%d\n", p.name, rep+1, r.reps)
			n, err := udpRate(e, ns, p.addr, time.Duration(r.secs)*time.Second)
			if err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			r.add(p.name, n)
		}
		return nil
	}
	startUDP := func() (*exec.Cmd, error) {
		d, err := e.start(bin, "run", "--netns", ns.Path, "--redirect", fmt.Sprintf("%d=%d/udp", udpRulePort, udpBackendPort), "--pin-dir", e.pinDir, "--log-level", "warn", "--remove-on-exit")
		if err != nil {
			return nil, err
		}
		if err := waitLive(e, bin, ns); err != nil {
			return nil, err
		}
		if err := ours.addPinned(e.pinDir); err != nil {
			return nil, err
		}
		if a, err := ours.attached(); err != nil || !strings.HasPrefix(a, "all 6") {
			return nil, fmt.Errorf("with a UDP rule the UDP programs should be attached: %s %v", a, err)
		}
		return d, nil
	}
	for rep := 0; rep < r.reps; rep++ {
		if err := ours.waitNone(); err != nil {
			return nil, fmt.Errorf("with no UDP rule no UDP program may be attached: %w", err)
		}
		if err := measure(rep, without); err != nil {
			return nil, err
		}
		d, err := startUDP()
		if err != nil {
			return nil, err
		}
		err = measure(rep, with)
		stopDaemon(d)
		if err != nil {
			return nil, err
		}
	}
	daemon, err := startUDP()
	if err != nil {
		return nil, err
	}
	defer stopNow(daemon)
	if err := r.measureCost(e, ns); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *udpResults) add(name string, v float64) {
	if _, ok := r.rate[name]; !ok {
		r.rateOrder = append(r.rateOrder, name)
	}
	r.rate[name] = append(r.rate[name], v)
}

// udpCostHook is a hook whose in-kernel cost the table shows.
type udpCostHook struct {
	name string // as pinned: link_<name>
	at   ebpf.AttachType
}

// udpCostCase is one kind of exchange: n exchanges with addr from one
// unconnected socket, or (connected) each from a new socket connected to
// addr, which runs the connect hooks once per exchange.
type udpCostCase struct {
	name, addr string
	connected  bool
}

// measureCost reads the BPF statistics of sendmsg4/6 and recvmsg4/6 over
// exchanges with the redirected port and with the backend directly, and of
// the UDP connect4 program over connected exchanges, beside empty programs
// attached at the same hooks.
func (r *udpResults) measureCost(e *env, ns netnsx.Target) error {
	root, err := cgroupRoot()
	if err != nil {
		return err
	}
	v4 := []udpCostCase{
		{"redirected, 127.0.0.1:53 → :5353", fmt.Sprintf("127.0.0.1:%d", udpRulePort), false},
		{"loopback, no rule for the port (:5353 direct)", fmt.Sprintf("127.0.0.1:%d", udpBackendPort), false},
	}
	v6 := []udpCostCase{
		{"redirected, [::1]:53 → :5353", fmt.Sprintf("[::1]:%d", udpRulePort), false},
		{"loopback, no rule for the port ([::1]:5353 direct)", fmt.Sprintf("[::1]:%d", udpBackendPort), false},
	}
	connected := []udpCostCase{
		{"connect(), redirected, 127.0.0.1:53 → :5353", fmt.Sprintf("127.0.0.1:%d", udpRulePort), true},
		{"connect(), loopback, no rule for the port (:5353 direct)", fmt.Sprintf("127.0.0.1:%d", udpBackendPort), true},
	}
	rows := []struct {
		hook  udpCostHook
		cases []udpCostCase
	}{
		{udpCostHook{loader.HookSendmsg4, ebpf.AttachCGroupUDP4Sendmsg}, v4},
		{udpCostHook{loader.HookRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg}, v4},
		{udpCostHook{loader.HookSendmsg6, ebpf.AttachCGroupUDP6Sendmsg}, v6},
		{udpCostHook{loader.HookRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg}, v6},
		{udpCostHook{loader.HookUDPConnect4, ebpf.AttachCGroupInet4Connect}, connected},
	}
	ours, floor := map[string]*ebpf.Program{}, map[string]*ebpf.Program{}
	for _, row := range rows {
		h := row.hook
		p, err := pinnedProgram(loader.LinkPin(e.pinDir, h.name))
		if err != nil {
			return err
		}
		defer p.Close()
		ours[h.name] = p
		f, l, err := attachFloor(root, h.at)
		if err != nil {
			return fmt.Errorf("floor program for %s: %w", h.name, err)
		}
		defer f.Close()
		defer l.Close()
		floor[h.name] = f
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	defer stats.Close()
	r.exchanges, r.connects = 20000, 5000
	if e.cfg.quick {
		r.exchanges, r.connects = 2000, 500
	}
	// Every case once per repeat, all hooks read around it; a row takes
	// its hook's figures from the cases it lists.
	cases := append(append(append([]udpCostCase(nil), v4...), v6...), connected...)
	type key struct{ hook, c string }
	index := map[key]int{}
	for _, row := range rows {
		for _, c := range row.cases {
			index[key{row.hook.name, c.name}] = len(r.cost)
			r.cost = append(r.cost, udpCostRow{hook: row.hook.name, name: c.name})
		}
	}
	for rep := 0; rep < r.reps; rep++ {
		fmt.Printf("udp in-kernel cost: repeat %d/%d\n", rep+1, r.reps)
		for _, c := range cases {
			before := map[string][2]progStats{}
			for name := range ours {
				o, f, err := snap(ours[name], floor[name])
				if err != nil {
					return err
				}
				before[name] = [2]progStats{o, f}
			}
			var err error
			if c.connected {
				err = udpConnectedExchanges(ns, c.addr, r.connects)
			} else {
				err = udpExchanges(ns, c.addr, r.exchanges)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			for name := range ours {
				i, ok := index[key{name, c.name}]
				if !ok {
					continue
				}
				o, f, err := snap(ours[name], floor[name])
				if err != nil {
					return err
				}
				po, pf := perRun(before[name][0], o), perRun(before[name][1], f)
				row := &r.cost[i]
				row.ours = append(row.ours, po)
				row.floor = append(row.floor, pf)
				row.over = append(row.over, po-pf)
			}
		}
	}
	return nil
}

// stopDaemon stops d and waits until it has exited, so its
// --remove-on-exit is done.
func stopDaemon(d *exec.Cmd) {
	stopNow(d)
	for i := 0; i < 500 && syscall.Kill(d.Process.Pid, 0) == nil; i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

// udpProgs are the UDP programs of ours seen so far, by ID: every start
// pins its own (prog_<hook>) whether it attaches them or not, and a daemon
// that stops with --remove-on-exit unpins them, so they are read while a
// daemon runs and remembered. Programs of other pin dirs (other instances
// on a shared host) are not ours to count. Program IDs are not reused soon
// (the kernel allocates them cyclically).
type udpProgs map[ebpf.ProgramID]string

// addPinned remembers the UDP programs pinned in pinDir now.
func (u udpProgs) addPinned(pinDir string) error {
	for _, h := range loader.UDPHookNames() {
		p, err := ebpf.LoadPinnedProgram(loader.ProgPin(pinDir, h), nil)
		if err != nil {
			return fmt.Errorf("pinned UDP program %s: %w", h, err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			return err
		}
		id, _ := info.ID()
		u[id] = h
	}
	return nil
}

// attached describes which of u the kernel reports attached at the
// cgroup2 root (BPF_PROG_QUERY), whatever the link pins say.
func (u udpProgs) attached() (string, error) {
	root, err := cgroupRoot()
	if err != nil {
		return "", err
	}
	cg, err := os.Open(root)
	if err != nil {
		return "", err
	}
	defer cg.Close()
	on := map[string]bool{}
	for _, at := range []ebpf.AttachType{
		ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
		ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
		ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
	} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			return "", fmt.Errorf("BPF_PROG_QUERY %s at %s: %w", at, root, err)
		}
		for _, p := range res.Programs {
			if h, ok := u[p.ID]; ok {
				on[h] = true
			}
		}
	}
	var names []string
	for _, h := range loader.UDPHookNames() {
		if on[h] {
			names = append(names, h)
		}
	}
	switch len(names) {
	case 0:
		return "none", nil
	case len(loader.UDPHookNames()):
		return "all 6 (" + strings.Join(names, ", ") + ")", nil
	}
	return strings.Join(names, ", "), nil
}

// waitNone waits until none of u is attached: the kernel detaches a link
// whose last pin went from a deferred work item. Bounded at 10 s.
func (u udpProgs) waitNone() error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		a, err := u.attached()
		if err != nil || a == "none" {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still attached 10 s after the last UDP rule went: %s", a)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// udpEcho serves a UDP echo on addr inside ns until stopped.
func udpEcho(ns netnsx.Target, addr string) (func(), error) {
	var conn *net.UDPConn
	err := ns.Do(func() error {
		a, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			return err
		}
		network := "udp4"
		if a.IP.To4() == nil {
			network = "udp6"
		}
		conn, err = net.ListenUDP(network, a)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("UDP server on %s: %w", addr, err)
	}
	go func() {
		buf := make([]byte, 512)
		for {
			n, peer, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = conn.WriteToUDPAddrPort(buf[:n], peer)
		}
	}()
	return func() { conn.Close() }, nil
}

// udpClient opens an unconnected UDP socket inside ns, on loopback of
// dst's family.
func udpClient(ns netnsx.Target, dst *net.UDPAddr) (*net.UDPConn, error) {
	network, local := "udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}
	if dst.IP.To4() == nil {
		network, local = "udp6", &net.UDPAddr{IP: net.IPv6loopback}
	}
	var c *net.UDPConn
	err := ns.Do(func() error {
		var err error
		c, err = net.ListenUDP(network, local)
		return err
	})
	return c, err
}

func waitUDP(ns netnsx.Target, addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := udpExchanges(ns, addr, 1); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return err
		}
	}
}

// udpRate makes request/response exchanges with addr from an unconnected
// socket for d and returns how many per second were answered.
func udpRate(e *env, ns netnsx.Target, addr string, d time.Duration) (float64, error) {
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return 0, err
	}
	c, err := udpClient(ns, dst)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 512)
	msg := []byte("nsredirect-bench-query")
	start := time.Now()
	n := 0
	for time.Since(start) < d {
		if err := e.ctx.Err(); err != nil {
			return 0, err
		}
		if err := exchange(c, dst, msg, buf); err != nil {
			return 0, err
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// udpExchanges makes n request/response exchanges with addr.
func udpExchanges(ns netnsx.Target, addr string, n int) error {
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	c, err := udpClient(ns, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 512)
	msg := []byte("nsredirect-bench-query")
	for i := 0; i < n; i++ {
		if err := exchange(c, dst, msg, buf); err != nil {
			return err
		}
	}
	return nil
}

// udpConnectedExchanges makes n exchanges with addr, each from a new
// socket connect()ed to it: one connect per datagram.
func udpConnectedExchanges(ns netnsx.Target, addr string, n int) error {
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 512)
	msg := []byte("nsredirect-bench-query")
	return ns.Do(func() error {
		for i := 0; i < n; i++ {
			c, err := net.DialUDP("udp", nil, dst)
			if err != nil {
				return err
			}
			_, err = c.Write(msg)
			if err == nil {
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				var k int
				if k, err = c.Read(buf); err == nil && k != len(msg) {
					err = fmt.Errorf("a %d-byte answer to a %d-byte request", k, len(msg))
				}
			}
			c.Close()
			if err != nil {
				return fmt.Errorf("connected exchange with %s: %w", dst, err)
			}
		}
		return nil
	})
}

// exchange sends one datagram and waits for its answer, which must come
// from the address it was sent to.
func exchange(c *net.UDPConn, dst *net.UDPAddr, msg, buf []byte) error {
	if _, err := c.WriteToUDP(msg, dst); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := c.ReadFromUDP(buf)
	if err != nil {
		return fmt.Errorf("no answer from %s: %w", dst, err)
	}
	if n != len(msg) || from.Port != dst.Port || !from.IP.Equal(dst.IP) {
		return fmt.Errorf("answer from %s to a request to %s", from, dst)
	}
	return nil
}

func renderUDP(r *udpResults) string {
	if r == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nUDP request/response inside one netns (one datagram each way, one request in flight, unconnected socket; %d s per repeat, median ± spread over %d repeats):\n\n", r.secs, r.reps)
	direct := r.rate[r.rateOrder[0]]
	var rows [][]string
	for _, name := range r.rateOrder {
		rows = append(rows, []string{name, cell(r.rate[name], "%.0f req/s"), ratio(r.rate[name], direct)})
	}
	b.WriteString(table([]string{"path", "rate", "vs direct"}, rows))
	fmt.Fprintf(&b, "\nIn-kernel cost per datagram (BPF statistics, run_time_ns / run_cnt over %d exchanges per repeat, %d for connect(); floor = an empty program at the same hook in the same run):\n\n", r.exchanges, r.connects)
	rows = [][]string{{"any", "no UDP rule on the host", "not run (UDP programs attached at the root, BPF_PROG_QUERY: " + r.attached + ")", "—", "0 ns"}}
	for _, c := range r.cost {
		rows = append(rows, []string{c.hook, c.name, cell(c.ours, "%.0f ns"), cell(c.floor, "%.0f ns"), cell(c.over, "%+.0f ns")})
	}
	b.WriteString(table([]string{"hook", "datagram", "our program (nsr_<hook>)", "floor", "over the floor"}, rows))
	return b.String()
}
