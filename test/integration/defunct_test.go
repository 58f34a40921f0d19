package integration

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// makeDefunct removes the cgroup cg our links are attached at and waits
// until the kernel has made them defunct: no cgroup, and link.Update
// answering ENOLINK (not merely detached). Then it re-creates cg: a new
// cgroup at the same path, with another ID.
func makeDefunct(t *testing.T, pin, cg string) {
	t.Helper()
	waitFor(t, "the cgroup removed", 10*time.Second, func() bool {
		err := unix.Rmdir(cg)
		return err == nil || errors.Is(err, unix.ENOENT)
	})
	// The kernel releases a removed cgroup's programs from a work item.
	took := waitFor(t, "our links defunct", 10*time.Second, func() bool {
		for _, h := range testenv.Hooks {
			if linkAttachedAt(t, pin, h) {
				return false
			}
		}
		return true
	})
	t.Logf("links defunct %s after the cgroup was removed", took.Round(time.Millisecond))
	lnk, err := link.LoadPinnedLink(loader.LinkPin(pin, loader.HookConnect4), nil)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := ebpf.LoadPinnedProgram(loader.ProgPin(pin, loader.HookConnect4), nil)
	if err != nil {
		t.Fatal(err)
	}
	err = lnk.Update(prog)
	lnk.Close()
	prog.Close()
	if !errors.Is(err, unix.ENOLINK) {
		t.Fatalf("link.Update on the link of a removed cgroup: %v; want ENOLINK (defunct)", err)
	}
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
}

func linkCgroupID(t *testing.T, pin, hook string) uint64 {
	t.Helper()
	lnk, err := link.LoadPinnedLink(loader.LinkPin(pin, hook), nil)
	if err != nil {
		return 0
	}
	defer lnk.Close()
	info, err := lnk.Info()
	if err != nil || info.Cgroup() == nil {
		return 0
	}
	return info.Cgroup().CgroupId
}

// TestDefunctLinkRepaired (issue 11, item 5, the ENOLINK path): our links
// go defunct when the cgroup they are attached at goes away (ENOLINK on
// link.Update, not a detach). Under a running daemon the next resync
// re-creates every one at the cgroup as it is now, logged per hook; at
// start-up the same instead of a fatal error. The cgroup is a test one, so
// that it can be removed (the root cannot); the daemon loop is run in the
// test for that reason, as the CLI refuses a sub-cgroup.
func TestDefunctLinkRepaired(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	cg := subCgroup(t)
	l, err := loader.Attach(pin, cg, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.InfoLevel)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	src := daemon.Fixed{Targets: []daemon.Target{{Name: "n", Netns: ns.Target(), Rules: mustParse(t, "80=3210")}}}
	go func() {
		done <- daemon.Run(ctx, src, daemon.Config{Kernel: l, Cookies: testenv.Cookies(t), Owner: "run", Cgroup: cg, Resync: time.Second, Log: log})
	}()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("daemon: %v", err)
			}
		}
	}
	t.Cleanup(stop)
	logged := func(msg string) bool {
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, msg) {
				return true
			}
		}
		return false
	}
	waitFor(t, "the daemon running", 20*time.Second, func() bool { return logged("nsredirect running") })

	makeDefunct(t, pin, cg)
	newID, err := cgroupID(cg)
	if err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, "every link re-created at the new cgroup", 10*time.Second, func() bool {
		for _, h := range testenv.Hooks {
			if linkCgroupID(t, pin, h) != newID {
				return false
			}
		}
		return true
	})
	t.Logf("defunct links re-created %s after the cgroup came back (target: within 2 s, the next resync)", took.Round(time.Millisecond))
	// The daemon logs the repairs once Heal has re-created every link, so
	// the links can be seen back a moment before the lines are written.
	repairLogged := func(h string) bool {
		for _, e := range hook.AllEntries() {
			if e.Data["hook"] == h && strings.Contains(e.Message, "re-created") {
				return true
			}
		}
		return false
	}
	waitFor(t, "the repair of every link logged", 10*time.Second, func() bool {
		for _, h := range testenv.Hooks {
			if !repairLogged(h) {
				return false
			}
		}
		return true
	})
	stop() // hands the netns over: the rules stay for the next start

	makeDefunct(t, pin, cg)
	newID, err = cgroupID(cg)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := loader.Attach(pin, cg, quietLogger())
	if err != nil {
		t.Fatalf("start with defunct links: %v; want them replaced", err)
	}
	t.Cleanup(func() {
		_, _ = l2.Cleanup(true)
		l2.Close()
	})
	if got := l2.StartupRepairs(); strings.Join(got, ",") != strings.Join(testenv.Hooks, ",") {
		t.Errorf("StartupRepairs = %v; want %v", got, testenv.Hooks)
	}
	for _, h := range testenv.Hooks {
		if id := linkCgroupID(t, pin, h); id != newID {
			t.Errorf("%s: attached at cgroup id %d after the start; want %d", h, id, newID)
		}
	}
}

func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
