package cli

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// Every error of the kernel state a user can act on reaches them with what
// to do, however deep it was wrapped; a record too large is a usage error.
func TestAdviceForLoaderErrors(t *testing.T) {
	cases := []struct {
		cmd  string
		err  error
		want string
	}{
		{"docker", &loader.MapFullError{Map: "rule", Capacity: 65536, Unit: "entries"}, "rule map is full (65536 entries); remove unused enrollments with `nsredirect cleanup`"},
		{"run", loader.ErrIncompatible, "stop all instances and run `nsredirect cleanup --all`"},
		{"status", loader.ErrIncompatible, "run that version's `nsredirect cleanup --all`"},
		{"run", loader.ErrOtherCgroup, "use the same --cgroup for every instance"},
		{"status", loader.ErrOlderLayout, "start a daemon of this version to migrate it in place"},
		{"kube", loader.ErrStateRemoved, "cleanup --all"},
		{"run", loader.ErrBusy, "stop it first, or give this instance another netns"},
		{"cleanup", loader.ErrLockTimeout, "see `nsredirect status`"},
		{"run", loader.ErrRecordTooLarge, "use a shorter name or fewer rules"},
		{"check", loader.ErrNotLive, "restart its daemon"},
	}
	for _, c := range cases {
		got := withAdvice(c.cmd, fmt.Errorf("enroll netns web: %w", c.err))
		if !strings.HasPrefix(got, "enroll netns web: ") || !strings.Contains(got, c.want) {
			t.Errorf("%s: %v: %q; want it to say %q", c.cmd, c.err, got, c.want)
		}
	}
	if got := withAdvice("run", fmt.Errorf("plain")); got != "plain" {
		t.Errorf("an error with no advice: %q", got)
	}
	if code := exitCode(fmt.Errorf("enroll: %w", loader.ErrRecordTooLarge)); code != ExitUsage {
		t.Errorf("record too large: exit %d; want %d", code, ExitUsage)
	}
}
