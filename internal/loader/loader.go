// Package loader is the mechanics of nsredirect's kernel state: it loads the
// eBPF programs, pins them with their maps and bpf_links under one bpffs
// directory, attaches once at the cgroup2 root, adopts what an earlier
// instance pinned (migrating an older layout in place), and writes per-netns
// rules. It decides nothing: which netns get which rules is the daemon's
// business.
package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// DefaultPinDir is where state is pinned unless told otherwise.
const DefaultPinDir = "/sys/fs/bpf/nsredirect"

// ErrBusy is returned by Enroll when a live process already serves the netns.
var ErrBusy = errors.New("netns is already served by another nsredirect")

// ErrNotPinned means there is no pinned state at the pin dir.
var ErrNotPinned = errors.New("nothing pinned")

type hook struct {
	prog   string
	attach ebpf.AttachType
	name   string
}

// hooks are attached (and healed) in this order: sock_release first, so a
// record the connect programs make is never left by a socket closed before
// the program that deletes it was on.
var hooks = []hook{
	{bpfobj.RedirectProgNsrSockRelease, ebpf.AttachCgroupInetSockRelease, "sock_release"},
	{bpfobj.RedirectProgNsrConnect4, ebpf.AttachCGroupInet4Connect, "connect4"},
	{bpfobj.RedirectProgNsrConnect6, ebpf.AttachCGroupInet6Connect, "connect6"},
	{bpfobj.RedirectProgNsrGetpeername4, ebpf.AttachCgroupInet4GetPeername, "getpeername4"},
	{bpfobj.RedirectProgNsrGetpeername6, ebpf.AttachCgroupInet6GetPeername, "getpeername6"},
}

// Enrollment is what a netns is enrolled with.
type Enrollment struct {
	Cookie   uint64
	NetnsIno uint64
	// Name labels the netns in status and metrics: the target as given, a
	// container name, a pod.
	Name string
	// Owner is the mode that enrolled it (run, docker, kube); an instance
	// adopts only what its own mode left.
	Owner string
	// ID identifies the target stably across restarts, whatever its name:
	// a container ID, a pod UID, the path `run` was given.
	ID string
	// Holder names the serving daemon so that a person can find it (a pid
	// is 1 in every daemon pod): "pod kube-system/nsredirect-x7k2p",
	// "pid 1234 on host web1".
	Holder string
	Rules  []rule.Rule
}

// Record is an enrollment as read back from the pinned state.
type Record struct {
	Enrollment
	OwnerPID   uint32
	OwnerAlive bool
	Enrolled   time.Time
	Specs      []string
	// Redirects counts connects redirected per spec, summed over CPUs.
	Redirects []uint64
}

// Loader holds the pinned maps open; the programs stay alive through their
// pinned links.
type Loader struct {
	dir     string
	cgroup  string // where the programs are attached; "" when only opened
	pins    pins
	log     logrus.FieldLogger
	maps    bpfobj.RedirectMaps
	records *ebpf.Map

	mu    sync.Mutex
	owned map[uint64]*os.File // owner locks of the netns this process serves

	// repaired names the hooks whose pinned link Attach found detached or
	// defunct and replaced.
	repaired []string
	// heals counts the Heal calls (see udpScanEvery).
	heals atomic.Uint64
	// ours is, per hook, the program last found ours on its link (see
	// foreign.go); written with the pin dir locked, read by Heal's cheap
	// check without it: oursMu guards it.
	oursMu sync.Mutex
	ours   map[string]ebpf.ProgramID
}

func newLoader(dir string, log logrus.FieldLogger) *Loader {
	return &Loader{dir: dir, pins: pins{dir}, log: log, owned: map[uint64]*os.File{}}
}

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
			return nil, fmt.Errorf("pinned map %s was made by an incompatible nsredirect (%v); stop all instances and run `nsredirect cleanup --all`", path, err)
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
				return false, fmt.Errorf("%s is attached to another cgroup (id %d) than %s; use the same --cgroup for every instance, or run `nsredirect cleanup --all`", linkPath, cg.CgroupId, cgroup)
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
		return nil, fmt.Errorf("the state pinned at %s has layout version %d (an older nsredirect); start a daemon of this version to migrate it in place, or use the older version's command", dir, l.layout())
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
			return nil, fmt.Errorf("pinned map %s was made by an incompatible nsredirect (%v); run that version's `nsredirect cleanup --all`", path, err)
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

