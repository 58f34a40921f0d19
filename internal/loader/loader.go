// Package loader is the mechanics of nsredirect's kernel state: it loads the
// eBPF programs, pins them with their maps and bpf_links under one bpffs
// directory, attaches once at the cgroup2 root, adopts what an earlier
// instance pinned, and writes per-netns rules. It decides nothing: which
// netns get which rules is the daemon's business.
package loader

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
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

var hooks = []hook{
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
	dir  string
	log  logrus.FieldLogger
	maps bpfobj.RedirectMaps

	mu    sync.Mutex
	owned map[uint64]*os.File // owner locks of the netns this process serves
}

// Attach loads the programs and makes sure they are attached at cgroup:
// pinned maps are reused, a pinned link gets the new program through
// link.Update (no connect() is ever missed), and a missing one is attached
// and pinned. On failure nothing new is left behind.
func Attach(dir, cgroup string, log logrus.FieldLogger) (*Loader, error) {
	if err := removeMemlock(); err != nil {
		return nil, err
	}
	lk, err := lockDir(dir, lockEx, true)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()

	l := &Loader{dir: dir, log: log, owned: map[uint64]*os.File{}}
	if err := l.attach(cgroup); err != nil {
		// Leave nothing new behind; what enrolled netns rely on stays.
		if l.maps.NsrEnroll == nil {
			l.maps.NsrEnroll, _ = ebpf.LoadPinnedMap(filepath.Join(dir, bpfobj.RedirectMapNsrEnroll), nil)
		}
		l.removeAllIfUnused()
		l.maps.Close()
		return nil, err
	}
	return l, nil
}

func (l *Loader) attach(cgroup string) error {
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return err
	}
	replacements := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range replacements {
			m.Close()
		}
	}()
	for name, ms := range spec.Maps {
		m, err := l.openOrCreateMap(name, ms)
		if err != nil {
			return err
		}
		replacements[name] = m
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replacements})
	if err != nil {
		return fmt.Errorf("load eBPF programs: %w", err)
	}
	defer coll.Close()
	if err := coll.Assign(&l.maps); err != nil {
		return err
	}
	cgroupID, err := inodeOf(cgroup)
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	for _, h := range hooks {
		if err := l.attachHook(h, coll.Programs[h.prog], cgroup, cgroupID); err != nil {
			return err
		}
	}
	return nil
}

func (l *Loader) openOrCreateMap(name string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	path := filepath.Join(l.dir, name)
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
		return nil, fmt.Errorf("create map %s: %w", name, err)
	}
	if err := pinAtomically(m, path); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func (l *Loader) attachHook(h hook, prog *ebpf.Program, cgroup string, cgroupID uint64) error {
	linkPath := filepath.Join(l.dir, "link_"+h.name)
	pinned, err := link.LoadPinnedLink(linkPath, nil)
	switch {
	case err == nil:
		defer pinned.Close()
		if info, err := pinned.Info(); err == nil {
			if cg := info.Cgroup(); cg != nil && cg.CgroupId != cgroupID {
				return fmt.Errorf("%s is attached to another cgroup (id %d) than %s; use the same --cgroup for every instance, or run `nsredirect cleanup --all`", linkPath, cg.CgroupId, cgroup)
			}
		}
		if err := pinned.Update(prog); err != nil {
			return fmt.Errorf("replace %s program in place: %w", h.name, err)
		}
		l.log.WithField("hook", h.name).Debug("adopted pinned link, program replaced in place")
	case errors.Is(err, os.ErrNotExist):
		lnk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
		if err != nil {
			return fmt.Errorf("attach %s to cgroup %s: %w", h.name, cgroup, err)
		}
		defer lnk.Close()
		if err := pinAtomically(lnk, linkPath); err != nil {
			return fmt.Errorf("%w (cgroup bpf_links need Linux >= 5.7)", err)
		}
		l.log.WithFields(logrus.Fields{"hook": h.name, "cgroup": cgroup}).Info("attached at cgroup2 root")
	default:
		return fmt.Errorf("open pinned link %s: %w", linkPath, err)
	}
	return pinAtomically(prog, filepath.Join(l.dir, "prog_"+h.name))
}

