package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// Fixed is the source of `nsredirect run`: targets given by flags.
//
// Stop versus restart: a daemon cannot tell `systemctl stop` from the first
// half of `systemctl restart`, and removing the rules on the way out
// refuses connects until the next daemon is up. So by default the rules
// outlive the daemon while its target netns lives, with the owner lock
// released, and the next daemon for that target adopts them in place (no
// connect is refused); `nsredirect cleanup` removes them, and the next
// daemon or cleanup removes those of a netns that is gone. RemoveOnExit
// (--remove-on-exit) is the other intent: the daemon's rules go with it.
type Fixed struct {
	Targets      []Target
	RemoveOnExit bool
	// AllowHostNetns lets a target be the host's netns
	// (--allow-host-netns).
	AllowHostNetns bool
}

// Policy: the targets are fixed, and may be the host's netns if allowed;
// the rules are handed over on shutdown unless RemoveOnExit.
func (f Fixed) Policy() Policy {
	keep := !f.RemoveOnExit
	return Policy{
		Fixed: true, AllowHostNetns: f.AllowHostNetns,
		Handover: func(context.Context, []string) bool { return keep },
	}
}

// Desired returns the fixed targets.
func (f Fixed) Desired(context.Context) ([]Target, error) { return f.Targets, nil }

// Watch has nothing to follow: the targets never change, and their netns
// are re-resolved on every resync.
func (Fixed) Watch(ctx context.Context, _ func()) error {
	<-ctx.Done()
	return nil
}

// ErrSameNetns: two targets given are one network namespace.
var ErrSameNetns = errors.New("one network namespace")

// Check resolves every target once, before anything is attached, so that
// bad input leaves nothing behind: each must exist, no two may be one netns
// (ErrSameNetns), and none may be the host's (ErrHostNetns, when host is
// known) unless AllowHostNetns. It returns the targets that are the host's,
// which AllowHostNetns let through. The loop makes the same host check on
// every resync; this one makes it a refusal to start.
func (f Fixed) Check(cookies netnsx.CookieReader, host *netnsx.LiveID) ([]Target, error) {
	seen := map[netnsx.LiveID]netnsx.Target{}
	var hosts []Target
	for _, t := range f.Targets {
		_, id, err := t.Netns.ResolveWith(cookies)
		if err != nil {
			return nil, err
		}
		if other, dup := seen[id.Live()]; dup {
			return nil, fmt.Errorf("%s and %s are %w", other, t.Netns, ErrSameNetns)
		}
		seen[id.Live()] = t.Netns
		if host != nil && id.IsHost(*host) {
			if !f.AllowHostNetns {
				return nil, fmt.Errorf("%s: %w", t.Netns, ErrHostNetns)
			}
			hosts = append(hosts, t)
		}
	}
	return hosts, nil
}