// StartupRepairs names the hooks whose pinned link Attach found detached or
// defunct and replaced with a new one, for the daemon to log and count as it
// counts the repairs of Heal.
func (l *Loader) StartupRepairs() []string { return append([]string(nil), l.repaired...) }

// Dir is the pin directory.
func (l *Loader) Dir() string { return l.dir }

// Close releases this process's handles and owner locks. Pinned state stays:
// enrolled rules keep working and a later instance adopts them.
func (l *Loader) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c, f := range l.owned {
		f.Close()
		delete(l.owned, c)
	}
	err := l.maps.Close()
	if l.records != nil {
		err = errors.Join(err, l.records.Close())
	}
	return err
}

// cookieState is every kernel entry of one netns: what the maps hold for
// its cookie, read back by iterating them.
type cookieState struct {
	rules    map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal
	counters map[uint32][]uint64
}

func (l *Loader) readCookie(cookie uint64) (cookieState, error) {
	st := cookieState{rules: map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal{}, counters: map[uint32][]uint64{}}
	if err := scanRules(l.maps.NsrRules, func(k bpfobj.RedirectRuleKey, v bpfobj.RedirectRuleVal) {
		if k.NetnsCookie == cookie {
			st.rules[k] = v
		}
	}); err != nil {
		return st, fmt.Errorf("read rules of netns %d: %w", cookie, err)
	}
	if err := scanCounters(l.maps.NsrCounters, func(k bpfobj.RedirectCounterKey, perCPU []uint64) {
		if k.NetnsCookie == cookie {
			st.counters[k.Index] = append([]uint64(nil), perCPU...)
		}
	}); err != nil {
		return st, fmt.Errorf("read counters of netns %d: %w", cookie, err)
	}
	return st, nil
}

// scanBatch is how many entries one batch lookup reads: a full rule map
// is read in 64 system calls instead of two per entry.
const scanBatch = 1024

// scanRules calls fn for every entry of the rule map, in batches, or key by
// key where the kernel refuses batch operations.
func scanRules(m *ebpf.Map, fn func(bpfobj.RedirectRuleKey, bpfobj.RedirectRuleVal)) error {
	keys := make([]bpfobj.RedirectRuleKey, scanBatch)
	vals := make([]bpfobj.RedirectRuleVal, scanBatch)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) && first {
			break // no batch support (or a bucket larger than a batch): iterate
		}
		for i := range n {
			fn(keys[i], vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
	}
	var k bpfobj.RedirectRuleKey
	var v bpfobj.RedirectRuleVal
	it := m.Iterate()
	for it.Next(&k, &v) {
		fn(k, v)
	}
	return it.Err()
}

// scanCounters is scanRules for the per-CPU counter map.
func scanCounters(m *ebpf.Map, fn func(bpfobj.RedirectCounterKey, []uint64)) error {
	cpus := ebpfCPUs()
	keys := make([]bpfobj.RedirectCounterKey, scanBatch)
	vals := make([]uint64, scanBatch*cpus)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) && first {
			break
		}
		for i := range n {
			fn(keys[i], vals[i*cpus:(i+1)*cpus])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
	}
	var k bpfobj.RedirectCounterKey
	var perCPU []uint64
	it := m.Iterate()
	for it.Next(&k, &perCPU) {
		fn(k, perCPU)
	}
	return it.Err()
}

