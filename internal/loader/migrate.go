package loader

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// migrateV1 moves the state of layout version 1 (maps at the top of the pin
// dir, enrollment records in nsr_enroll) onto this build's maps, in place,
// while connects keep being redirected:
//
//  1. the new maps are made in a staging dir; rules (given the protocol
//     byte, TCP) and records are copied;
//     the socket storage is carried over as it is, so sockets redirected
//     before keep their dialled address for getpeername;
//  2. the programs are loaded on the new maps and swapped in with
//     link.Update: up to the swap the old programs read the old, complete
//     maps, after it the new ones read the new, complete maps;
//  3. the counters are copied, the staging dir is renamed into place and
//     the old pins are removed.
//
// The pin dir is locked throughout, so no enrollment changes meanwhile. A
// failure before the rename puts the old programs back and removes the
// staging dir: the old layout stays as it was, and the next start tries
// again. A crash after it leaves old pins that the next start removes.
func (l *Loader) migrateV1(spec *ebpf.CollectionSpec, cgroup string, cgroupID uint64) (err error) {
	staging, end, err := l.beginMigration(1)
	if err != nil {
		return err
	}
	defer end(&err)

	old := map[string]*ebpf.Map{}
	defer closeAll(old)
	for _, name := range v1Maps {
		m, err := ebpf.LoadPinnedMap(l.pins.v1Map(name), nil)
		if err != nil {
			return fmt.Errorf("open %s: %w", l.pins.v1Map(name), err)
		}
		old[name] = m
	}

	repl := map[string]*ebpf.Map{}
	defer closeAll(repl)
	for name, ms := range spec.Maps {
		path := l.pins.mapIn(staging, name)
		if o := old[name]; name == bpfobj.RedirectMapNsrSockets && o != nil && ms.Compatible(o) == nil {
			m, err := o.Clone()
			if err != nil {
				return err
			}
			if err := pinAtomically(m, path); err != nil {
				m.Close()
				return err
			}
			repl[name] = m
			continue
		}
		m, err := openOrCreateMap(path, ms)
		if err != nil {
			return err
		}
		repl[name] = m
	}
	records, err := openOrCreateMap(l.pins.mapIn(staging, recordsMap), recordsSpec())
	if err != nil {
		return err
	}
	l.records = records

	nRules, err := copyV1Rules(old[bpfobj.RedirectMapNsrRules], repl[bpfobj.RedirectMapNsrRules])
	if err != nil {
		return fmt.Errorf("copy rules: %w", err)
	}
	nRecords, live, err := l.copyV1Records(old[v1EnrollMap])
	if err != nil {
		return err
	}

	// Version 1 had no UDP rules: only the UDP programs are pinned.
	err = l.switchOver(spec, repl, staging, cgroup, cgroupID, func() {
		// After the swap: counts the old programs made up to it are kept.
		if _, err := copyMap(old[bpfobj.RedirectMapNsrCounters], repl[bpfobj.RedirectMapNsrCounters]); err != nil {
			l.log.WithError(err).Warn("migration: redirect counters not carried over; they restart at zero")
		}
	})
	if err != nil {
		return err
	}
	for _, name := range v1Maps {
		_ = os.Remove(l.pins.v1Map(name))
	}
	// The maps were opened at their staging paths; their pins moved with
	// the directory, the handles stay valid.
	l.logMigrated(logrus.Fields{"from": 1, "rules": nRules, "enrollments": nRecords}, live)
	return nil
}

// beginMigration makes an empty staging dir for a migration from layout
// version from (removing what an earlier attempt that crashed left);
// end, deferred with the migration's error, removes the dir again when
// it failed and says the old layout is left as it was.
func (l *Loader) beginMigration(from int) (staging string, end func(*error), err error) {
	staging = l.pins.stagingDir()
	_ = os.RemoveAll(staging)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		return "", nil, fmt.Errorf("create %s: %w", staging, err)
	}
	return staging, func(errp *error) {
		if *errp != nil {
			_ = os.RemoveAll(staging)
			*errp = fmt.Errorf("migrate the pinned state at %s from layout version %d to %d (it is left as it was): %w", l.dir, from, layoutVersion, *errp)
		}
	}, nil
}

// logMigrated logs a migration that is done; older daemons still running
// (live, by pid) make it a warning.
func (l *Loader) logMigrated(fields logrus.Fields, live []uint32) {
	fields["pin_dir"], fields["to"] = l.dir, layoutVersion
	if len(live) > 0 {
		fields["older_daemons"] = live
		l.log.WithFields(fields).Warn("migrated the pinned state; the older daemons still running find their state gone and must be restarted with this version (their rules keep working meanwhile)")
		return
	}
	l.log.WithFields(fields).Info("migrated the pinned state to this version's layout")
}

