package docker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// DefaultLabel carries a container's specs: nsredirect.redirect=80=3210.
const DefaultLabel = "nsredirect.redirect"

// Timings of the watch; variables of a Watcher so tests can shorten them.
const (
	// relistEvery is a safety net: a full listing even when no event came.
	relistEvery = 30 * time.Second
	// backoffMin and backoffMax bound the wait before reconnecting.
	backoffMin = 100 * time.Millisecond
	backoffMax = 5 * time.Second
)

// Watcher turns labelled containers into desired targets.
type Watcher struct {
	client *Client
	label  string
	log    logrus.FieldLogger
	// Backoff bounds the wait between reconnects to the Engine.
	BackoffMin, BackoffMax time.Duration
	// Relist is how often a full listing runs with no event: every
	// container is inspected again then, the safety net of the cache.
	Relist time.Duration

	mu sync.Mutex // guards the fields below
	// inspected caches what Inspect said of each labelled running
	// container: labels, network mode and pid do not change while it runs,
	// and every start or restart comes with an event naming it. Desired
	// inspects only the containers not in it, the ones an event named
	// (dirty), one whose cached pid is gone, and all of them after a
	// reconnection of the event stream and every tenth relist (dirtyAll).
	inspected map[string]Inspected
	dirty     map[string]bool
	dirtyAll  bool
}

// NewWatcher watches containers carrying label through c.
func NewWatcher(c *Client, label string, log logrus.FieldLogger) *Watcher {
	return &Watcher{client: c, label: label, log: log, BackoffMin: backoffMin, BackoffMax: backoffMax, Relist: relistEvery,
		inspected: map[string]Inspected{}, dirty: map[string]bool{}}
}

// invalidate makes the next Desired inspect container id again, or every
// container when id is "".
func (w *Watcher) invalidate(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if id == "" {
		w.dirtyAll = true
	} else {
		w.dirty[id] = true
	}
}

// cachedInspect returns what the cache holds for c, when it can be trusted.
func (w *Watcher) cachedInspect(id string) (Inspected, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	in, ok := w.inspected[id]
	if !ok || w.dirtyAll || w.dirty[id] {
		return Inspected{}, false
	}
	// A container restarted with no event seen: its old pid is gone.
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", in.State.Pid)); err != nil {
		return Inspected{}, false
	}
	return in, true
}

// Desired lists the running containers carrying the label and returns one
// target per container: its netns (through its pid, which the host pid
// namespace must show us) and the label's rules. A label that does not
// parse gives a target with Err set, so the daemon logs and counts it for
// that container alone.
func (w *Watcher) Desired(ctx context.Context) ([]daemon.Target, error) {
	// Dirty marks taken now: an event arriving during the listing marks
	// again, for the next Desired.
	w.mu.Lock()
	all, dirty := w.dirtyAll, w.dirty
	w.dirtyAll, w.dirty = false, map[string]bool{}
	w.mu.Unlock()
	restore := func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.dirtyAll = w.dirtyAll || all
		for id := range dirty {
			w.dirty[id] = true
		}
	}
	list, err := w.client.Running(ctx, w.label)
	if err != nil {
		restore()
		return nil, err
	}
	out := make([]daemon.Target, 0, len(list))
	fresh := make(map[string]Inspected, len(list))
	for _, c := range list {
		in, ok := Inspected{}, false
		if !all && !dirty[c.ID] {
			in, ok = w.cachedInspect(c.ID)
		}
		if !ok {
			in, err = w.client.Inspect(ctx, c.ID)
			if errors.Is(err, ErrNotFound) {
				continue // removed since the listing; its events follow
			}
			if err != nil {
				restore()
				return nil, err
			}
		}
		if !in.State.Running || in.State.Pid <= 0 {
			continue
		}
		fresh[c.ID] = in
		out = append(out, w.target(in))
	}
	w.mu.Lock()
	w.inspected = fresh // what is no longer listed leaves the cache
	w.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	sharedNetns(out)
	return out, nil
}

// sharedNetns refuses all but the first (by name) of labelled containers
// that are one netns (network_mode: container:X).
func sharedNetns(ts []daemon.Target) {
	daemon.RefuseSharedNetns(ts, func(name, first string) error {
		return fmt.Errorf("container %s shares its network namespace with %s, which is labelled too; label only one of them", name, first)
	})
}

func (w *Watcher) target(in Inspected) daemon.Target {
	name := in.Name
	if name == "" {
		name = shortID(in.ID)
	}
	t := daemon.Target{Name: name, Kind: "container", ID: in.ID}
	value := in.Config.Labels[w.label]
	rules, err := rule.ParseList(value)
	if err != nil {
		t.Err = fmt.Errorf("container %s: label %s=%q: %w; fix the label and recreate the container", name, w.label, value, err)
		return t
	}
	if in.HostConfig.NetworkMode == "host" {
		// A label must not steer the loopback connects of every process on
		// the host. Said early, with the reason; the daemon refuses any
		// target whose netns is the host's by identity all the same (a
		// container: of such a container included).
		t.Err = fmt.Errorf("container %s uses the host network namespace (network_mode: host); nsredirect docker redirects only in containers' own: remove the label, or use `nsredirect run --allow-host-netns`", name)
		return t
	}
	t.Rules = rules
	t.Netns, err = netnsx.ParseTarget(fmt.Sprintf("pid:%d", in.State.Pid))
	if err != nil {
		t.Err = fmt.Errorf("container %s: %w", name, err)
	}
	return t
}

// Watch follows the event stream until ctx ends, calling wake on every
// event, on every (re)connection (after subscribing, so nothing that
// happened while Docker restarted or the stream was down is missed) and
// every Relist. Lost connections are retried with exponential backoff. It
// returns nil when ctx ends, and never gives up otherwise.
func (w *Watcher) Watch(ctx context.Context, wake func()) error {
	backoff := w.BackoffMin
	for ctx.Err() == nil {
		began := time.Now()
		err := w.follow(ctx, wake)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(began) > 10*w.BackoffMax {
			backoff = w.BackoffMin // it was a healthy connection
		}
		w.log.WithError(err).WithField("retry_in", backoff.String()).Warn("lost the Docker event stream; reconnecting")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, w.BackoffMax)
	}
	return nil
}

// follow is one connection to the event stream.
func (w *Watcher) follow(ctx context.Context, wake func()) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	streamErr := make(chan error, 1)
	go func() {
		streamErr <- w.client.Events(ctx, w.label, func() {
			w.invalidate("") // events may have been missed while disconnected
			wake()
		}, func(ev Event) {
			w.log.WithFields(logrus.Fields{"container": ev.Actor.Attributes["name"], "event": ev.Action}).Debug("docker event")
			w.invalidate(ev.Actor.ID)
			wake()
		})
	}()
	relist := time.NewTicker(w.Relist)
	defer relist.Stop()
	ticks := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-streamErr:
			if err == nil {
				err = errors.New("event stream ended")
			}
			return err
		case <-relist.C:
			// The listing finds what events missed; every tenth also
			// inspects every container again.
			if ticks++; ticks%10 == 0 {
				w.invalidate("")
			}
			wake()
		}
	}
}

// Policy: the daemon's defaults (the listing names every container of the
// mode, so orphans are told by it; a container in the host's netns is
// refused), and the rules of the containers still running at shutdown (the
// daemon has just listed them) are handed over: recreating the nsredirect
// container then refuses no connection, while `compose down`, which stops
// the labelled containers first, leaves nothing behind.
func (w *Watcher) Policy() daemon.Policy {
	return daemon.Policy{Handover: func(context.Context, []string) bool { return true }}
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