// Enroll makes the kernel redirect e.Rules in netns e.Cookie. Rules that an
// earlier owner (one that crashed, or this process) left are updated in
// place: entries that stay are never removed, so connects keep being
// redirected throughout. On failure the kernel is left exactly as it was:
// entries it overwrote get their old values back, counters too, and an
// owner lock it took is given up.
func (l *Loader) Enroll(e Enrollment) error {
	specs := make([]string, len(e.Rules))
	for i, r := range e.Rules {
		specs[i] = r.String()
	}
	rec, err := encodeRecord(newStoredRecord(e, specs, os.Getpid(), time.Now()))
	if err != nil {
		return err
	}

	lk, err := lockDir(l.dir, lockEx, false)
	if err != nil {
		return err
	}
	defer lk.unlock()
	l.mu.Lock()
	defer l.mu.Unlock()

	alreadyOurs := l.owned[e.Cookie] != nil
	_, statErr := os.Stat(ownerPath(l.dir, e.Cookie))
	ownerDirExisted := statErr == nil
	owner, err := l.claim(e.Cookie)
	if err != nil {
		return err
	}
	old, _, hadRecord, err := lookupRecord(l.records, e.Cookie)
	if err != nil && !errors.Is(err, errRecordCorrupt) {
		if !alreadyOurs {
			l.giveUp(e.Cookie, owner, !ownerDirExisted)
		}
		return err
	}
	if hadRecord && !alreadyOurs {
		l.log.WithFields(logrus.Fields{"netns": e.Name, "cookie": e.Cookie, "previous_pid": old.OwnerPID}).Info("adopting rules left by a previous owner")
	}
	before, err := l.readCookie(e.Cookie)
	if err == nil && rule.HasUDP(e.Rules) {
		// The UDP hooks go on before the first UDP entry is in.
		_, err = l.syncUDPFor(true)
	}
	if err == nil {
		var w written
		w, err = l.putRules(e.Cookie, e.Rules, old.Specs, before)
		if err == nil {
			if err = l.records.Put(e.Cookie, rec); errors.Is(err, unix.E2BIG) {
				err = fmt.Errorf("enrollment map is full (%d netns): remove unused enrollments with `nsredirect cleanup`", l.records.MaxEntries())
			} else if err != nil {
				err = fmt.Errorf("write enrollment of netns %s: %w", e.Name, err)
			}
		}
		if err != nil {
			l.restore(e.Cookie, before, w)
		}
	}
	if err != nil {
		if !alreadyOurs {
			l.giveUp(e.Cookie, owner, !ownerDirExisted)
		}
		if _, serr := l.syncUDP(); serr != nil {
			l.log.WithError(serr).Warn("UDP hooks not brought in line with the rules")
		}
		return err
	}
	// Only now that the new entries are in: drop what was there and the new
	// rules do not have.
	want := map[bpfobj.RedirectRuleKey]bool{}
	for _, k := range ruleKeys(e.Cookie, e.Rules) {
		want[k] = true
	}
	for k := range before.rules {
		if !want[k] {
			_ = l.maps.NsrRules.Delete(k)
		}
	}
	for i := range before.counters {
		if int(i) >= len(e.Rules) {
			_ = l.maps.NsrCounters.Delete(bpfobj.RedirectCounterKey{NetnsCookie: e.Cookie, Index: i})
		}
	}
	// This netns may have held the last UDP rule of the host.
	_, err = l.syncUDP()
	return err
}

// written is what putRules wrote, for restore.
type written struct {
	rules    []bpfobj.RedirectRuleKey
	counters []uint32
}

// putRules writes the entries of rules, and their counters, spec by spec.
// A counter is kept when its index holds the same spec as before and starts
// at zero otherwise.
func (l *Loader) putRules(cookie uint64, rules []rule.Rule, oldSpecs []string, before cookieState) (written, error) {
	var w written
	zero := make([]uint64, ebpfCPUs())
	for i, r := range rules {
		for _, x := range r.Expand() {
			k, v := ruleEntry(cookie, uint32(i), x)
			if cur, ok := before.rules[k]; ok && cur == v {
				continue
			}
			if err := l.maps.NsrRules.Put(k, v); err != nil {
				if errors.Is(err, unix.E2BIG) {
					return w, fmt.Errorf("rule map is full (%d entries): remove unused enrollments with `nsredirect cleanup`", l.maps.NsrRules.MaxEntries())
				}
				return w, fmt.Errorf("write rule %s: %w", r, err)
			}
			w.rules = append(w.rules, k)
		}
		_, had := before.counters[uint32(i)]
		if had && i < len(oldSpecs) && oldSpecs[i] == r.String() {
			continue
		}
		ck := bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: uint32(i)}
		if err := l.maps.NsrCounters.Put(ck, zero); err != nil {
			if errors.Is(err, unix.E2BIG) {
				return w, fmt.Errorf("counter map is full (%d entries): remove unused enrollments with `nsredirect cleanup`", l.maps.NsrCounters.MaxEntries())
			}
			return w, fmt.Errorf("create counter of rule %s: %w", r, err)
		}
		w.counters = append(w.counters, uint32(i))
	}
	return w, nil
}

