package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// The daemon at node scale (`make bench-scale`): CPU (% of one core) and RSS
// of the daemon idle and under churn, per discovery mode, and the time from
// a pod or container start to its live redirect with many starting at once.
// Pods and containers are real processes in real netns; only the API in
// front of them (Kubernetes, Docker Engine) is simulated.

// sandbox is one pod or container: a netns, a process in it (sleep) and a
// listener on :3210 in it that the redirect 80=3210 must reach.
type sandbox struct {
	name string
	ns   netnsx.Target
	proc *exec.Cmd
	ln   net.Listener
}

var selfNetns = func() string { s, _ := os.Readlink("/proc/self/ns/net"); return s }()

// sandbox creates one; cgroupDir, if set, is the cgroup its process is
// moved into (a kubelet-shaped pod cgroup), only once it is inside the netns.
func (e *env) sandbox(name, cgroupDir string) (*sandbox, error) {
	if out, err := runIP("netns", "add", name); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	e.onClose(func() { _, _ = runIP("netns", "del", name) })
	if out, err := runIP("-n", name, "link", "set", "lo", "up"); err != nil {
		return nil, fmt.Errorf("lo up in %s: %v: %s", name, err, out)
	}
	s := &sandbox{name: name}
	var err error
	if s.ns, err = netnsx.ParseTarget("/run/netns/" + name); err != nil {
		return nil, err
	}
	if err := s.ns.Do(func() error {
		s.ln, err = net.Listen("tcp", ":3210")
		return err
	}); err != nil {
		return nil, err
	}
	go func(ln net.Listener) {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}(s.ln)
	e.onClose(func() { s.ln.Close() })
	if s.proc, err = e.start("ip", "netns", "exec", name, "sleep", "3600"); err != nil {
		return nil, err
	}
	// Only a process already inside the netns may look like a pod: else the
	// daemon could see the host's netns for it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", s.proc.Process.Pid)); err == nil && l != selfNetns {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("sandbox %s: process never entered its netns", name)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if cgroupDir != "" {
		if err := os.MkdirAll(cgroupDir, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(cgroupDir, "cgroup.procs"), []byte(strconv.Itoa(s.proc.Process.Pid)), 0o644); err != nil {
			return nil, fmt.Errorf("move %d into %s: %w", s.proc.Process.Pid, cgroupDir, err)
		}
	}
	return s, nil
}

func (s *sandbox) remove() {
	stopNow(s.proc)
	s.ln.Close()
	_, _ = runIP("netns", "del", s.name)
}

