package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// passConnect4 loads a cgroup/connect4 program that lets every connect
// through unchanged: for our rules, what an older nsredirect's program on
// maps of its own amounts to.
func passConnect4(t *testing.T) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "test_pass4",
		Type:         ebpf.CGroupSockAddr,
		AttachType:   ebpf.AttachCGroupInet4Connect,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

func progID(t *testing.T, p *ebpf.Program) int {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return int(id)
}

func pinnedProgID(t *testing.T, path string) int {
	t.Helper()
	p, err := ebpf.LoadPinnedProgram(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	return progID(t, p)
}

// TestForeignProgramOnOurLinkSwappedBack (the mixed-version window): an
// older nsredirect, restarted after a migration, link.Updates its programs
// onto our pinned links (still attached, so "is it attached?" never
// notices) and may pin its program where ours was. The running daemon's
// next resync puts our program back, logs and counts it, and the redirect
// works again; both with our pinned program intact and with it replaced.
func TestForeignProgramOnOurLinkSwappedBack(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--metrics-addr", "127.0.0.1:0", "--remove-on-exit")
	url := testenv.MetricsURL(t, d)
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Fatalf("redirect before: %s", peer)
	}
	foreign := passConnect4(t)
	linkPin := loader.LinkPin(pin, loader.HookConnect4)
	progPin := loader.ProgPin(pin, loader.HookConnect4)
	for round, alsoPin := range []bool{false, true} {
		lnk, err := link.LoadPinnedLink(linkPin, nil)
		if err != nil {
			t.Fatal(err)
		}
		if alsoPin {
			// As a version 1 build does: its program pinned at our path.
			tmp := filepath.Join(pin, "tmp_test_prog")
			if err := foreign.Pin(tmp); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, progPin); err != nil {
				t.Fatal(err)
			}
		}
		if err := lnk.Update(foreign); err != nil {
			t.Fatalf("link.Update with a foreign program: %v", err)
		}
		lnk.Close()
		took := waitFor(t, "our program back on our connect4 link", 10*time.Second, func() bool {
			return testenv.LinkOf(t, pin, loader.HookConnect4).ProgID != progID(t, foreign)
		})
		t.Logf("round %d (foreign program also pinned: %v): ours back after %s (target: the next resync, within 2 s)", round, alsoPin, took.Round(time.Millisecond))
		if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
			t.Errorf("round %d: redirect after the swap back: %s", round, peer)
		}
		if got, pinned := testenv.LinkOf(t, pin, loader.HookConnect4).ProgID, pinnedProgID(t, progPin); got != pinned {
			t.Errorf("round %d: link runs program %d, the pinned one is %d", round, got, pinned)
		}
		_, body := testenv.HTTPGet(t, url+"/metrics")
		if v := metricValue(t, body, `nsredirect_link_repairs_total{hook="connect4"}`); v != float64(round+1) {
			t.Errorf("round %d: link repairs of connect4 = %v; want %d", round, v, round+1)
		}
	}
	if !strings.Contains(d.Output(), "not ours") {
		t.Errorf("the swap back was not logged:\n%s", d.Output())
	}
}

// TestOtherProgramsAtRootLeftAlone: a program that is not ours, attached at
// the root through a link of its own, is never touched by Heal: it stays
// attached with its program while our links are repaired around it.
func TestOtherProgramsAtRootLeftAlone(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--metrics-addr", "127.0.0.1:0", "--remove-on-exit")
	url := testenv.MetricsURL(t, d)
	other := passConnect4(t)
	otherLink, err := link.AttachCgroup(link.CgroupOptions{Path: testenv.RootCgroup(t), Attach: ebpf.AttachCGroupInet4Connect, Program: other})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { otherLink.Close() })
	// A repair of ours proves a Heal ran after the other link came.
	detachLink(t, pin, loader.HookConnect6)
	waitFor(t, "our connect6 link repaired", 10*time.Second, func() bool {
		_, body := testenv.HTTPGet(t, url+"/metrics")
		return testenv.MetricValue(body, `nsredirect_link_repairs_total{hook="connect6"}`) == 1
	})
	info, err := otherLink.Info()
	if err != nil {
		t.Fatal(err)
	}
	if cg := info.Cgroup(); cg == nil || cg.CgroupId == 0 || int(info.Program) != progID(t, other) {
		t.Errorf("the other link: attached %v, program %d; want attached with program %d", cg != nil && cg.CgroupId != 0, info.Program, progID(t, other))
	}
	_, body := testenv.HTTPGet(t, url+"/metrics")
	if v := testenv.MetricValue(body, `nsredirect_link_repairs_total{hook="connect4"}`); v > 0 {
		t.Errorf("connect4 repaired %v times; nothing of ours was wrong there", v)
	}
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("redirect beside the other program: %s", peer)
	}
}
