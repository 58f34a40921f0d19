package cli

import (
	"testing"

	"github.com/nsredirect/nsredirect/internal/loader"
)

func TestEnrollmentState(t *testing.T) {
	for _, tc := range []struct {
		ownerAlive, netnsAlive bool
		want, text             string
	}{
		{true, true, stateAlive, "alive"},
		{true, false, stateAlive, "alive"}, // its owner decides, cleanup --gone leaves it
		{false, true, stateHandedOver, "handed over, waiting for its daemon"},
		{false, false, stateNetnsGone, "netns gone"},
	} {
		got := enrollmentState(loader.Record{OwnerAlive: tc.ownerAlive}, tc.netnsAlive)
		if got != tc.want || stateText(got) != tc.text {
			t.Errorf("owner alive %v, netns alive %v: %q (%q); want %q (%q)", tc.ownerAlive, tc.netnsAlive, got, stateText(got), tc.want, tc.text)
		}
	}
	if got := cleanupGoneCmd(loader.DefaultPinDir); got != "nsredirect cleanup --gone" {
		t.Errorf("fix for the default pin dir: %q", got)
	}
	if got := cleanupGoneCmd("/sys/fs/bpf/x"); got != "nsredirect cleanup --gone --pin-dir /sys/fs/bpf/x" {
		t.Errorf("fix for another pin dir: %q", got)
	}
}
