package loader

// Loading the programs and putting them on the hooks at the cgroup2 root:
// a fresh start, the adoption of what an earlier instance pinned (migrate.go
// for an older layout), and opening the pinned state to read it.

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// Attach loads the programs and makes sure they are attached at cgroup:
// pinned maps are reused (an older layout is migrated onto new ones), a
// pinned link gets the new program through link.Update (no connect() is ever
// missed), and a missing, detached or defunct one is attached and pinned
// anew. On failure nothing new is left behind.
func Attach(dir, cgroup string, log logrus.FieldLogger) (*Loader, error) {
	if err := removeMemlock(); err != nil {
		return nil, err
	}
	lk, err := lockDir(dir, lockEx, true)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()

	l := newLoader(dir, log)
	l.cgroup = cgroup
	if err := l.attach(cgroup); err != nil {
		// Leave nothing new behind; what enrolled netns rely on stays.
		l.removeAllIfUnused()
		l.closeMaps()
		return nil, err
	}
	return l, nil
}

type layout int

const (
	layoutNone layout = iota
	layoutV1
	layoutV2
	layoutCurrent
)

func (l *Loader) layout() layout {
	if _, err := os.Stat(l.pins.stateDir()); err == nil {
		return layoutCurrent
	}
	if _, err := os.Stat(l.pins.mapIn(l.pins.v2Dir(), recordsMap)); err == nil {
		return layoutV2
	}
	if _, err := os.Stat(l.pins.v1Map(v1EnrollMap)); err == nil {
		return layoutV1
	}
	return layoutNone
}

func (l *Loader) attach(cgroup string) error {
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return err
	}
	cgroupID, err := inodeOf(cgroup)
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	switch l.layout() {
	case layoutV1:
		return l.migrateV1(spec, cgroup, cgroupID)
	case layoutV2:
		return l.migrateV2(spec, cgroup, cgroupID)
	}
	if err := os.MkdirAll(l.pins.stateDir(), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", l.pins.stateDir(), err)
	}
	repl, err := l.openState(spec, l.pins.stateDir())
	if err != nil {
		return err
	}
	defer closeAll(repl)
	coll, err := l.load(spec, repl)
	if err != nil {
		return err
	}
	defer coll.Close()
	for _, h := range hooks {
		if err := l.attachHook(h, coll.Programs[h.prog], cgroup, cgroupID); err != nil {
			return err
		}
	}
	if err := l.attachUDP(coll, cgroup, cgroupID); err != nil {
		return err
	}
	// A migration that crashed after renaming its new state into place
	// left the old maps: nothing uses them any more.
	for _, name := range v1Maps {
		_ = os.Remove(l.pins.v1Map(name))
	}
	_ = os.RemoveAll(l.pins.v2Dir())
	_ = os.RemoveAll(l.pins.v2StagingDir())
	_ = os.RemoveAll(l.pins.stagingDir())
	return nil
}

// openState opens or creates, under stateDir, every map of spec and the
// record store; l.records is set, the program maps are returned for
// MapReplacements.
func (l *Loader) openState(spec *ebpf.CollectionSpec, stateDir string) (map[string]*ebpf.Map, error) {
	repl := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		m, err := openOrCreateMap(l.pins.mapIn(stateDir, name), ms)
		if err != nil {
			closeAll(repl)
			return nil, err
		}
		repl[name] = m
	}
	records, err := openOrCreateMap(l.pins.mapIn(stateDir, recordsMap), recordsSpec())
	if err != nil {
		closeAll(repl)
		return nil, err
	}
	l.records = records
	return repl, nil
}

// load makes the programs, on the maps in repl, and keeps the maps in l.
func (l *Loader) load(spec *ebpf.CollectionSpec, repl map[string]*ebpf.Map) (*ebpf.Collection, error) {
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return nil, fmt.Errorf("load eBPF programs: %w", err)
	}
	if err := coll.Assign(&l.maps); err != nil {
		coll.Close()
		return nil, err
	}
	return coll, nil
}

func closeAll(ms map[string]*ebpf.Map) {
	for _, m := range ms {
		m.Close()
	}
}

func (l *Loader) closeMaps() {
	l.maps.Close()
	if l.records != nil {
		l.records.Close()
	}
}

