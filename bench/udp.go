package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
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
// attached at all, which the table checks rather than assumes.

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
	// for sendmsg4 and recvmsg4 on a redirected exchange and on one that no
	// rule matches.
	cost      []udpCostRow
	exchanges int
	attached  string // what was attached at the root with no UDP rule
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
	stopServer, err := udpEcho(ns, fmt.Sprintf("127.0.0.1:%d", udpBackendPort))
	if err != nil {
		return nil, err
	}
	defer stopServer()
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
	if r.attached, err = udpAttached(e.pinDir); err != nil {
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
		if a, err := udpAttached(e.pinDir); err != nil || !strings.HasPrefix(a, "all 6") {
			return nil, fmt.Errorf("with a UDP rule the UDP programs should be attached: %s %v", a, err)
		}
		return d, nil
	}
	for rep := 0; rep < r.reps; rep++ {
		if a, err := udpAttached(e.pinDir); err != nil || a != "none" {
			return nil, fmt.Errorf("with no UDP rule no UDP program may be attached: %s %v", a, err)
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

// measureCost reads the BPF statistics of sendmsg4 and recvmsg4 over
// exchanges with the redirected port and with the backend directly, beside
// empty programs attached at the same hooks.
func (r *udpResults) measureCost(e *env, ns netnsx.Target) error {
	root, err := cgroupRoot()
	if err != nil {
		return err
	}
	hooks := []struct {
		name string
		at   ebpf.AttachType
	}{{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg}, {"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg}}
	ours, floor := map[string]*ebpf.Program{}, map[string]*ebpf.Program{}
	for _, h := range hooks {
		p, err := pinnedProgram(filepath.Join(e.pinDir, "link_"+h.name))
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
	r.exchanges = 20000
	if e.cfg.quick {
		r.exchanges = 2000
	}
	cases := []struct{ name, addr string }{
		{"redirected, 127.0.0.1:53 → :5353", fmt.Sprintf("127.0.0.1:%d", udpRulePort)},
		{"loopback, no rule for the port (:5353 direct)", fmt.Sprintf("127.0.0.1:%d", udpBackendPort)},
	}
	r.cost = make([]udpCostRow, len(hooks)*len(cases))
	for rep := 0; rep < r.reps; rep++ {
		fmt.Printf("udp in-kernel cost: repeat %d/%d\n", rep+1, r.reps)
		for ci, c := range cases {
			before := map[string][2]progStats{}
			for _, h := range hooks {
				o, f, err := snap(ours[h.name], floor[h.name])
				if err != nil {
					return err
				}
				before[h.name] = [2]progStats{o, f}
			}
			if err := udpExchanges(ns, c.addr, r.exchanges); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			for hi, h := range hooks {
				o, f, err := snap(ours[h.name], floor[h.name])
				if err != nil {
					return err
				}
				po, pf := perRun(before[h.name][0], o), perRun(before[h.name][1], f)
				row := &r.cost[hi*len(cases)+ci]
				row.hook, row.name = h.name, c.name
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

// udpAttached describes which UDP links are pinned and attached.
func udpAttached(pinDir string) (string, error) {
	var on []string
	for _, h := range loader.UDPHookNames() {
		p, err := pinnedProgram(filepath.Join(pinDir, "link_"+h))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return "", err
		}
		p.Close()
		on = append(on, h)
	}
	switch len(on) {
	case 0:
		return "none", nil
	case len(loader.UDPHookNames()):
		return "all 6 (" + strings.Join(on, ", ") + ")", nil
	}
	return strings.Join(on, ", "), nil
}

// udpEcho serves a UDP echo on addr inside ns until stopped.
func udpEcho(ns netnsx.Target, addr string) (func(), error) {
	var conn *net.UDPConn
	err := ns.Do(func() error {
		a, err := net.ResolveUDPAddr("udp4", addr)
		if err != nil {
			return err
		}
		conn, err = net.ListenUDP("udp4", a)
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

// udpClient opens an unconnected UDP socket inside ns.
func udpClient(ns netnsx.Target) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := ns.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
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
	c, err := udpClient(ns)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	dst, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return 0, err
	}
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
	c, err := udpClient(ns)
	if err != nil {
		return err
	}
	defer c.Close()
	dst, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 512)
	msg := []byte("nsredirect-bench-query")
	for i := 0; i < n; i++ {
		if err := exchange(c, dst, msg, buf); err != nil {
			return err
		}
	}
	return nil
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
	fmt.Fprintf(&b, "\nIn-kernel cost per datagram (BPF statistics, run_time_ns / run_cnt over %d exchanges per repeat; floor = an empty program at the same hook in the same run):\n\n", r.exchanges)
	rows = [][]string{{"any", "no UDP rule on the host", "not run (UDP links at the root: " + r.attached + ")", "—", "0 ns"}}
	for _, c := range r.cost {
		rows = append(rows, []string{c.hook, c.name, cell(c.ours, "%.0f ns"), cell(c.floor, "%.0f ns"), cell(c.over, "%+.0f ns")})
	}
	b.WriteString(table([]string{"hook", "datagram", "nsr_sendmsg4/recvmsg4", "floor", "over the floor"}, rows))
	return b.String()
}
