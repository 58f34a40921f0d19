package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/trace"
)

// traceFilter selects the events shown.
type traceFilter struct {
	netns     string // --netns target, "" for any
	netnsIno  uint64
	container string
	pod       string
	port      uint16
	verdict   string
}

// matches reports whether the enrollment r is one the filter traces.
func (f traceFilter) matches(r loader.Record) bool {
	switch {
	case f.netns != "":
		return r.NetnsIno == f.netnsIno
	case f.container != "":
		return r.Owner == "docker" && (r.Name == f.container || len(f.container) >= 12 && strings.HasPrefix(r.ID, f.container))
	case f.pod != "":
		return r.Owner == "kube" && r.Name == f.pod
	}
	return true
}

func (f traceFilter) shows(e trace.Event) bool {
	if f.port != 0 && e.Dialled.Port() != f.port && e.Target.Port() != f.port {
		return false
	}
	return f.verdict == "" || e.Verdict == f.verdict
}

// targetFlags are --netns, --container and --pod, of trace and explain.
type targetFlags struct {
	netns, container, pod string
}

func (t *targetFlags) register(fs *flag.FlagSet, what string) {
	fs.StringVar(&t.netns, "netns", "", what+" the netns TARGET: a path or pid:N")
	fs.StringVar(&t.container, "container", "", what+" the container NAME or ID (nsredirect docker)")
	fs.StringVar(&t.pod, "pod", "", what+" the pod NAMESPACE/NAME (nsredirect kube)")
}

// filter validates the target flags into a filter (none given: any).
func (t targetFlags) filter() (traceFilter, error) {
	given := 0
	for _, v := range []string{t.netns, t.container, t.pod} {
		if v != "" {
			given++
		}
	}
	if given > 1 {
		return traceFilter{}, usagef("--netns %q, --container %q and --pod %q: give one of them", t.netns, t.container, t.pod)
	}
	f := traceFilter{netns: t.netns, container: t.container, pod: t.pod}
	if t.pod != "" {
		ns, name, ok := strings.Cut(t.pod, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return f, usagef("--pod %q: use NAMESPACE/NAME, e.g. default/web-0", t.pod)
		}
	}
	if t.netns != "" {
		target, err := netnsx.ParseTarget(t.netns)
		if err != nil {
			return f, err
		}
		id, err := target.Stat()
		if err != nil {
			return f, err
		}
		f.netnsIno = id.Ino
	}
	return f, nil
}

// netnsLabel is what a person knows a netns by, from its record.
func netnsLabel(r loader.Record) string {
	switch r.Owner {
	case "docker":
		id := r.ID
		if len(id) > 12 {
			id = id[:12]
		}
		return fmt.Sprintf("container %s (%s)", r.Name, id)
	case "kube":
		return "pod " + r.Name
	case "run":
		return "netns " + r.Name
	}
	return r.Name
}

type traceFlags struct {
	target                  targetFlags
	pinDir, cgroup, verdict string
	port, ringKiB           int
	json, peer              bool
}