// migrateV2 moves the state of layout version 2 (version 3 without
// nsr_peers) to this build's, in place, while connects keep being
// redirected. Every map of version 2 is carried over as it is (the same
// kernel map, pinned again under the staging dir): rules, records, counters
// and socket storage need no copy, and a daemon of version 2 still running
// keeps redirecting through them until it finds its state gone. Then, as in
// migrateV1, the programs are loaded on the maps and swapped in with
// link.Update (sock_release gets a link of its own), the staging dir is
// renamed into place and the old pins are removed. A failure before the
// rename puts the old programs back, removes what was added and leaves
// version 2 as it was.
func (l *Loader) migrateV2(spec *ebpf.CollectionSpec, cgroup string, cgroupID uint64) (err error) {
	staging, end, err := l.beginMigration(2)
	if err != nil {
		return err
	}
	defer end(&err)

	carry := func(name string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
		old := l.pins.mapIn(l.pins.v2Dir(), name)
		m, err := ebpf.LoadPinnedMap(old, nil)
		if errors.Is(err, os.ErrNotExist) {
			return openOrCreateMap(l.pins.mapIn(staging, name), ms)
		}
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", old, err)
		}
		if err := ms.Compatible(m); err != nil {
			m.Close()
			return nil, errorOf(ErrIncompatible, "pinned map %s is not the version 2 map this build knows (%v)", old, err)
		}
		if err := pinAtomically(m, l.pins.mapIn(staging, name)); err != nil {
			m.Close()
			return nil, err
		}
		return m, nil
	}
	repl := map[string]*ebpf.Map{}
	defer closeAll(repl)
	for name, ms := range spec.Maps {
		m, err := carry(name, ms)
		if err != nil {
			return err
		}
		repl[name] = m
	}
	records, err := carry(recordsMap, recordsSpec())
	if err != nil {
		return err
	}
	l.records = records
	var live []uint32
	var cookie uint64
	var raw []byte
	n := 0
	for it := records.Iterate(); it.Next(&cookie, &raw); n++ {
		if ownerAlive(l.dir, cookie) {
			if r, err := decodeRecord(raw); err == nil {
				live = append(live, r.OwnerPID)
			}
		}
	}

	if err := l.switchOver(spec, repl, staging, cgroup, cgroupID, nil); err != nil {
		return err
	}
	_ = os.RemoveAll(l.pins.v2Dir())
	l.logMigrated(logrus.Fields{"from": 2, "enrollments": n}, live)
	return nil
}

// switchOver is the end every migration shares: the programs are loaded on
// the maps in repl and swapped in on every hook, then (after the swap, while
// the old programs can be put back) afterSwap runs, if given, and the
// staging dir is renamed into place. A failure after the swap puts the old
// programs back.
func (l *Loader) switchOver(spec *ebpf.CollectionSpec, repl map[string]*ebpf.Map, staging, cgroup string, cgroupID uint64, afterSwap func()) error {
	coll, err := l.load(spec, repl)
	if err != nil {
		return err
	}
	defer coll.Close()
	b, err := l.swapPrograms(coll, cgroup, cgroupID)
	if err != nil {
		return err
	}
	defer b.close()
	if afterSwap != nil {
		afterSwap()
	}
	if err := os.Rename(staging, l.pins.stateDir()); err != nil {
		l.putBack(allHooks(), b, cgroup, cgroupID)
		return fmt.Errorf("rename %s into place: %w", staging, err)
	}
	return nil
}

// swapPrograms puts the programs of coll on every hook and returns what
// each had, for putBack should the migration fail after it (the caller
// closes it); when the swap itself fails it puts that back.
func (l *Loader) swapPrograms(coll *ebpf.Collection, cgroup string, cgroupID uint64) (before, error) {
	b := l.takeBefore(allHooks())
	for i, h := range hooks {
		if err := l.attachHook(h, coll.Programs[h.prog], cgroup, cgroupID); err != nil {
			l.putBack(hooks[:i+1], b, cgroup, cgroupID)
			b.close()
			return before{}, err
		}
	}
	if err := l.attachUDP(coll, cgroup, cgroupID); err != nil {
		l.putBack(allHooks(), b, cgroup, cgroupID)
		b.close()
		return before{}, err
	}
	return b, nil
}

