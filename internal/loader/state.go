package loader

// Reading the pinned state back: the entries of one netns by its cookie,
// the enrollment records with their counters, map fill and stats.

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/metrics"
)

// cookieState is every kernel entry of one netns: what the maps hold for
// its cookie, read back by iterating them.
type cookieState struct {
	rules    map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal
	counters map[uint32][]uint64
}

// entriesByIndex groups the rule entries by the index of their rule.
func (st cookieState) entriesByIndex() map[uint32]map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal {
	out := map[uint32]map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal{}
	for k, v := range st.rules {
		if out[v.Index] == nil {
			out[v.Index] = map[bpfobj.RedirectRuleKey]bpfobj.RedirectRuleVal{}
		}
		out[v.Index][k] = v
	}
	return out
}

// anyUDP reports whether some rule entry is UDP.
func (st cookieState) anyUDP() bool {
	for k := range st.rules {
		if k.Proto == ipprotoUDP {
			return true
		}
	}
	return false
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
			},
			OwnerPID:   sr.OwnerPID,
			OwnerAlive: ownerAlive(l.dir, cookie),
			Enrolled:   time.Unix(0, sr.EnrolledUnixNs),
			Labels:     sr.Specs,
			Redirects:  l.Redirects(cookie, len(sr.Specs)),
			entries:    sr.Entries,
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
// place and the programs are attached. It reads the maps by cookie: every
// rule of the record has its entries there (as many as at enrollment; at
// least one for a record of an older version), and a UDP entry needs the
// UDP hooks.
func (l *Loader) Live(cookie uint64) (Record, error) {
	recs, err := l.Records()
	if err != nil {
		return Record{}, err
	}
	for _, r := range recs {
		if r.Cookie != cookie {
			continue
		}
		st, err := l.readCookie(cookie)
		if err != nil {
			return r, err
		}
		held, udp := st.entriesByIndex(), st.anyUDP()
		for i := range r.Labels {
			want := 1
			if i < len(r.entries) {
				want = r.entries[i]
			}
			if len(held[uint32(i)]) < want {
				return r, errorOf(ErrNotLive, "rule entry for netns %q missing from the kernel map", r.Name)
			}
		}
		hs := hooks
		if udp {
			hs = allHooks()
		}
		for _, h := range hs {
			ok, err := linkAttached(l.pins.link(h))
			if err != nil || !ok {
				return r, errorOf(ErrNotLive, "%s program is not attached (%v)", h.name, err)
			}
		}
		return r, nil
	}
	return Record{}, errors.New("no rule is enrolled for this netns")
}

func splitSpecs(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// Fill counts the entries of the rule, counter and enrollment maps. The
// capacities fit together: MaxEnrollments netns with one spec that expands
// to 6 entries each fit the rule map (see NSR_MAX_RULES).
func (l *Loader) Fill() ([]metrics.MapFill, error) {
	maps := []struct {
		name string
		m    *ebpf.Map
	}{{"rules", l.maps.NsrRules}, {"counters", l.maps.NsrCounters}, {"enrollments", l.records}, {"peers", l.maps.NsrPeers}}
	out := make([]metrics.MapFill, 0, len(maps))
	for _, x := range maps {
		n, err := countKeys(x.m)
		if err != nil {
			return nil, fmt.Errorf("count entries of %s: %w", x.name, err)
		}
		out = append(out, metrics.MapFill{Map: x.name, Entries: n, Capacity: int(x.m.MaxEntries())})
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