func (f *traceFlags) register(fs *flag.FlagSet) {
	f.target.register(fs, "only")
	fs.StringVar(&f.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory of the pinned state")
	fs.StringVar(&f.cgroup, "cgroup", "", "cgroup2 mount the daemon attaches at, as its --cgroup (default: the first cgroup2 mount)")
	fs.IntVar(&f.port, "port", 0, "only events whose dialled or target port is PORT")
	fs.StringVar(&f.verdict, "verdict", "", "only events of this verdict: "+strings.Join(trace.Verdicts, ", "))
	fs.BoolVar(&f.json, "json", false, "one JSON object per event")
	fs.IntVar(&f.ringKiB, "buffer-kib", trace.DefaultRingBytes>>10, "kernel ring buffer for events, in KiB (a power of two, at least the page size): what a burst can hold before events are dropped")
	fs.BoolVar(&f.peer, "peer", false, "also trace getpeername rewrites (runs on every getpeername of the host while tracing)")
}

func traceCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("trace", io)
	var f traceFlags
	f.register(fs)
	if err := parse(fs, args, io.Getenv); err != nil {
		return err
	}
	tf, pinDir, cgroup, verdict := f.target, f.pinDir, f.cgroup, f.verdict
	port, ringKiB, asJSON, peer := f.port, f.ringKiB, f.json, f.peer
	if port < 0 || port > 65535 {
		return usagef("--port %d: use a port from 1 to 65535", port)
	}
	if verdict != "" && !slices.Contains(trace.Verdicts, verdict) {
		return usagef("--verdict %q: use one of %s", verdict, strings.Join(trace.Verdicts, ", "))
	}
	page := os.Getpagesize() >> 10
	if ringKiB < page || ringKiB&(ringKiB-1) != 0 || ringKiB > 1<<20 {
		return usagef("--buffer-kib %d: use a power of two from %d (the page size) to %d", ringKiB, page, 1<<20)
	}
	filter, err := tf.filter()
	if err != nil {
		return err
	}
	filter.port, filter.verdict = uint16(port), verdict
	if err := loader.CheckPrivileges(); err != nil {
		return err
	}
	root, err := loader.Cgroup2Root(cgroup, "/proc/self/mountinfo", quietLog())
	if err != nil {
		return err
	}
	l, err := loader.OpenPinned(pinDir, quietLog())
	if errors.Is(err, loader.ErrNotPinned) {
		return fmt.Errorf("no nsredirect state at %s: nothing is enrolled to trace; start a daemon (nsredirect run, docker or kube) first", pinDir)
	}
	if err != nil {
		return err
	}
	defer l.Close()
	t, err := trace.Open(trace.Options{PinDir: pinDir, Cgroup: root, Peer: peer, RingBytes: ringKiB << 10})
	if err != nil {
		return err
	}
	defer t.Close()

	var mu sync.Mutex
	labels := map[uint64]string{}
	refresh := func() error {
		recs, err := l.Records()
		if err != nil {
			return err
		}
		traced := map[uint64]bool{}
		mu.Lock()
		for _, r := range recs {
			labels[r.Cookie] = netnsLabel(r)
			if filter.matches(r) {
				traced[r.Cookie] = true
			}
		}
		mu.Unlock()
		return t.SetNetns(traced)
	}
	if err := refresh(); err != nil {
		return err
	}
	task := "pid and process name"
	if !t.WithTask() {
		task = "no pid (this kernel gives cgroup socket programs none): uid and socket cookie instead"
	}
	fmt.Fprintf(io.Stderr, "tracing (pin dir %s, %s); Ctrl-C ends it\n", pinDir, task)

	var shown, filtered uint64
	done := make(chan error, 1)
	go func() {
		enc := json.NewEncoder(io.Stdout)
		for {
			e, err := t.Read()
			if err != nil {
				if errors.Is(err, trace.ErrClosed) {
					err = nil
				}
				done <- err
				return
			}
			if !filter.shows(e) {
				filtered++
				continue
			}
			shown++
			mu.Lock()
			label := labels[e.NetnsCookie]
			mu.Unlock()
			if asJSON {
				_ = enc.Encode(jsonEvent(e, label))
			} else {
				fmt.Fprintln(io.Stdout, eventLine(e, label))
			}
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var runErr error
	reading := true
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case runErr = <-done:
			reading = false
			break loop
		case <-tick.C:
			if runErr = refresh(); runErr != nil {
				break loop
			}
		}
	}
	if reading {
		// Show what is already in the ring, then stop.
		t.Stop()
		runErr = errors.Join(runErr, <-done)
	}
	drops := t.Drops()
	t.Close()
	summary(io.Stderr, shown, filtered, drops)
	return runErr
}

func summary(w io.Writer, shown, filtered, drops uint64) {
	fmt.Fprintf(w, "trace ended: %d event(s) shown, %d filtered out, %d dropped (the ring buffer was full)\n", shown, filtered, drops)
}

// eventLine is one event as text.
func eventLine(e trace.Event, label string) string {
	if label == "" {
		label = fmt.Sprintf("netns cookie %d", e.NetnsCookie)
	}
	who := fmt.Sprintf("pid %d (%s)", e.PID, e.Comm)
	if e.PID == 0 {
		who = fmt.Sprintf("pid ? uid %d sock %d", e.UID, e.SockCookie)
	}
	return fmt.Sprintf("%s %s %s %s%d %s %s %s", e.Time.Format("15:04:05.000000"), label, who, e.Proto, e.Family, e.Hook, e.Dialled, verdictText(e))
}

func verdictText(e trace.Event) string {
	switch e.Verdict {
	case trace.Redirected:
		return "→ redirected to " + e.Target.String()
	case trace.NoRule:
		return "→ not redirected: loopback in an enrolled netns, no rule for this address, port and protocol"
	case trace.SourceRewritten:
		return "← reply from " + e.Target.String() + " shown as from " + e.Dialled.String()
	case trace.PeerRewritten:
		return "← getpeername shows " + e.Dialled.String() + " for " + e.Target.String()
	}
	return e.Verdict
}

type traceJSON struct {
	Time        time.Time `json:"time"`
	Netns       string    `json:"netns"`
	NetnsCookie uint64    `json:"netns_cookie"`
	PID         int       `json:"pid,omitempty"`
	TID         int       `json:"tid,omitempty"`
	Comm        string    `json:"comm,omitempty"`
	UID         uint32    `json:"uid"`
	SockCookie  uint64    `json:"socket_cookie"`
	Proto       string    `json:"protocol"`
	Family      string    `json:"family"`
	Hook        string    `json:"hook"`
	Dialled     string    `json:"dialled"`
	Verdict     string    `json:"verdict"`
	Target      string    `json:"target"`
}

func jsonEvent(e trace.Event, label string) traceJSON {
	return traceJSON{
		Time: e.Time.UTC(), Netns: label, NetnsCookie: e.NetnsCookie, PID: e.PID, TID: e.TID, Comm: e.Comm, UID: e.UID,
		SockCookie: e.SockCookie, Proto: e.Proto, Family: "ipv" + strconv.Itoa(e.Family), Hook: e.Hook,
		Dialled: e.Dialled.String(), Verdict: e.Verdict, Target: e.Target.String(),
	}
}