// OpenPinned opens the pinned maps for reading or cleanup, without loading
// or attaching anything.
func OpenPinned(dir string, log logrus.FieldLogger) (*Loader, error) {
	l := &Loader{dir: dir, log: log, owned: map[uint64]*os.File{}}
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return nil, err
	}
	maps := map[string]**ebpf.Map{
		bpfobj.RedirectMapNsrRules:    &l.maps.NsrRules,
		bpfobj.RedirectMapNsrCounters: &l.maps.NsrCounters,
		bpfobj.RedirectMapNsrEnroll:   &l.maps.NsrEnroll,
		bpfobj.RedirectMapNsrSockets:  &l.maps.NsrSockets,
	}
	for name, dst := range maps {
		path := filepath.Join(dir, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			l.maps.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%w at %s", ErrNotPinned, dir)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		if err := spec.Maps[name].Compatible(m); err != nil {
			m.Close()
			l.maps.Close()
			return nil, fmt.Errorf("pinned map %s was made by an incompatible nsredirect (%v); run that version's `nsredirect cleanup --all`", path, err)
		}
		*dst = m
	}
	return l, nil
}

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
	return l.maps.Close()
}

// Enroll makes the kernel redirect e.Rules in netns e.Cookie. Rules that an
// earlier owner (one that crashed, or this process) left are updated in
// place: entries that stay are never removed, so connects keep being
// redirected throughout.
func (l *Loader) Enroll(e Enrollment) error {
	specs := make([]string, len(e.Rules))
	for i, r := range e.Rules {
		specs[i] = r.String()
	}
	rec, err := newRecord(e, specs)
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
	owner, err := l.claim(e.Cookie)
	if err != nil {
		return err
	}
	var old bpfobj.RedirectEnrollment
	var oldSpecs []string
	if err := l.maps.NsrEnroll.Lookup(e.Cookie, &old); err == nil {
		oldSpecs = splitSpecs(cstring(old.Specs[:]))
		if !alreadyOurs {
			l.log.WithFields(logrus.Fields{"netns": e.Name, "cookie": e.Cookie, "previous_pid": old.OwnerPid}).Info("adopting rules left by a previous owner")
		}
	}

	added, err := l.putRules(e.Cookie, e.Rules, oldSpecs)
	if err == nil {
		if err = l.maps.NsrEnroll.Put(e.Cookie, rec); errors.Is(err, unix.E2BIG) {
			err = fmt.Errorf("enrollment map is full (%d netns): remove unused enrollments with `nsredirect cleanup`", l.maps.NsrEnroll.MaxEntries())
		} else if err != nil {
			err = fmt.Errorf("write enrollment of netns %s: %w", e.Name, err)
		}
	}
	if err != nil {
		for _, k := range added {
			_ = l.maps.NsrRules.Delete(k)
		}
		for i := len(oldSpecs); i < len(e.Rules); i++ {
			_ = l.maps.NsrCounters.Delete(bpfobj.RedirectCounterKey{NetnsCookie: e.Cookie, Index: uint32(i)})
		}
		if !alreadyOurs && oldSpecs == nil {
			l.release(e.Cookie, owner)
		}
		return err
	}
	// Only now that the new entries are in: drop what the old specs had and
	// the new ones do not.
	keep := map[bpfobj.RedirectRuleKey]bool{}
	for _, k := range ruleKeys(e.Cookie, e.Rules) {
		keep[k] = true
	}
	for _, k := range ruleKeys(e.Cookie, parseSpecs(oldSpecs)) {
		if !keep[k] {
			_ = l.maps.NsrRules.Delete(k)
		}
	}
	for i := len(e.Rules); i < len(oldSpecs); i++ {
		_ = l.maps.NsrCounters.Delete(bpfobj.RedirectCounterKey{NetnsCookie: e.Cookie, Index: uint32(i)})
	}
	return nil
}

// putRules writes the entries of rules, and their counters, and returns the
// keys that were not there before.
func (l *Loader) putRules(cookie uint64, rules []rule.Rule, oldSpecs []string) ([]bpfobj.RedirectRuleKey, error) {
	var added []bpfobj.RedirectRuleKey
	zero := make([]uint64, ebpfCPUs())
	for i, r := range rules {
		for _, x := range r.Expand() {
			k, v := ruleEntry(cookie, uint32(i), x)
			var cur bpfobj.RedirectRuleVal
			existed := l.maps.NsrRules.Lookup(k, &cur) == nil
			if err := l.maps.NsrRules.Put(k, v); err != nil {
				if errors.Is(err, unix.E2BIG) {
					return added, fmt.Errorf("rule map is full (%d entries): remove unused enrollments with `nsredirect cleanup`", l.maps.NsrRules.MaxEntries())
				}
				return added, fmt.Errorf("write rule %s: %w", r, err)
			}
			if !existed {
				added = append(added, k)
			}
		}
		ck := bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: uint32(i)}
		flag := ebpf.UpdateNoExist
		if i >= len(oldSpecs) || oldSpecs[i] != r.String() {
			flag = ebpf.UpdateAny // a different rule at this index starts at zero
		}
		if err := l.maps.NsrCounters.Update(ck, zero, flag); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
			return added, fmt.Errorf("create counter of rule %s: %w", r, err)
		}
	}
	return added, nil
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
	return l.unenroll(cookie)
}