// restore puts back what w overwrote and removes what it added.
func (l *Loader) restore(cookie uint64, before cookieState, w written) {
	for _, k := range w.rules {
		if v, ok := before.rules[k]; ok {
			_ = l.maps.NsrRules.Put(k, v)
		} else {
			_ = l.maps.NsrRules.Delete(k)
		}
	}
	for _, i := range w.counters {
		ck := bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: i}
		if v, ok := before.counters[i]; ok {
			_ = l.maps.NsrCounters.Put(ck, v)
		} else {
			_ = l.maps.NsrCounters.Delete(ck)
		}
	}
}

// Unenroll removes every rule of netns cookie and gives up its ownership.
func (l *Loader) Unenroll(cookie uint64) error {
	lk, err := lockDir(l.dir, lockEx, false)
	if errors.Is(err, os.ErrNotExist) {
		return nil // `cleanup --all` removed everything already
	}
	if err != nil {
		return err
	}
	defer lk.unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.unenroll(cookie); err != nil {
		return err
	}
	_, err = l.syncUDP()
	return err
}

// unenroll deletes what the maps hold for cookie: every rule and counter key
// starts with it, so nothing is recomputed from the stored specs.
func (l *Loader) unenroll(cookie uint64) error {
	st, err := l.readCookie(cookie)
	if err != nil {
		return err
	}
	for k := range st.rules {
		if err := l.maps.NsrRules.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete rule of netns %d: %w", cookie, err)
		}
	}
	for i := range st.counters {
		ck := bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: i}
		if err := l.maps.NsrCounters.Delete(ck); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete counter of netns %d: %w", cookie, err)
		}
	}
	if err := l.records.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete enrollment %d: %w", cookie, err)
	}
	if f := l.owned[cookie]; f != nil {
		f.Close()
		delete(l.owned, cookie)
	}
	_ = os.Remove(ownerPath(l.dir, cookie))
	return nil
}

// Intact reports whether the pinned programs and maps are still in place;
// `nsredirect cleanup --all` removes them from under running daemons.
func (l *Loader) Intact() error {
	paths := []string{l.pins.mapPath(recordsMap), l.pins.mapPath(bpfobj.RedirectMapNsrRules)}
	for _, h := range hooks {
		paths = append(paths, l.pins.link(h))
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("pinned state was removed from under this daemon (%s: %v), e.g. by `nsredirect cleanup --all`; restart it to attach again", p, err)
		}
	}
	return nil
}

// Release gives up ownership of cookie but leaves its rules in the kernel,
// for a successor to adopt.
func (l *Loader) Release(cookie uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.owned[cookie]; f != nil {
		f.Close()
		delete(l.owned, cookie)
	}
}

// claim takes the owner lock of cookie unless this process holds it.
func (l *Loader) claim(cookie uint64) (*os.File, error) {
	if f := l.owned[cookie]; f != nil {
		return f, nil
	}
	f, err := claimOwner(l.dir, cookie)
	if errors.Is(err, errHeld) {
		if rec, _, ok, _ := lookupRecord(l.records, cookie); ok {
			who := fmt.Sprintf("pid %d", rec.OwnerPID)
			if rec.Holder != "" {
				who = rec.Holder
			}
			return nil, fmt.Errorf("%w: %s serves %q (cookie %d); stop it first, or give this instance another netns", ErrBusy, who, rec.Name, cookie)
		}
		return nil, fmt.Errorf("%w (cookie %d)", ErrBusy, cookie)
	}
	if err != nil {
		return nil, err
	}
	l.owned[cookie] = f
	return f, nil
}

