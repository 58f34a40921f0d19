package loader

// Enrollment: writing the entries of a netns into the kernel maps, updating
// them in place, and removing them again, under the netns's owner lock.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/entry"
)

// Enroll makes the kernel redirect e.Rules in netns e.Cookie. Rules that an
// earlier owner (one that crashed, or this process) left are updated in
// place: entries that stay are never removed, so connects keep being
// redirected throughout. On failure the kernel is left exactly as it was:
// entries it overwrote get their old values back, counters too, and an
// owner lock it took is given up.
func (l *Loader) Enroll(e Enrollment) error {
	rec, err := encodeRecord(newStoredRecord(e, os.Getpid(), time.Now()))
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
	if err == nil && entry.HasUDP(e.Rules) {
		// The UDP hooks go on before the first UDP entry is in.
		_, err = l.syncUDPFor(true)
	}
	if err == nil {
		var w written
		w, err = l.putRules(e.Cookie, e.Rules, before)
		if err == nil {
			if err = l.records.Put(e.Cookie, rec); errors.Is(err, unix.E2BIG) {
				err = &MapFullError{Map: "enrollment", Capacity: int(l.records.MaxEntries()), Unit: "netns"}
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
	want := wantedEntries(e.Cookie, e.Rules)
	for k := range before.rules {
		if _, ok := want[k]; !ok {
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

// putRules writes the entries of rules, and their counters, rule by rule.
// A counter is kept when the kernel held exactly the entries of its rule
// under its index before (a restart, an unchanged rule) and starts at zero
// otherwise: the keys decide, not the labels.
func (l *Loader) putRules(cookie uint64, rules []entry.Rule, before cookieState) (written, error) {
	var w written
	zero := make([]uint64, ebpfCPUs())
	held := before.entriesByIndex()
	for i, r := range rules {
		for _, x := range r.Entries {
			k, v := ruleEntry(cookie, uint32(i), x)
			if cur, ok := before.rules[k]; ok && cur == v {
				continue
			}
			if err := l.maps.NsrRules.Put(k, v); err != nil {
				if errors.Is(err, unix.E2BIG) {
					return w, &MapFullError{Map: "rule", Capacity: int(l.maps.NsrRules.MaxEntries()), Unit: "entries"}
				}
				return w, fmt.Errorf("write rule %s: %w", r.Label, err)
			}
			w.rules = append(w.rules, k)
		}
		_, had := before.counters[uint32(i)]
		if had && sameEntries(held[uint32(i)], ruleEntries(cookie, uint32(i), r)) {
			continue
		}
		ck := bpfobj.RedirectCounterKey{NetnsCookie: cookie, Index: uint32(i)}
		if err := l.maps.NsrCounters.Put(ck, zero); err != nil {
			if errors.Is(err, unix.E2BIG) {
				return w, &MapFullError{Map: "counter", Capacity: int(l.maps.NsrCounters.MaxEntries()), Unit: "entries"}
			}
			return w, fmt.Errorf("create counter of rule %s: %w", r.Label, err)
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
			return nil, fmt.Errorf("%w: %s serves %q (cookie %d)", ErrBusy, who, rec.Name, cookie)
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

func ruleEntry(cookie uint64, index uint32, x entry.Entry) (bpfobj.RedirectRuleKey, bpfobj.RedirectRuleVal) {
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

// ruleEntries is what rule r writes into the rule map at index.
func ruleEntries(cookie uint64, index uint32, r entry.Rule) map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal {
	out := make(map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal, len(r.Entries))
	for _, x := range r.Entries {
		k, v := ruleEntry(cookie, index, x)
		out[k] = v
	}
	return out
}

// wantedEntries is what the rule map holds for cookie once rules are
// enrolled: a later rule's entry replaces an earlier one's of the same key,
// as the writes do.
func wantedEntries(cookie uint64, rules []entry.Rule) map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal {
	want := map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal{}
	for i, r := range rules {
		for k, v := range ruleEntries(cookie, uint32(i), r) {
			want[k] = v
		}
	}
	return want
}

// sameEntries reports whether the kernel held exactly the entries want.
func sameEntries(held, want map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal) bool {
	if len(held) != len(want) {
		return false
	}
	for k, v := range want {
		if cur, ok := held[k]; !ok || cur != v {
			return false
		}
	}
	return true
}

// entryCounts is how many entries of each rule the rule map holds once
// rules are enrolled, for Live to find one missing.
func entryCounts(cookie uint64, rules []entry.Rule) []int {
	n := make([]int, len(rules))
	for _, v := range wantedEntries(cookie, rules) {
		n[v.Index]++
	}
	return n
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
