package integration

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestSelfRedirectRefused: a spec that sends a destination to itself (in
// any of its expansions) exits 2 with one line naming it, and leaves
// nothing pinned.
func TestSelfRedirectRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	for _, spec := range []string{"80=127.0.0.1:80", "127.0.0.1:80=80", "[::1]:80=[::1]:80", "127.0.0.1:80=127.0.0.1:80", "[::1]:80=80"} {
		code, stdout, stderr := runBounded(t, 20*time.Second, "run", "--netns", ns.Path, "--redirect", spec, "--pin-dir", pin)
		if code != 2 || !strings.Contains(stderr, spec) || !strings.Contains(stderr, "to itself") || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("--redirect %s: exit %d, stderr %q; want exit 2 and one line naming the spec\nstdout: %s", spec, code, stderr, stdout)
		}
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("a refused spec left the pin dir %s behind", pin)
	}
}