func openOrCreateMap(path string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	switch {
	case err == nil:
		if err := ms.Compatible(m); err != nil {
			m.Close()
			return nil, errorOf(ErrIncompatible, "pinned map %s was made by an incompatible nsredirect (%v)", path, err)
		}
		return m, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	m, err = ebpf.NewMap(ms)
	if err != nil {
		return nil, fmt.Errorf("create map %s: %w", ms.Name, err)
	}
	if err := pinAtomically(m, path); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// attachHook puts prog on the pinned link of h: through link.Update when
// the link is attached, so no connect() misses the rewrite; a link that is
// missing, detached (bpftool link detach) or defunct (its cgroup gone) is
// replaced by a new one at cgroup.
func (l *Loader) attachHook(h hook, prog *ebpf.Program, cgroup string, cgroupID uint64) error {
	linkPath := l.pins.link(h)
	pinned, err := link.LoadPinnedLink(linkPath, nil)
	switch {
	case err == nil:
		replaced, err := l.updatePinned(h, pinned, prog, cgroup, cgroupID)
		pinned.Close()
		if err != nil {
			return err
		}
		if !replaced {
			if err := l.attachNew(h, prog, cgroup); err != nil {
				return err
			}
			l.repaired = append(l.repaired, h.name)
		}
	case errors.Is(err, os.ErrNotExist):
		if err := l.attachNew(h, prog, cgroup); err != nil {
			return err
		}
	default:
		return fmt.Errorf("open pinned link %s: %w", linkPath, err)
	}
	return pinAtomically(prog, l.pins.prog(h))
}

// updatePinned replaces the program of an attached pinned link; false means
// the link is detached or defunct and needs a new one.
func (l *Loader) updatePinned(h hook, pinned link.Link, prog *ebpf.Program, cgroup string, cgroupID uint64) (bool, error) {
	linkPath := l.pins.link(h)
	if info, err := pinned.Info(); err == nil {
		if cg := info.Cgroup(); cg != nil {
			if cg.CgroupId == 0 {
				l.log.WithField("hook", h.name).Warn("pinned link is detached; attaching a new one")
				return false, nil
			}
			if cg.CgroupId != cgroupID {
				return false, errorOf(ErrOtherCgroup, "%s is attached to another cgroup (id %d) than %s", linkPath, cg.CgroupId, cgroup)
			}
		}
	}
	if err := pinned.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) {
			l.log.WithField("hook", h.name).Warn("pinned link is defunct; attaching a new one")
			return false, nil
		}
		return false, fmt.Errorf("replace %s program in place: %w", h.name, err)
	}
	l.log.WithField("hook", h.name).Debug("adopted pinned link, program replaced in place")
	return true, nil
}

func (l *Loader) attachNew(h hook, prog *ebpf.Program, cgroup string) error {
	lnk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", h.name, cgroup, err)
	}
	defer lnk.Close()
	// The rename replaces a defunct link's pin, its last reference.
	if err := pinAtomically(lnk, l.pins.link(h)); err != nil {
		return fmt.Errorf("%w (cgroup bpf_links need Linux >= 5.7)", err)
	}
	l.log.WithFields(logrus.Fields{"hook": h.name, "cgroup": cgroup}).Info("attached at cgroup2 root")
	return nil
}

// OpenPinned opens the pinned maps for reading or cleanup, without loading
// or attaching anything.
func OpenPinned(dir string, log logrus.FieldLogger) (*Loader, error) {
	l := newLoader(dir, log)
	switch l.layout() {
	case layoutNone:
		return nil, fmt.Errorf("%w at %s", ErrNotPinned, dir)
	case layoutV1, layoutV2:
		return nil, errorOf(ErrOlderLayout, "the state pinned at %s has layout version %d (an older nsredirect)", dir, l.layout())
	}
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return nil, err
	}
	open := func(name string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
		path := l.pins.mapPath(name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%w at %s (%s is missing)", ErrNotPinned, dir, path)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		if err := ms.Compatible(m); err != nil {
			m.Close()
			return nil, errorOf(ErrIncompatible, "pinned map %s was made by an incompatible nsredirect (%v)", path, err)
		}
		return m, nil
	}
	maps := map[string]**ebpf.Map{
		bpfobj.RedirectMapNsrRules:    &l.maps.NsrRules,
		bpfobj.RedirectMapNsrCounters: &l.maps.NsrCounters,
		bpfobj.RedirectMapNsrSockets:  &l.maps.NsrSockets,
		bpfobj.RedirectMapNsrStats:    &l.maps.NsrStats,
		bpfobj.RedirectMapNsrPeers:    &l.maps.NsrPeers,
	}
	for name, dst := range maps {
		m, err := open(name, spec.Maps[name])
		if err != nil {
			l.closeMaps()
			return nil, err
		}
		*dst = m
	}
	if l.records, err = open(recordsMap, recordsSpec()); err != nil {
		l.closeMaps()
		return nil, err
	}
	return l, nil
}
