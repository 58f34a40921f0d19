package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
)

// fakeEngine is enough of the Docker Engine API on a unix socket for
// `nsredirect docker`: /version, /containers/json, /containers/{id}/json and
// /events, as the docker package's tests serve it.
type fakeEngine struct {
	socket string
	mu     sync.Mutex
	ctrs   map[string]docker.Inspected
	subs   map[chan docker.Event]struct{}
}

func (e *env) fakeEngine() (*fakeEngine, error) {
	dir, err := os.MkdirTemp("", "nsr-bench-docker-")
	if err != nil {
		return nil, err
	}
	e.onClose(func() { os.RemoveAll(dir) })
	f := &fakeEngine{socket: filepath.Join(dir, "docker.sock"), ctrs: map[string]docker.Inspected{}, subs: map[chan docker.Event]struct{}{}}
	ln, err := net.Listen("unix", f.socket)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: http.HandlerFunc(f.serve), ReadHeaderTimeout: time.Second}
	go func() { _ = srv.Serve(ln) }()
	e.onClose(func() { _ = srv.Close() })
	return f, nil
}

func (f *fakeEngine) serve(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	if path == "/version" {
		fmt.Fprintf(w, `{"Version":"fake","ApiVersion":%q,"MinAPIVersion":"1.12"}`, docker.MaxAPIVersion)
		return
	}
	path = strings.TrimPrefix(path, "/v"+docker.MaxAPIVersion)
	switch {
	case path == "/containers/json":
		var flt map[string][]string
		_ = json.Unmarshal([]byte(r.URL.Query().Get("filters")), &flt)
		f.mu.Lock()
		var out []docker.Container
		for id, c := range f.ctrs {
			if _, ok := c.Config.Labels[firstOf(flt["label"])]; ok && c.State.Running {
				out = append(out, docker.Container{ID: id, Names: []string{c.Name}, Labels: c.Config.Labels, State: "running"})
			}
		}
		f.mu.Unlock()
		_ = json.NewEncoder(w).Encode(out)
	case strings.HasPrefix(path, "/containers/") && strings.HasSuffix(path, "/json"):
		id := strings.TrimSuffix(strings.TrimPrefix(path, "/containers/"), "/json")
		f.mu.Lock()
		c, ok := f.ctrs[id]
		f.mu.Unlock()
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"message":"No such container: %s"}`, id)
			return
		}
		_ = json.NewEncoder(w).Encode(c)
	case path == "/events":
		ch := make(chan docker.Event, 256)
		f.mu.Lock()
		f.subs[ch] = struct{}{}
		f.mu.Unlock()
		defer func() { f.mu.Lock(); delete(f.subs, ch); f.mu.Unlock() }()
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		enc := json.NewEncoder(w)
		for {
			select {
			case <-r.Context().Done():
				return
			case ev := <-ch:
				_ = enc.Encode(ev)
				w.(http.Flusher).Flush()
			}
		}
	default:
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"message":"page not found: %s"}`, r.URL.Path)
	}
}

func firstOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

func (f *fakeEngine) event(id, name, action string) {
	var ev docker.Event
	ev.Type, ev.Action, ev.Actor.ID, ev.TimeNano = "container", action, id, time.Now().UnixNano()
	// As the Engine does: an event carries the container's labels as
	// attributes (the client keeps only events of labelled containers).
	ev.Actor.Attributes = map[string]string{"name": name, docker.DefaultLabel: "80=3210"}
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}

func (f *fakeEngine) start(id, name string, pid int) {
	var in docker.Inspected
	in.ID, in.Name, in.State.Running, in.State.Pid = id, "/"+name, true, pid
	in.State.StartedAt = time.Now().UTC().Format(time.RFC3339Nano)
	in.Config.Labels = map[string]string{docker.DefaultLabel: "80=3210"}
	in.HostConfig.NetworkMode = "bridge"
	f.mu.Lock()
	f.ctrs[id] = in
	f.mu.Unlock()
	f.event(id, name, "start")
}

func (f *fakeEngine) die(id, name string) {
	f.mu.Lock()
	delete(f.ctrs, id)
	f.mu.Unlock()
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
	d, stop, err := e.daemon("docker", "--docker-host", "unix://"+eng.socket)
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
	fmt.Println("docker: idle")
	if row.idle, err = measureUsage(e, []int{d.Process.Pid}, e.scaleWindow(), nil); err != nil {
		return err
	}
	fmt.Println("docker: churn")
	i := 0
	row.churn, err = measureUsage(e, []int{d.Process.Pid}, e.scaleWindow(), func(stop <-chan struct{}) error {
		for {
			select {
			case <-stop:
				return nil
			case <-time.After(200 * time.Millisecond):
			}
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
			i++
		}
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
