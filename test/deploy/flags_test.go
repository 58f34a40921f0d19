package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// nsredirectBinary is $NSREDIRECT_BIN (make test-deploy passes bin/nsredirect)
// or a fresh build of cmd/nsredirect.
func nsredirectBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("NSREDIRECT_BIN"); bin != "" {
		return bin
	}
	bin := filepath.Join(t.TempDir(), "nsredirect")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/nsredirect")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/nsredirect: %v\n%s", err, out)
	}
	return bin
}

var flagLine = regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`)

// The flags and NSREDIRECT_* variables the DaemonSet gives the daemon (from
// deploy/kubernetes and from the chart with every optional flag set) are
// ones `nsredirect kube` defines: a renamed flag fails here, not on a node.
func TestDaemonDefinesTheManifestFlags(t *testing.T) {
	bin := nsredirectBinary(t)
	out, _ := exec.Command(bin, "kube", "--help").CombinedOutput()
	if strings.Contains(string(out), `unknown command "kube"`) {
		t.Fatalf("%s has no kube command", bin)
	}
	defined := map[string]bool{}
	for _, m := range flagLine.FindAllStringSubmatch(string(out), -1) {
		defined[m[1]] = true
	}
	if len(defined) == 0 {
		t.Fatalf("%s kube --help lists no flags:\n%s", bin, out)
	}

	base := kustomizeBundle(t, kustomizeDir)
	changed, _ := chartBundle(t, releaseName, map[string]any{"annotation": "example.com/redirect"})
	var missing []string
	for _, b := range []*bundle{base, changed} {
		c := b.daemonSet.Spec.Template.Spec.Containers[0]
		flags, err := parseArgs(c.Args)
		if err != nil {
			t.Fatal(err)
		}
		for f := range flags {
			if !defined[strings.TrimPrefix(f, "--")] {
				missing = append(missing, f)
			}
		}
		// The daemon reads NSREDIRECT_<FLAG> for every flag not given.
		for _, e := range c.Env {
			name, ok := strings.CutPrefix(e.Name, "NSREDIRECT_")
			if f := strings.ReplaceAll(strings.ToLower(name), "_", "-"); !ok || !defined[f] {
				missing = append(missing, e.Name)
			}
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		t.Errorf("the manifests set %v, which `nsredirect kube` does not define:\n%s", missing, out)
	}
}
