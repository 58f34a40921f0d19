package loader

// Sweeping: removing enrollments a caller selects, and every pin when no
// netns is enrolled any more (the last instance out leaves nothing).

import (
	"errors"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Cleanup removes enrollments of dead owners (all of them with all) and,
// when nothing is left enrolled, every pin. It returns the removed records.
func (l *Loader) Cleanup(all bool) ([]Record, error) {
	return l.removeWhere(func(r Record) bool { return all || !r.OwnerAlive }, true)
}

// CleanupWhere is Cleanup for the enrollments match selects (the caller's
// policy, e.g. dead owners of netns that no longer exist).
func (l *Loader) CleanupWhere(match func(Record) bool) ([]Record, error) {
	return l.removeWhere(match, true)
}

// removeWhere unenrolls every record that match selects, under the lock,
// and with sweep also removes every pin if nothing is left enrolled.
func (l *Loader) removeWhere(match func(Record) bool, sweep bool) ([]Record, error) {
	lk, err := lockDir(l.dir, lockEx, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	recs, err := l.readRecords()
	if err != nil {
		return nil, err
	}
	var removed []Record
	for _, r := range recs {
		if !match(r) {
			continue
		}
		if err := l.unenroll(r.Cookie); err != nil {
			return removed, err
		}
		removed = append(removed, r)
	}
	if sweep && l.removeAllIfUnused() {
		return removed, nil
	}
	_, err = l.syncUDP()
	return removed, err
}

// RemoveWhere unenrolls every enrollment match selects and returns them.
// Records, with whether their owner is alive, are read under the pin dir's
// lock held throughout: an owner match finds dead cannot claim its netns
// meanwhile. Which enrollments go is the caller's decision (the daemon's
// orphan removal).
func (l *Loader) RemoveWhere(match func(Record) bool) ([]Record, error) {
	return l.removeWhere(match, false)
}

// RemoveAllIfUnused detaches and unpins everything when no netns is
// enrolled any more: the last instance out leaves nothing behind.
func (l *Loader) RemoveAllIfUnused() (bool, error) {
	lk, err := lockDir(l.dir, lockEx, false)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return true, nil
		}
		return false, err
	}
	defer lk.unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.removeAllIfUnused(), nil
}

// anyEnrolled reports whether some netns is enrolled, in this layout or in
// an older one not migrated yet.
func (l *Loader) anyEnrolled() bool {
	var k uint64
	var v []byte
	records := l.records
	if records == nil {
		m, err := ebpf.LoadPinnedMap(l.pins.mapPath(recordsMap), nil)
		if err == nil {
			defer m.Close()
			records = m
		}
	}
	if records != nil && records.Iterate().Next(&k, &v) {
		return true
	}
	if m, err := ebpf.LoadPinnedMap(l.pins.mapIn(l.pins.v2Dir(), recordsMap), nil); err == nil {
		defer m.Close()
		if m.Iterate().Next(&k, &v) {
			return true
		}
	}
	if m, err := ebpf.LoadPinnedMap(l.pins.v1Map(v1EnrollMap), nil); err == nil {
		defer m.Close()
		if m.Iterate().Next(&k, &v) {
			return true
		}
	}
	return false
}

func (l *Loader) removeAllIfUnused() bool {
	if l.anyEnrolled() {
		return false
	}
	// Links first: unpinning the last reference to a link detaches it.
	for _, h := range allHooks() {
		_ = os.Remove(l.pins.link(h))
		_ = os.Remove(l.pins.prog(h))
	}
	_ = os.RemoveAll(l.pins.stateDir())
	_ = os.RemoveAll(l.pins.v2Dir())
	_ = os.RemoveAll(l.pins.v2StagingDir())
	_ = os.RemoveAll(l.pins.stagingDir())
	for _, name := range v1Maps {
		_ = os.Remove(l.pins.v1Map(name))
	}
	if entries, err := os.ReadDir(l.pins.owners()); err == nil {
		for _, e := range entries {
			_ = os.Remove(filepath.Join(l.pins.owners(), e.Name()))
		}
	}
	_ = os.Remove(l.pins.owners())
	if err := os.Remove(l.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		l.log.WithError(err).Warn("pin dir not removed: it holds files that are not ours")
	}
	l.log.WithField("pin_dir", l.dir).Info("last instance out: detached and unpinned everything")
	return true
}
