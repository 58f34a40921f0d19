package loader

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
)

// The enrollment records: who enrolled a netns and with what. Only userspace
// reads them (status, adoption, metrics labels), so they are not part of the
// programs' object: a hash map created here, pinned so that it outlives the
// daemon, keyed by netns cookie, whose value is a length-prefixed JSON
// document. A field added later is read as its zero value by older code and
// changes nothing in the map's layout.
const (
	// MaxEnrollments is how many netns can be enrolled at once; see
	// NSR_MAX_RULES in bpf/redirect.c for how it fits the rule map.
	MaxEnrollments = 8192
	// recordValueSize bounds one encoded record: ample for a container ID,
	// a pod UID, a path, a name and 16 specs. The map does not preallocate,
	// so only enrolled netns take memory.
	recordValueSize = 2048
)

// storedRecord is the JSON of one record.
type storedRecord struct {
	NetnsIno uint64 `json:"netns_ino"`
	Name     string `json:"name"`
	Owner    string `json:"owner"`
	ID       string `json:"id,omitempty"`
	Holder   string `json:"holder,omitempty"`
	// Specs are the labels of the rules (older versions parsed them).
	Specs []string `json:"specs"`
	// Entries counts the kernel entries of each rule (see Live).
	Entries  []int  `json:"entries,omitempty"`
	OwnerPID uint32 `json:"owner_pid"`
	// EnrolledUnixNs is when the netns was enrolled, in ns since the epoch.
	EnrolledUnixNs int64 `json:"enrolled_unix_ns"`
}

func recordsSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{
		Name:       recordsMap,
		Type:       ebpf.Hash,
		KeySize:    8,
		ValueSize:  recordValueSize,
		MaxEntries: MaxEnrollments,
		Flags:      1, // BPF_F_NO_PREALLOC
	}
}

func encodeRecord(r storedRecord) ([]byte, error) {
	doc, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	if len(doc) > recordValueSize-4 {
		return nil, errorOf(ErrRecordTooLarge, "the enrollment record of %q takes %d bytes, more than the %d one record holds", r.Name, len(doc), recordValueSize-4)
	}
	v := make([]byte, recordValueSize)
	binary.LittleEndian.PutUint32(v, uint32(len(doc)))
	copy(v[4:], doc)
	return v, nil
}

var errRecordCorrupt = errors.New("unreadable enrollment record")

func decodeRecord(v []byte) (storedRecord, error) {
	var r storedRecord
	if len(v) < 4 {
		return r, errRecordCorrupt
	}
	n := binary.LittleEndian.Uint32(v)
	if n == 0 || int(n) > len(v)-4 {
		return r, errRecordCorrupt
	}
	if err := json.Unmarshal(v[4:4+n], &r); err != nil {
		return r, fmt.Errorf("%w: %v", errRecordCorrupt, err)
	}
	return r, nil
}

func newStoredRecord(e Enrollment, pid int, now time.Time) storedRecord {
	specs := make([]string, len(e.Rules))
	for i, r := range e.Rules {
		specs[i] = r.Label
	}
	return storedRecord{
		NetnsIno:       e.NetnsIno,
		Name:           e.Name,
		Owner:          e.Owner,
		ID:             e.ID,
		Holder:         e.Holder,
		Specs:          specs,
		Entries:        entryCounts(e.Cookie, e.Rules),
		OwnerPID:       uint32(pid),
		EnrolledUnixNs: now.UnixNano(),
	}
}

// lookupRecord reads the record of cookie; found is false when there is none.
func lookupRecord(m *ebpf.Map, cookie uint64) (storedRecord, []byte, bool, error) {
	v, err := m.LookupBytes(cookie)
	if err != nil {
		return storedRecord{}, nil, false, fmt.Errorf("read enrollment %d: %w", cookie, err)
	}
	if v == nil {
		return storedRecord{}, nil, false, nil
	}
	r, err := decodeRecord(v)
	return r, v, true, err
}

// v1Enrollment is layout version 1's `struct enrollment` (bpf/redirect.c
// before the records left the programs' object), read only to migrate it.
// It is frozen: TestV1EnrollmentMatchesItsBTF checks it against the BTF of
// that build's object, kept in testdata.
type v1Enrollment struct {
	NetnsIno       uint64
	EnrolledUnixNs uint64
	OwnerPid       uint32
	RuleCount      uint32
	Owner          [32]byte
	Name           [128]byte
	Specs          [512]byte
}

func (e v1Enrollment) stored() storedRecord {
	return storedRecord{
		NetnsIno:       e.NetnsIno,
		Name:           cstring(e.Name[:]),
		Owner:          cstring(e.Owner[:]),
		Specs:          splitSpecs(cstring(e.Specs[:])),
		OwnerPID:       e.OwnerPid,
		EnrolledUnixNs: int64(e.EnrolledUnixNs),
	}
}

func decodeV1Enrollment(v []byte) (v1Enrollment, error) {
	var e v1Enrollment
	err := binary.Read(bytes.NewReader(v), binary.NativeEndian, &e)
	return e, err
}

func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(bytes.ToValidUTF8(b, []byte("?")))
}