// giveUp drops an owner lock taken for an enrollment that failed; the lock
// directory goes too when this call made it.
func (l *Loader) giveUp(cookie uint64, f *os.File, removeDir bool) {
	f.Close()
	delete(l.owned, cookie)
	if removeDir {
		_ = os.Remove(ownerPath(l.dir, cookie))
	}
}

// Records reads every enrollment in the pinned state.
func (l *Loader) Records() ([]Record, error) {
	lk, err := lockDir(l.dir, lockSh, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	return l.readRecords()
}

func (l *Loader) readRecords() ([]Record, error) {
	var out []Record
	var cookie uint64
	var raw []byte
	it := l.records.Iterate()
	for it.Next(&cookie, &raw) {
		sr, err := decodeRecord(raw)
		if err != nil {
			sr = storedRecord{Name: fmt.Sprintf("(unreadable record: %v)", err)}
		}
		r := Record{
			Enrollment: Enrollment{
				Cookie:   cookie,
				NetnsIno: sr.NetnsIno,
				Name:     sr.Name,
				Owner:    sr.Owner,
				ID:       sr.ID,
				Holder:   sr.Holder,
				Rules:    parseSpecs(sr.Specs),
			},
			OwnerPID:   sr.OwnerPID,
			OwnerAlive: ownerAlive(l.dir, cookie),
			Enrolled:   time.Unix(0, sr.EnrolledUnixNs),
			Specs:      sr.Specs,
			Redirects:  l.Redirects(cookie, len(sr.Specs)),
		}
		out = append(out, r)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read enrollments: %w", err)
	}
	return out, nil
}

// Redirects sums the per-CPU counters of each rule of cookie.
func (l *Loader) Redirects(cookie uint64, rules int) []uint64 {
	out := make([]uint64, rules)
	for i := range out {
		out[i] = l.counter(cookie, i)
	}
	return out
}

func (l *Loader) counter(cookie uint64, index int) uint64 {
	var perCPU []uint64
	if err := l.maps.NsrCounters.Lookup(bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: uint32(index)}, &perCPU); err != nil {
		return 0
	}
	return sum(perCPU)
}

func sum(perCPU []uint64) uint64 {
	var n uint64
	for _, x := range perCPU {
		n += x
	}
	return n
}

// Live reports whether every kernel entry of the enrollment of cookie is in
// place and the programs are attached.
func (l *Loader) Live(cookie uint64) (Record, error) {
	recs, err := l.Records()
	if err != nil {
		return Record{}, err
	}
	for _, r := range recs {
		if r.Cookie != cookie {
			continue
		}
		for _, k := range ruleKeys(cookie, r.Rules) {
			var v bpfobj.RedirectRuleVal
			if err := l.maps.NsrRules.Lookup(k, &v); err != nil {
				return r, fmt.Errorf("rule entry for netns %q missing from the kernel map; restart its daemon", r.Name)
			}
		}
		hs := hooks
		if rule.HasUDP(r.Rules) {
			hs = allHooks()
		}
		for _, h := range hs {
			ok, err := linkAttached(l.pins.link(h))
			if err != nil || !ok {
				return r, fmt.Errorf("%s program is not attached (%v); restart the daemon", h.name, err)
			}
		}
		return r, nil
	}
	return Record{}, errors.New("no rule is enrolled for this netns")
}

