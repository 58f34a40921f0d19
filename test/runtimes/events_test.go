//go:build runtimes

package runtimes_test

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
)

// eventLag says how long after the container's StartedAt the engine
// emitted its `start` event, which is what nsredirect acts on: the part of
// a "followed in" figure that is the engine's own (a few ms on an idle
// host, seconds under qemu TCG). find returns the container as it is now,
// after restartLatency saw it redirected. It returns "" when the engine's
// event log cannot tell.
func (e *engine) eventLag(find func() (docker.Inspected, bool)) string {
	in, ok := find()
	if !ok {
		return ""
	}
	started, err := time.Parse(time.RFC3339Nano, in.State.StartedAt)
	if err != nil {
		return ""
	}
	since := started.Add(-time.Second)
	out, err := sh(time.Minute, e.env, cliPath, "events",
		"--since", fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
		"--until", strconv.FormatInt(time.Now().Unix()+1, 10),
		"--filter", "container="+in.ID, "--filter", "event=start", "--format", "{{.TimeNano}}")
	if err != nil {
		return ""
	}
	var last int64
	for _, f := range strings.Fields(out) {
		if n, err := strconv.ParseInt(f, 10, 64); err == nil {
			last = n
		}
	}
	if last == 0 {
		return ""
	}
	return fmt.Sprintf(" (the engine's start event came %s after StartedAt)", ms(time.Unix(0, last).Sub(started)))
}
