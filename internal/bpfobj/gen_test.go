package bpfobj

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestDepsInstallThePinnedCompiler: `make deps` installs the Debian packages
// that hold the compiler and strip tool gen.go names (clang-14 and
// llvm-strip-14, in clang-14 and llvm-14), so `make check-generate` after
// `make deps` uses that compiler, not whatever unversioned clang the
// distribution ships.
func TestDepsInstallThePinnedCompiler(t *testing.T) {
	gen, err := os.ReadFile("gen.go")
	if err != nil {
		t.Fatal(err)
	}
	makefile, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^DEB_PACKAGES :=(.*)$`).FindSubmatch(makefile)
	if m == nil {
		t.Fatal("no DEB_PACKAGES in the Makefile")
	}
	packages := map[string]bool{}
	for _, p := range strings.Fields(string(m[1])) {
		packages[p] = true
	}
	// The Debian package each versioned tool comes from.
	packageOf := func(tool string) string {
		if v, ok := strings.CutPrefix(tool, "llvm-strip-"); ok {
			return "llvm-" + v
		}
		return tool
	}
	tools := regexp.MustCompile(`-(?:cc|strip) (\S+)`).FindAllSubmatch(gen, -1)
	if len(tools) == 0 {
		t.Fatal("gen.go names no compiler")
	}
	for _, tool := range tools {
		if p := packageOf(string(tool[1])); !packages[p] {
			t.Errorf("gen.go uses %s, but make deps does not install %s (DEB_PACKAGES:%s)", tool[1], p, m[1])
		}
	}
	for _, unpinned := range []string{"clang", "llvm"} {
		if packages[unpinned] {
			t.Errorf("make deps installs unversioned %s besides the pinned one", unpinned)
		}
	}
}