func (l *Loader) unenroll(cookie uint64) error {
	var old bpfobj.RedirectEnrollment
	if err := l.maps.NsrEnroll.Lookup(cookie, &old); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("read enrollment %d: %w", cookie, err)
	}
	specs := splitSpecs(cstring(old.Specs[:]))
	for _, k := range ruleKeys(cookie, parseSpecs(specs)) {
		if err := l.maps.NsrRules.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete rule of netns %d: %w", cookie, err)
		}
	}
	for i := range max(len(specs), rule.MaxPerTarget) {
		_ = l.maps.NsrCounters.Delete(bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: uint32(i)})
	}
	if err := l.maps.NsrEnroll.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
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
	paths := []string{filepath.Join(l.dir, bpfobj.RedirectMapNsrEnroll), filepath.Join(l.dir, bpfobj.RedirectMapNsrRules)}
	for _, h := range hooks {
		paths = append(paths, filepath.Join(l.dir, "link_"+h.name))
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
		var rec bpfobj.RedirectEnrollment
		if l.maps.NsrEnroll.Lookup(cookie, &rec) == nil {
			return nil, fmt.Errorf("%w: pid %d serves %q (cookie %d); stop it first, or give this instance another netns", ErrBusy, rec.OwnerPid, cstring(rec.Name[:]), cookie)
		}
		return nil, fmt.Errorf("%w (cookie %d)", ErrBusy, cookie)
	}
	if err != nil {
		return nil, err
	}
	l.owned[cookie] = f
	return f, nil
}

// release drops an owner lock taken for an enrollment that failed.
func (l *Loader) release(cookie uint64, f *os.File) {
	f.Close()
	delete(l.owned, cookie)
	_ = os.Remove(ownerPath(l.dir, cookie))
}