// before is what the hooks had before a migration: the pinned program of
// each, and whether it had a pinned link (a UDP hook has none while no UDP
// rule is live).
type before struct {
	progs map[string]*ebpf.Program
	links map[string]bool
}

func (l *Loader) takeBefore(hs []hook) before {
	b := before{progs: map[string]*ebpf.Program{}, links: map[string]bool{}}
	for _, h := range hs {
		if p, err := ebpf.LoadPinnedProgram(l.pins.prog(h), nil); err == nil {
			b.progs[h.name] = p
		}
		if _, err := os.Lstat(l.pins.link(h)); err == nil {
			b.links[h.name] = true
		}
	}
	return b
}

func (b before) close() {
	for _, p := range b.progs {
		p.Close()
	}
}

// putBack restores the programs that were on the hooks hs before a
// migration that failed; a hook that had no link loses the one the
// migration gave it, and one the old layout did not have loses its pins.
func (l *Loader) putBack(hs []hook, b before, cgroup string, cgroupID uint64) {
	for _, h := range hs {
		p := b.progs[h.name]
		if p == nil || !b.links[h.name] {
			_ = os.Remove(l.pins.link(h))
		}
		if p == nil {
			_ = os.Remove(l.pins.prog(h))
			continue
		}
		if !b.links[h.name] {
			if err := pinAtomically(p, l.pins.prog(h)); err != nil {
				l.log.WithError(err).WithField("hook", h.name).Error("migration failed and the old program could not be pinned back")
			}
			continue
		}
		if err := l.attachHook(h, p, cgroup, cgroupID); err != nil {
			l.log.WithError(err).WithField("hook", h.name).Error("migration failed and the old program could not be put back")
		}
	}
}

// copyV1Records converts every version 1 record into the record store. It
// returns how many, and the pids of those whose owner still runs.
func (l *Loader) copyV1Records(enroll *ebpf.Map) (int, []uint32, error) {
	var cookie uint64
	var raw []byte
	var live []uint32
	n := 0
	it := enroll.Iterate()
	for it.Next(&cookie, &raw) {
		e, err := decodeV1Enrollment(raw)
		if err != nil {
			return n, live, fmt.Errorf("read version 1 enrollment %d: %w", cookie, err)
		}
		v, err := encodeRecord(e.stored())
		if err != nil {
			return n, live, err
		}
		if err := l.records.Put(cookie, v); err != nil {
			return n, live, fmt.Errorf("copy enrollment %d: %w", cookie, err)
		}
		if ownerAlive(l.dir, cookie) {
			live = append(live, e.OwnerPid)
		}
		n++
	}
	if err := it.Err(); err != nil {
		return n, live, fmt.Errorf("read version 1 enrollments: %w", err)
	}
	return n, live, nil
}

// copyV1Rules copies the rule entries of version 1, which were all TCP and
// had a zero byte where rule_key.proto now is.
func copyV1Rules(from, to *ebpf.Map) (int, error) {
	if from.KeySize() != to.KeySize() || from.ValueSize() != to.ValueSize() {
		return 0, errors.New("the rule maps' layouts differ")
	}
	var k bpfobj.RedirectRuleKey
	var v bpfobj.RedirectRuleVal
	n := 0
	it := from.Iterate()
	for it.Next(&k, &v) {
		k.Proto = ipprotoTCP
		if err := to.Put(k, v); err != nil {
			return n, err
		}
		n++
	}
	return n, it.Err()
}

// copyMap copies every entry of from into to, byte for byte (per-CPU values
// CPU by CPU).
func copyMap(from, to *ebpf.Map) (int, error) {
	if from.KeySize() != to.KeySize() || from.ValueSize() != to.ValueSize() || from.Type() != to.Type() {
		return 0, errors.New("the maps' layouts differ")
	}
	if from.Type() == ebpf.PerCPUHash || from.Type() == ebpf.PerCPUArray {
		if from.ValueSize() != 8 {
			return 0, errors.New("per-CPU values other than counters are not copied")
		}
		return copyEntries[[]uint64](from, to)
	}
	return copyEntries[[]byte](from, to)
}

// copyEntries puts every entry of from into to, reading values as V: one
// []uint64 element per CPU for per-CPU counters, the raw bytes otherwise.
func copyEntries[V any](from, to *ebpf.Map) (int, error) {
	var k []byte
	var v V
	n := 0
	it := from.Iterate()
	for it.Next(&k, &v) {
		if err := to.Put(k, v); err != nil {
			return n, err
		}
		n++
	}
	return n, it.Err()
}
