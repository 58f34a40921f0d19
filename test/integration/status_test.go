package integration

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// After `run` daemons stop (handing their rules over) status tells a netns
// that still exists (its rules wait for a daemon and keep redirecting) from
// one that was deleted (its rules serve nothing), in text and --json, and
// the command it names for the latter removes exactly those.
func TestStatusTellsNetnsGoneFromHandedOver(t *testing.T) {
	pin := testenv.BPFFS(t)
	kept, deleted := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, kept, ":3210")
	for _, ns := range []testenv.Netns{kept, deleted} {
		d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
		if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("stop the daemon of %s: %v\n%s", ns.Path, err, d.Output())
		}
	}
	deleted.Delete(t)

	rows := testenv.Status(t, pin)
	state := map[string]testenv.StatusRow{}
	for _, r := range rows {
		state[r.Netns] = r
	}
	if r := state[kept.Path]; r.State != "handed-over" || !r.NetnsAlive || r.Alive || r.Fix != "" {
		t.Errorf("status --json of a stopped daemon's live netns: %+v; want state handed-over, netns alive, no fix", r)
	}
	wantFix := "nsredirect cleanup --gone --pin-dir " + pin
	if r := state[deleted.Path]; r.State != "netns-gone" || r.NetnsAlive || r.Fix != wantFix {
		t.Errorf("status --json of a deleted netns: %+v; want state netns-gone, fix %q", r, wantFix)
	}
	code, text, stderr := testenv.Run(t, nil, "status", "--pin-dir", pin)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, stderr)
	}
	for _, want := range []string{"handed over, waiting for its daemon", "netns gone", "`" + wantFix + "`"} {
		if !strings.Contains(text, want) {
			t.Errorf("status text lacks %q:\n%s", want, text)
		}
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, kept.Path) && !strings.Contains(line, "handed over") ||
			strings.HasPrefix(line, deleted.Path) && !strings.Contains(line, "netns gone") {
			t.Errorf("status line in the wrong state: %q", line)
		}
	}

	// The fix, run as status prints it.
	args := strings.Fields(wantFix)[1:]
	code, out, stderr := testenv.Run(t, nil, args...)
	if code != 0 || !strings.Contains(out, "removed netns "+deleted.Path) || strings.Contains(out, kept.Path) {
		t.Fatalf("%s: exit %d\n%s%s", wantFix, code, out, stderr)
	}
	rows = testenv.Status(t, pin)
	if len(rows) != 1 || rows[0].Netns != kept.Path || rows[0].State != "handed-over" {
		t.Errorf("status after %s: %+v; want only %s, handed over", wantFix, rows, kept.Path)
	}
	// The handed-over rule still redirects.
	if got := curl(t, kept, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("after cleanup --gone the handed-over rule no longer redirects: %q", got)
	}
	if code, out, stderr := testenv.Run(t, nil, "cleanup", "--pin-dir", pin); code != 0 || !strings.Contains(out, "1 enrollment(s) removed") {
		t.Errorf("cleanup: exit %d\n%s%s", code, out, stderr)
	}
}