// waitRedirected polls until 127.0.0.1:80 reaches the listener on :3210;
// the bound only caps a hang. The whole loop runs on one thread inside the
// netns, so polling costs one thread, not one per dial.
func (s *sandbox) waitRedirected(limit time.Duration) (time.Duration, error) {
	start := time.Now()
	err := s.ns.Do(func() error {
		for {
			c, err := net.DialTimeout("tcp", "127.0.0.1:80", 200*time.Millisecond)
			if err == nil {
				c.Close()
				return nil
			}
			if time.Since(start) > limit {
				return fmt.Errorf("%s: no redirect after %s: %w", s.name, limit, err)
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
	return time.Since(start), err
}

// usage is a daemon's CPU and peak RSS over a window.
type usage struct {
	cpuPct float64 // of one core, summed over the daemons
	rssKB  int     // peak, summed over the daemons
}

// clock ticks (USER_HZ, 100 on Linux) of user+system time of pid.
func cpuTicks(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return u + s
}

// settle waits until the daemons' start-up is over: over the last two
// seconds their CPU time grew by less than a clock tick (10 ms) per daemon,
// for at most 30 s. An idle daemon spends a few ms a second. Their first
// reconcile returns only after every target is enrolled, so its tail (the
// orphan sweep, the Events of kube, the exit of the threads that read
// cookies) would otherwise fall into the idle window.
func settle(pids []int) {
	sum := func() (n uint64) {
		for _, p := range pids {
			n += cpuTicks(p)
		}
		return n
	}
	const every, over = 250 * time.Millisecond, 8 // 2 s of samples
	seen := []uint64{sum()}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		time.Sleep(every)
		seen = append(seen, sum())
		if n := len(seen); n > over && seen[n-1]-seen[n-1-over] < uint64(len(pids)) {
			return
		}
	}
}

// measureUsage runs load (nil: idle) for window and reads the daemons' CPU
// time and RSS (sampled every 500 ms) over it.
func measureUsage(e *env, pids []int, window time.Duration, load func(stop <-chan struct{}) error) (usage, error) {
	var t0 uint64
	for _, p := range pids {
		t0 += cpuTicks(p)
	}
	stop := make(chan struct{})
	var loadErr error
	var wg sync.WaitGroup
	if load != nil {
		wg.Add(1)
		go func() { defer wg.Done(); loadErr = load(stop) }()
	}
	start := time.Now()
	var u usage
	for time.Since(start) < window && e.ctx.Err() == nil {
		time.Sleep(500 * time.Millisecond)
		rss := 0
		for _, p := range pids {
			rss += rssKB(p)
		}
		u.rssKB = max(u.rssKB, rss)
	}
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)
	var t1 uint64
	for _, p := range pids {
		t1 += cpuTicks(p)
	}
	u.cpuPct = float64(t1-t0) / 100 / elapsed.Seconds() * 100
	return u, loadErr
}

// scaleRow is one line of the node-scale table.
// measureIdleAndChurn measures the daemon pid into row: idle, then while
// replace(i) replaces the i-th target every 200 ms (row.churnWhat).
func measureIdleAndChurn(e *env, row *scaleRow, pid int, replace func(i int) error) error {
	fmt.Printf("%s: idle\n", row.mode)
	var err error
	if row.idle, err = measureUsage(e, []int{pid}, e.scaleWindow(), nil); err != nil {
		return err
	}
	fmt.Printf("%s: churn\n", row.mode)
	i := 0
	row.churn, err = measureUsage(e, []int{pid}, e.scaleWindow(), func(stop <-chan struct{}) error {
		for {
			select {
			case <-stop:
				return nil
			case <-time.After(200 * time.Millisecond):
			}
			if err := replace(i); err != nil {
				return err
			}
			i++
		}
	})
	return err
}

type scaleRow struct {
	mode, shape   string
	idle, churn   usage
	churnWhat     string
	p50, p99, max time.Duration
	starts        int
}

type scaleResults struct {
	rows   []scaleRow
	procs  int
	window time.Duration
}

func (e *env) scaleWindow() time.Duration {
	if e.cfg.quick {
		return 5 * time.Second
	}
	return 20 * time.Second
}

func percentileDur(ds []time.Duration, p float64) time.Duration {
	obs := make([]float64, len(ds))
	for i, d := range ds {
		obs[i] = float64(d)
	}
	return time.Duration(percentile(obs, p))
}

// timeAll waits for every sandbox's redirect, in parallel, from now.
func timeAll(sbs []*sandbox, limit time.Duration) ([]time.Duration, error) {
	out := make([]time.Duration, len(sbs))
	errs := make([]error, len(sbs))
	var wg sync.WaitGroup
	for i, s := range sbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], errs[i] = s.waitRedirected(limit)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// fillProcs starts sleep processes on the host until the machine has total
// processes, as a busy node does (the kube mode scans all of /proc).
func (e *env) fillProcs(total int) (int, error) {
	count := func() int {
		ents, _ := os.ReadDir("/proc")
		n := 0
		for _, d := range ents {
			if _, err := strconv.Atoi(d.Name()); err == nil {
				n++
			}
		}
		return n
	}
	deadline := time.Now().Add(3 * time.Minute)
	for n := count(); n < total; n++ {
		if _, err := e.start("sleep", "3600"); err != nil {
			return n, err
		}
		if time.Now().After(deadline) {
			return n, fmt.Errorf("starting %d processes took over 3 minutes", total)
		}
	}
	return count(), nil
}

func renderScale(s *scaleResults) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nThe daemon at node scale: CPU as %% of one core and peak RSS over %s idle and %s under churn (real processes in real netns; the Kubernetes API and Docker Engine are simulated); %d processes on the machine during the kube run.\n\n", s.window, s.window, s.procs)
	var rows [][]string
	for _, r := range s.rows {
		start := "—"
		if r.starts > 0 {
			start = fmt.Sprintf("%s / %s (max %s, %d at once)", ms(r.p50), ms(r.p99), ms(r.max), r.starts)
		}
		churn := "—"
		if r.churnWhat != "" {
			churn = fmt.Sprintf("%.2f%%, %.1f MB (%s)", r.churn.cpuPct, float64(r.churn.rssKB)/1024, r.churnWhat)
		}
		rows = append(rows, []string{r.mode, r.shape, fmt.Sprintf("%.2f%%", r.idle.cpuPct), fmt.Sprintf("%.1f MB", float64(r.idle.rssKB)/1024), churn, start})
	}
	b.WriteString(table([]string{"mode", "shape", "idle CPU", "idle RSS", "churn CPU, RSS", "start → redirect p50 / p99"}, rows))
	b.WriteString("\nGoals (issue 14): idle ≤ 0.2% of a core, RSS < 30 MB, start-to-redirect p99 < 1 s.\n")
	return b.String()
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/1e6) }

// measureScale runs the three modes one after the other.
func measureScale(e *env) (*scaleResults, error) {
	s := &scaleResults{window: e.scaleWindow()}
	root, err := cgroupRoot()
	if err != nil {
		return nil, err
	}
	pods, procs, ctrs, runs, perRun, burst := 110, 5000, 200, 10, 100, 50
	if e.cfg.quick {
		pods, procs, ctrs, runs, perRun, burst = 20, 1000, 20, 2, 10, 10
	}
	if err := scaleKube(e, s, root, pods, procs, burst); err != nil {
		return s, fmt.Errorf("kube: %w", err)
	}
	if err := scaleDocker(e, s, ctrs, burst); err != nil {
		return s, fmt.Errorf("docker: %w", err)
	}
	if err := scaleRun(e, s, runs, perRun); err != nil {
		return s, fmt.Errorf("run: %w", err)
	}
	return s, nil
}
