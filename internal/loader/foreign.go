package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// Programs not ours on our links. The link pins (link_<hook>) are at the
// same paths in every layout, so an nsredirect older than the running one
// (a rollback, a node still on the old image), restarting after a migration,
// creates its own maps and link.Updates its programs onto our links: they
// stay attached, so a check that they are attached never notices, and every
// redirect stops. On each resync Heal compares the program each attached
// link of ours runs (its link info carries it: no extra syscall) with the
// one last found ours, and puts ours back when another is there.
//
// A program is ours when every map it uses is one of this state's maps: a
// daemon of the same layout (a rollout's new pod) puts its own instance of
// the programs on the links, on the same maps, and is left alone. When the
// pinned state itself is no longer ours (a newer nsredirect migrated it
// away), this daemon is the outdated one: it says so and changes nothing.

// ourProgram reports whether the program id uses only maps of this state,
// and remembers the answer for the hook when it does.
func (l *Loader) ourProgram(h hook, id ebpf.ProgramID) (bool, error) {
	if l.ourProg(h) == id {
		return true, nil
	}
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false, fmt.Errorf("open program %d on our %s link: %w", id, h.name, err)
	}
	defer prog.Close()
	ok, err := l.usesOurMaps(prog)
	if ok {
		l.setOurProg(h, id)
	}
	return ok, err
}

// ourProg is the program last found ours on h's link, 0 if none yet.
func (l *Loader) ourProg(h hook) ebpf.ProgramID {
	l.oursMu.Lock()
	defer l.oursMu.Unlock()
	return l.ours[h.name]
}

func (l *Loader) setOurProg(h hook, id ebpf.ProgramID) {
	l.oursMu.Lock()
	defer l.oursMu.Unlock()
	if l.ours == nil {
		l.ours = map[string]ebpf.ProgramID{}
	}
	l.ours[h.name] = id
}

// usesOurMaps reports whether every map prog uses is one of l.maps.
func (l *Loader) usesOurMaps(prog *ebpf.Program) (bool, error) {
	info, err := prog.Info()
	if err != nil {
		return false, fmt.Errorf("read program info: %w", err)
	}
	used, ok := info.MapIDs()
	if !ok {
		return false, errors.New("this kernel does not say which maps a program uses")
	}
	ours, err := l.mapIDs()
	if err != nil {
		return false, err
	}
	for _, id := range used {
		if !ours[id] {
			return false, nil
		}
	}
	return len(used) > 0, nil
}

// programMaps are the maps the programs use, by name in the object.
func (l *Loader) programMaps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"nsr_counters": l.maps.NsrCounters, "nsr_rules": l.maps.NsrRules, "nsr_sockets": l.maps.NsrSockets,
		"nsr_stats": l.maps.NsrStats, "nsr_udp_peers": l.maps.NsrUdpPeers, "nsr_peers": l.maps.NsrPeers,
	}
}

func (l *Loader) mapIDs() (map[ebpf.MapID]bool, error) {
	ids := map[ebpf.MapID]bool{}
	for name, m := range l.programMaps() {
		if m == nil {
			continue
		}
		info, err := m.Info()
		if err != nil {
			return nil, fmt.Errorf("read map %s info: %w", name, err)
		}
		if id, ok := info.ID(); ok {
			ids[id] = true
		}
	}
	return ids, nil
}

// stateStillOurs reports whether the pinned rule map is the one this
// loader holds: else another nsredirect replaced the state.
func (l *Loader) stateStillOurs() bool {
	pinned, err := ebpf.LoadPinnedMap(l.pins.mapPath(bpfobj.RedirectMapNsrRules), nil)
	if err != nil {
		return false
	}
	defer pinned.Close()
	a, errA := pinned.Info()
	b, errB := l.maps.NsrRules.Info()
	if errA != nil || errB != nil {
		return false
	}
	ida, _ := a.ID()
	idb, _ := b.ID()
	return ida == idb
}

// restoreOurs puts our program for h back on lnk, which runs program
// running, not ours. It reports whether it did.
func (l *Loader) restoreOurs(h hook, lnk link.Link, running ebpf.ProgramID) (bool, error) {
	if !l.stateStillOurs() {
		return false, fmt.Errorf("our %s link runs program %d, which another nsredirect put there, and the pinned state under %s is no longer this daemon's (a newer nsredirect migrated it?): not putting ours back; stop this outdated daemon", h.name, running, l.dir)
	}
	prog, err := l.programFor(h)
	if err != nil {
		return false, err
	}
	defer prog.Close()
	if err := lnk.Update(prog); err != nil {
		return false, fmt.Errorf("put our %s program back on our link: %w", h.name, err)
	}
	info, err := prog.Info()
	if err == nil {
		if id, ok := info.ID(); ok {
			l.setOurProg(h, id)
		}
	}
	l.log.WithFields(logrus.Fields{"hook": h.name, "foreign_prog_id": running}).Warn("our link ran a program that is not ours (an older nsredirect restarted?); put ours back")
	return true, nil
}

// programFor returns our program for h: the pinned one if it is ours (an
// older nsredirect may have pinned its own at the same path), else a new
// one on our maps, pinned in its place.
func (l *Loader) programFor(h hook) (*ebpf.Program, error) {
	if prog, err := ebpf.LoadPinnedProgram(l.pins.prog(h), nil); err == nil {
		if ok, _ := l.usesOurMaps(prog); ok {
			return prog, nil
		}
		prog.Close()
	}
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return nil, err
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: l.programMaps()})
	if err != nil {
		return nil, fmt.Errorf("load eBPF programs: %w", err)
	}
	defer coll.Close()
	prog, err := coll.Programs[h.prog].Clone()
	if err != nil {
		return nil, err
	}
	if err := pinAtomically(prog, l.pins.prog(h)); err != nil {
		prog.Close()
		return nil, err
	}
	return prog, nil
}