// Records reads every enrollment in the pinned state.
func (l *Loader) Records() ([]Record, error) {
	lk, err := lockDir(l.dir, lockSh, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	return l.records()
}

func (l *Loader) records() ([]Record, error) {
	var out []Record
	var cookie uint64
	var raw bpfobj.RedirectEnrollment
	it := l.maps.NsrEnroll.Iterate()
	for it.Next(&cookie, &raw) {
		specs := splitSpecs(cstring(raw.Specs[:]))
		r := Record{
			Enrollment: Enrollment{
				Cookie:   cookie,
				NetnsIno: raw.NetnsIno,
				Name:     cstring(raw.Name[:]),
				Owner:    cstring(raw.Owner[:]),
				Rules:    parseSpecs(specs),
			},
			OwnerPID:   raw.OwnerPid,
			OwnerAlive: ownerAlive(l.dir, cookie),
			Enrolled:   time.Unix(0, int64(raw.EnrolledUnixNs)),
			Specs:      specs,
			Redirects:  make([]uint64, len(specs)),
		}
		for i := range specs {
			r.Redirects[i] = l.counter(cookie, i)
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
	var sum uint64
	for _, n := range perCPU {
		sum += n
	}
	return sum
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
		for _, h := range hooks {
			lnk, err := link.LoadPinnedLink(filepath.Join(l.dir, "link_"+h.name), nil)
			if err != nil {
				return r, fmt.Errorf("%s program is not attached (%v); restart the daemon", h.name, err)
			}
			lnk.Close()
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
	recs, err := l.records()
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
	if sweep {
		l.removeAllIfUnused()
	}
	return removed, nil
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

func (l *Loader) removeAllIfUnused() bool {
	var k uint64
	var v bpfobj.RedirectEnrollment
	if l.maps.NsrEnroll != nil && l.maps.NsrEnroll.Iterate().Next(&k, &v) {
		return false
	}
	// Links first: unpinning the last reference to a link detaches it.
	for _, h := range hooks {
		_ = os.Remove(filepath.Join(l.dir, "link_"+h.name))
		_ = os.Remove(filepath.Join(l.dir, "prog_"+h.name))
	}
	for _, name := range []string{bpfobj.RedirectMapNsrRules, bpfobj.RedirectMapNsrCounters, bpfobj.RedirectMapNsrSockets, bpfobj.RedirectMapNsrEnroll} {
		_ = os.Remove(filepath.Join(l.dir, name))
	}
	if entries, err := os.ReadDir(filepath.Join(l.dir, ownersDir)); err == nil {
		for _, e := range entries {
			_ = os.Remove(filepath.Join(l.dir, ownersDir, e.Name()))
		}
	}
	_ = os.Remove(filepath.Join(l.dir, ownersDir))
	if err := os.Remove(l.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		l.log.WithError(err).Warn("pin dir not removed: it holds files that are not ours")
	}
	l.log.WithField("pin_dir", l.dir).Info("last instance out: detached and unpinned everything")
	return true
}

func ruleEntry(cookie uint64, index uint32, x rule.Expansion) (bpfobj.RedirectRuleKey, bpfobj.RedirectRuleVal) {
	k := bpfobj.RedirectRuleKey{NetnsCookie: cookie, Port: htons(x.Match.Port)}
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

func newRecord(e Enrollment, specs []string) (bpfobj.RedirectEnrollment, error) {
	var rec bpfobj.RedirectEnrollment
	joined := strings.Join(specs, ",")
	if len(joined) >= len(rec.Specs) {
		return rec, fmt.Errorf("%w: specs %q are longer than %d bytes; use fewer rules for one netns", rule.ErrSpec, joined, len(rec.Specs)-1)
	}
	rec.NetnsIno = e.NetnsIno
	rec.EnrolledUnixNs = uint64(time.Now().UnixNano())
	rec.OwnerPid = uint32(os.Getpid())
	rec.RuleCount = uint32(len(specs))
	putCString(rec.Owner[:], e.Owner)
	putCString(rec.Name[:], e.Name)
	putCString(rec.Specs[:], joined)
	return rec, nil
}

func splitSpecs(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// parseSpecs parses specs this package wrote itself; one it cannot parse
// (from a newer version) is skipped rather than failing cleanup.
func parseSpecs(specs []string) []rule.Rule {
	out := make([]rule.Rule, 0, len(specs))
	for _, s := range specs {
		if r, err := rule.Parse(s); err == nil {
			out = append(out, r)
		}
	}
	return out
}

func cstring(b []int8) string {
	buf := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		buf = append(buf, byte(c))
	}
	return string(bytes.ToValidUTF8(buf, []byte("?")))
}

// putCString copies s, truncated, leaving a NUL at the end.
func putCString(dst []int8, s string) {
	for i := 0; i < len(s) && i < len(dst)-1; i++ {
		dst[i] = int8(s[i])
	}
}

// RemoveOrphans removes enrollments that mode owner left behind when its
// process died and that keep does not claim: a discovery mode calls it after
// its first full listing, so a netns that went away while no daemon ran does
// not keep rules. Enrollments of live owners and of other modes are never
// touched.
func (l *Loader) RemoveOrphans(owner string, keep func(Record) bool) ([]Record, error) {
	return l.removeWhere(func(r Record) bool { return r.Owner == owner && !r.OwnerAlive && !keep(r) }, false)
}

// MapFill is how full one pinned map is.
type MapFill struct {
	Name              string
	Entries, Capacity int
}

// Fill counts the entries of the rule, counter and enrollment maps.
func (l *Loader) Fill() ([]MapFill, error) {
	maps := []struct {
		name string
		m    *ebpf.Map
	}{{"rules", l.maps.NsrRules}, {"counters", l.maps.NsrCounters}, {"enrollments", l.maps.NsrEnroll}}
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

// PeerStorageFailures counts connects that were redirected but whose
// dialled address could not be stored for getpeername.
// TODO(kernel state): read the per-CPU failure counter once the programs
// keep one.
func (l *Loader) PeerStorageFailures() (uint64, error) { return 0, nil }

// Heal checks the pinned link of every hook and re-creates one that is
// missing, or detached or defunct (bpftool link detach, a cgroup removed
// under it), from the pinned program, at cgroup. It returns the hooks it
// repaired. Links and programs that are not ours are never touched.
func (l *Loader) Heal(cgroup string) ([]string, error) {
	lk, err := lockDir(l.dir, lockEx, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	cgroupID, err := inodeOf(cgroup)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	var repaired []string
	var errs []error
	for _, h := range hooks {
		ok, err := linkAttached(filepath.Join(l.dir, "link_"+h.name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ok {
			continue
		}
		if err := l.reattach(h, cgroup, cgroupID); err != nil {
			errs = append(errs, err)
			continue
		}
		repaired = append(repaired, h.name)
	}
	return repaired, errors.Join(errs...)
}

// linkAttached reports whether the pinned link at path exists and is still
// attached to a cgroup.
func linkAttached(path string) (bool, error) {
	lnk, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer lnk.Close()
	info, err := lnk.Info()
	if err != nil {
		return false, fmt.Errorf("read pinned link %s: %w", path, err)
	}
	cg := info.Cgroup()
	return cg != nil && cg.CgroupId != 0, nil
}

func (l *Loader) reattach(h hook, cgroup string, cgroupID uint64) error {
	progPath := filepath.Join(l.dir, "prog_"+h.name)
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
	return pinAtomically(lnk, filepath.Join(l.dir, "link_"+h.name))
}
