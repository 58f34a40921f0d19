package loader_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus/hooks/test"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestHealChecksLinksCheaply: the per-second check without the lock proves
// an attached link of the right hook attached, and nothing else (a link of
// another hook, a missing pin, a map, a detached link); Heal re-creates the
// detached one, and is quiet while everything is in place.
func TestHealChecksLinksCheaply(t *testing.T) {
	dir := filepath.Join(testenv.BPFFS(t), "nsredirect")
	cg := testenv.RootCgroup(t)
	log, _ := test.NewNullLogger()
	l, err := loader.Attach(dir, cg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = l.RemoveAllIfUnused()
		_ = l.Close()
	})
	connect4 := filepath.Join(dir, "link_connect4")
	if !loader.LinkProvenAttached(connect4, ebpf.AttachCGroupInet4Connect) {
		t.Fatal("the attached connect4 link is not proven attached")
	}
	if loader.LinkProvenAttached(connect4, ebpf.AttachCGroupInet6Connect) {
		t.Error("the connect4 link passed for a connect6 one")
	}
	if loader.LinkProvenAttached(filepath.Join(dir, "link_nothing"), ebpf.AttachCGroupInet4Connect) {
		t.Error("a missing pin passed for an attached link")
	}
	maps, _ := filepath.Glob(filepath.Join(dir, "v*", "*"))
	if len(maps) == 0 {
		t.Fatal("no pinned map to look at")
	}
	for _, m := range maps {
		if fi, err := os.Stat(m); err == nil && !fi.IsDir() && loader.LinkProvenAttached(m, ebpf.AttachCGroupInet4Connect) {
			t.Errorf("the pinned map %s passed for an attached link", m)
		}
	}
	if repaired, err := l.Heal(cg); err != nil || len(repaired) != 0 {
		t.Fatalf("Heal with every link in place = %v, %v; want nothing repaired", repaired, err)
	}

	lnk, err := link.LoadPinnedLink(connect4, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := lnk.Detach(); err != nil {
		t.Fatal(err)
	}
	_ = lnk.Close()
	if loader.LinkProvenAttached(connect4, ebpf.AttachCGroupInet4Connect) {
		t.Fatal("a detached link passed for an attached one")
	}
	repaired, err := l.Heal(cg)
	if err != nil || !slices.Equal(repaired, []string{"connect4"}) {
		t.Fatalf("Heal after a detach = %v, %v; want connect4 repaired", repaired, err)
	}
	if !loader.LinkProvenAttached(connect4, ebpf.AttachCGroupInet4Connect) {
		t.Error("the re-created connect4 link is not proven attached")
	}
}
