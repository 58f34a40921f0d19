package daemon

import "context"

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
}

// Desired returns the fixed targets.
func (f Fixed) Desired(context.Context) ([]Target, error) { return f.Targets, nil }

// Watch has nothing to follow: the targets never change, and their netns
// are re-resolved on every resync.
func (Fixed) Watch(ctx context.Context, _ func()) error {
	<-ctx.Done()
	return nil
}

// Handover keeps the rules unless RemoveOnExit.
func (f Fixed) Handover(context.Context, []string) bool { return !f.RemoveOnExit }
