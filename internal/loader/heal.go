package loader

// Healing: finding a pinned link missing, detached, defunct or running a
// program not ours (foreign.go), and putting ours back.

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// Intact reports whether the pinned programs and maps are still in place;
// `nsredirect cleanup --all` removes them from under running daemons.
func (l *Loader) Intact() error {
	paths := []string{l.pins.mapPath(recordsMap), l.pins.mapPath(bpfobj.RedirectMapNsrRules)}
	for _, h := range hooks {
		paths = append(paths, l.pins.link(h))
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			return errorOf(ErrStateRemoved, "pinned state was removed from under this daemon (%s: %v)", p, err)
		}
	}
	return nil
}

// Heal checks the pinned link of every hook and re-creates one that is
// missing, or detached or defunct (bpftool link detach, a cgroup removed
// under it), from the pinned program, at cgroup, and puts our program back
// on one that runs a program not ours (foreign.go). It returns the hooks it
// repaired. Links and programs that are not ours are never touched.
//
// It runs every second. While every link is in place and runs the program
// last found ours it takes no lock and makes two bpf(2) calls and a close
// per link (see allAttached); only a link not proven so, and the scan for
// UDP rules every udpScanEvery-th call, take the pin dir's lock and the
// closer look.
func (l *Loader) Heal(cgroup string) ([]string, error) {
	closer, scanUDP := l.healNeeds()
	if !closer {
		return nil, nil
	}
	lk, err := lockDir(l.dir, lockEx, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	cgroupID, err := inodeOf(cgroup)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	repaired, err := l.reattachDetached(hooks, cgroup, cgroupID)
	// The UDP hooks: attached while a UDP rule is live, gone otherwise.
	var udp []string
	var udpErr error
	if scanUDP {
		udp, udpErr = l.syncUDP()
	}
	return append(repaired, udp...), errors.Join(err, udpErr)
}

// healNeeds counts a heal and says what it must do: look closer at the
// links (under the lock) when the UDP scan is due or a link is not proven
// in place, and scan the rule map for UDP rules (syncUDP) every
// udpScanEvery-th heal, and on a closer look while a UDP link is pinned.
func (l *Loader) healNeeds() (closer, scanUDP bool) {
	udpPinned := l.anyUDPPinned()
	scanUDP = l.heals.Add(1)%udpScanEvery == 0
	closer = scanUDP || !l.allAttached(hooks) || udpPinned && !l.allAttached(udpHooks)
	return closer, scanUDP || closer && udpPinned
}

// allAttached reports whether the pinned link of every one of hs is
// attached and runs the program last found ours on it, by the cheap check
// (pinnedCgroupLinkAttached); false says only that one needs a closer look
// (reattachDetached, which also learns which program is ours).
func (l *Loader) allAttached(hs []hook) bool {
	for _, h := range hs {
		prog, ok := pinnedCgroupLinkAttached(l.pins.link(h), h.attach)
		if !ok || prog == 0 || prog != l.ourProg(h) {
			return false
		}
	}
	return true
}

// reattachDetached re-creates and re-pins the link of each of hs whose
// pinned link is missing, detached or defunct, puts our program back on one
// that runs another's (foreign.go), and names those it repaired.
func (l *Loader) reattachDetached(hs []hook, cgroup string, cgroupID uint64) ([]string, error) {
	var done []string
	var errs []error
	for _, h := range hs {
		ok, restored, err := pinnedLinkProgram(l.pins.link(h), func(lnk link.Link, running ebpf.ProgramID) (bool, error) {
			// Attached: is the program on it ours? (foreign.go)
			if ours, err := l.ourProgram(h, running); ours || err != nil {
				return false, err
			}
			return l.restoreOurs(h, lnk, running)
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if restored {
			done = append(done, h.name)
		}
		if ok {
			continue
		}
		if err := l.reattach(h, cgroup, cgroupID); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, h.name)
	}
	return done, errors.Join(errs...)
}

// linkAttached reports whether the pinned link at path exists and is still
// attached to a cgroup.
func linkAttached(path string) (bool, error) {
	ok, _, err := pinnedLinkProgram(path, nil)
	return ok, err
}

// pinnedLinkProgram is linkAttached that, for an attached link, also hands
// the link and the ID of the program it runs (from the same link info) to
// attached, if given, and returns what that reported.
func pinnedLinkProgram(path string, attached func(link.Link, ebpf.ProgramID) (bool, error)) (ok, did bool, err error) {
	lnk, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer lnk.Close()
	info, err := lnk.Info()
	if err != nil {
		return false, false, fmt.Errorf("read pinned link %s: %w", path, err)
	}
	cg := info.Cgroup()
	if cg == nil || cg.CgroupId == 0 {
		return false, false, nil
	}
	if attached != nil {
		did, err = attached(lnk, info.Program)
	}
	return true, did, err
}

func (l *Loader) reattach(h hook, cgroup string, cgroupID uint64) error {
	progPath := l.pins.prog(h)
	prog, err := ebpf.LoadPinnedProgram(progPath, nil)
	if err != nil {
		return fmt.Errorf("open pinned program %s: %w", progPath, err)
	}
	defer prog.Close()
	lnk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s (id %d): %w", h.name, cgroup, cgroupID, err)
	}
	defer lnk.Close()
	// The rename replaces the defunct link's pin, its last reference.
	return pinAtomically(lnk, l.pins.link(h))
}
