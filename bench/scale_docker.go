package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv/enginefake"
)

// fakeEngine is the fake Docker Engine of enginefake for
// `nsredirect docker`, whose containers are the bench's sandboxes.
type fakeEngine struct{ *enginefake.Engine }

func (e *env) fakeEngine() (fakeEngine, error) {
	dir, err := os.MkdirTemp("", "nsr-bench-docker-")
	if err != nil {
		return fakeEngine{}, err
	}
	e.onClose(func() { os.RemoveAll(dir) })
	f, err := enginefake.Start(dir, docker.MaxAPIVersion)
	if err != nil {
		return fakeEngine{}, err
	}
	e.onClose(func() { _ = f.Close() })
	return fakeEngine{f}, nil
}

func (f fakeEngine) event(id, name, action string) {
	var ev docker.Event
	ev.Type, ev.Action, ev.Actor.ID, ev.TimeNano = "container", action, id, time.Now().UnixNano()
	// As the Engine does: an event carries the container's labels as
	// attributes (the client keeps only events of labelled containers).
	ev.Actor.Attributes = map[string]string{"name": name, docker.DefaultLabel: "80=3210"}
	f.Send(ev)
}

func (f fakeEngine) start(id, name string, pid int) {
	f.Put(enginefake.Container{
		ID: id, Name: name, Pid: pid, StartedAt: time.Now().UTC().Format(time.RFC3339Nano),
		Labels: map[string]string{docker.DefaultLabel: "80=3210"}, NetworkMode: "bridge",
	})
	f.event(id, name, "start")
}

func (f fakeEngine) die(id, name string) {
	f.Remove(id)
	f.event(id, name, "die")
}

var ctrSeq int

func ctrID() string {
	ctrSeq++
	return fmt.Sprintf("%064x", ctrSeq)
}

type benchCtr struct {
	id string
	sb *sandbox
}

func scaleDocker(e *env, s *scaleResults, n, burst int) error {
	eng, err := e.fakeEngine()
	if err != nil {
		return err
	}
	fmt.Printf("docker: %d labelled containers\n", n)
	live := make([]benchCtr, 0, n)
	for i := 0; i < n; i++ {
		c := benchCtr{id: ctrID()}
		if c.sb, err = e.sandbox("nsr-bd-"+c.id[56:], ""); err != nil {
			return err
		}
		eng.start(c.id, c.sb.name, c.sb.proc.Process.Pid)
		live = append(live, c)
	}
	d, stop, err := e.daemon("docker", "--docker-host", "unix://"+eng.Socket())
	if err != nil {
		return err
	}
	defer stop()
	for _, c := range live {
		if _, err := c.sb.waitRedirected(60 * time.Second); err != nil {
			return fmt.Errorf("docker: %w; the daemon's warnings:\n%s", err, e.daemonLog)
		}
	}
	settle([]int{d.Process.Pid})
	row := scaleRow{mode: "docker", shape: fmt.Sprintf("%d labelled containers", n), churnWhat: "a container replaced every 200 ms"}
	err = measureIdleAndChurn(e, &row, d.Process.Pid, func(i int) error {
		old := live[i%len(live)]
		eng.die(old.id, old.sb.name)
		old.sb.remove()
		c := benchCtr{id: ctrID()}
		var err error
		if c.sb, err = e.sandbox("nsr-bd-"+c.id[56:], ""); err != nil {
			return err
		}
		eng.start(c.id, c.sb.name, c.sb.proc.Process.Pid)
		live[i%len(live)] = c
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Printf("docker: %d containers starting at once\n", burst)
	var fresh []benchCtr
	sbs := make([]*sandbox, 0, burst)
	for j := 0; j < burst; j++ {
		c := benchCtr{id: ctrID()}
		if c.sb, err = e.sandbox("nsr-bd-"+c.id[56:], ""); err != nil {
			return err
		}
		fresh = append(fresh, c)
		sbs = append(sbs, c.sb)
	}
	go func() {
		for _, c := range fresh {
			eng.start(c.id, c.sb.name, c.sb.proc.Process.Pid)
		}
	}()
	times, err := timeAll(sbs, 30*time.Second)
	if err != nil {
		return err
	}
	row.p50, row.p99, row.max, row.starts = percentileDur(times, 50), percentileDur(times, 99), percentileDur(times, 100), burst
	s.rows = append(s.rows, row)
	return nil
}

// scaleRun runs daemons `run` daemons of per targets each (--netns given
// per times); the table sums their CPU and RSS.
func scaleRun(e *env, s *scaleResults, daemons, per int) error {
	fmt.Printf("run: %d daemons of %d targets each\n", daemons, per)
	var pids []int
	var stops []func()
	defer func() {
		for _, f := range stops {
			f()
		}
	}()
	// One pin dir for all: the daemons share the programs, as on a host.
	if err := e.bpffs(); err != nil {
		return err
	}
	bin, _ := filepath.Abs(e.cfg.nsredirect)
	var sbs []*sandbox
	for i := 0; i < daemons; i++ {
		args := []string{"run", "--redirect", "80=3210", "--pin-dir", e.pinDir, "--log-level", "warn", "--remove-on-exit"}
		for j := 0; j < per; j++ {
			sb, err := e.sandbox(fmt.Sprintf("nsr-br-%d-%d-%d", time.Now().UnixNano()%100000, i, j), "")
			if err != nil {
				return err
			}
			args = append(args, "--netns", sb.ns.Path)
			sbs = append(sbs, sb)
		}
		cmd, err := e.start(bin, args...)
		if err != nil {
			return err
		}
		pids = append(pids, cmd.Process.Pid)
		stops = append(stops, func() { stopNow(cmd) })
	}
	for _, sb := range sbs {
		if _, err := sb.waitRedirected(60 * time.Second); err != nil {
			return fmt.Errorf("run: %w", err)
		}
	}
	settle(pids)
	row := scaleRow{mode: "run", shape: fmt.Sprintf("%d targets: %d daemons × %d (sum)", daemons*per, daemons, per)}
	fmt.Println("run: idle")
	var err error
	if row.idle, err = measureUsage(e, pids, e.scaleWindow(), nil); err != nil {
		return err
	}
	s.rows = append(s.rows, row)
	one := scaleRow{mode: "run", shape: fmt.Sprintf("per daemon (%d targets)", per), idle: usage{cpuPct: row.idle.cpuPct / float64(daemons), rssKB: row.idle.rssKB / daemons}}
	s.rows = append(s.rows, one)
	return nil
}