// Cleanup removes enrollments of dead owners (all of them with all) and,
// when nothing is left enrolled, every pin. It returns the removed records.
func (l *Loader) Cleanup(all bool) ([]Record, error) {
	return l.removeWhere(func(r Record) bool { return all || !r.OwnerAlive }, true)
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

// RemoveOrphans removes enrollments that mode owner left behind when its
// process died and that keep does not claim: a discovery mode calls it after
// its first full listing, so a netns that went away while no daemon ran does
// not keep rules. Enrollments of live owners and of other modes are never
// touched.
func (l *Loader) RemoveOrphans(owner string, keep func(Record) bool) ([]Record, error) {
	return l.removeWhere(func(r Record) bool { return r.Owner == owner && !r.OwnerAlive && !keep(r) }, false)
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

func ruleEntry(cookie uint64, index uint32, x rule.Expansion) (bpfobj.RedirectRuleKey, bpfobj.RedirectRuleVal) {
	k := bpfobj.RedirectRuleKey{NetnsCookie: cookie, Port: htons(x.Match.Port), Proto: protoNumber(x.Match.Proto)}
	k.Family, k.Addr = addrWords(x.Match.Addr)
	v := bpfobj.RedirectRuleVal{Port: htons(x.ToPort), Index: index}
	if x.To.IsValid() {
		_, v.Addr = addrWords(x.To)
	} else {
		v.KeepAddr = 1
	}
	return k, v
}

func ruleKeys(cookie uint64, rules []rule.Rule) []bpfobj.RedirectRuleKey {
	var keys []bpfobj.RedirectRuleKey
	for i, r := range rules {
		for _, x := range r.Expand() {
			k, _ := ruleEntry(cookie, uint32(i), x)
			keys = append(keys, k)
		}
	}
	return keys
}

// addrWords lays an address out as the kernel's user_ip4/user_ip6 words:
// network byte order in memory.
func addrWords(a netip.Addr) (uint8, [4]uint32) {
	var w [4]uint32
	if a.Is4() {
		b := a.As4()
		w[0] = nativeWord(b[:])
		return 4, w
	}
	b := a.As16()
	for i := range w {
		w[i] = nativeWord(b[i*4 : i*4+4])
	}
	return 6, w
}

func splitSpecs(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// parseSpecs parses specs for display and Live; one it cannot parse (from a
// newer version) is skipped. Nothing is ever deleted on the strength of it.
func parseSpecs(specs []string) []rule.Rule {
	out := make([]rule.Rule, 0, len(specs))
	for _, s := range specs {
		if r, err := rule.Parse(s); err == nil {
			out = append(out, r)
		}
	}
	return out
}

// MapFill is how full one pinned map is.
type MapFill struct {
	Name              string
	Entries, Capacity int
}

// Fill counts the entries of the rule, counter and enrollment maps. The
// capacities fit together: MaxEnrollments netns with one spec that expands
// to 6 entries each fit the rule map (see NSR_MAX_RULES).
func (l *Loader) Fill() ([]MapFill, error) {
	maps := []struct {
		name string
		m    *ebpf.Map
	}{{"rules", l.maps.NsrRules}, {"counters", l.maps.NsrCounters}, {"enrollments", l.records}, {"peers", l.maps.NsrPeers}}
	out := make([]MapFill, 0, len(maps))
	for _, x := range maps {
		n, err := countKeys(x.m)
		if err != nil {
			return nil, fmt.Errorf("count entries of %s: %w", x.name, err)
		}
		out = append(out, MapFill{Name: x.name, Entries: n, Capacity: int(x.m.MaxEntries())})
	}
	return out, nil
}

func countKeys(m *ebpf.Map) (int, error) {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	n := 0
	var cur any // nil: start from the first key
	for {
		if err := m.NextKey(cur, next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		copy(key, next)
		cur = key
	}
}

// PeerStorageFailures counts connects and UDP datagrams that were
// redirected but whose dialled address could not be stored (the socket
// storage allocation failed), so getpeername or recvfrom shows the target
// port, summed over CPUs.
func (l *Loader) PeerStorageFailures() (uint64, error) {
	var n uint64
	for _, stat := range []bpfobj.RedirectNsrStat{bpfobj.RedirectNsrStatNSR_STAT_PEER_STORAGE_FAIL, bpfobj.RedirectNsrStatNSR_STAT_UDP_PEER_STORAGE_FAIL} {
		var perCPU []uint64
		if err := l.maps.NsrStats.Lookup(stat, &perCPU); err != nil {
			return 0, fmt.Errorf("read the peer storage failure counter: %w", err)
		}
		n += sum(perCPU)
	}
	return n, nil
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
