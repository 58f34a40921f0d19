package loader

import (
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// The frozen Go copy of layout version 1's record matches, field by field,
// the BTF of the object that version built (kept in testdata): a migration
// reads exactly what it wrote.
func TestV1EnrollmentMatchesItsBTF(t *testing.T) {
	spec, err := ebpf.LoadCollectionSpec("testdata/redirect_v1_bpfel.o")
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps[v1EnrollMap]
	if ms == nil {
		t.Fatal("the version 1 object has no nsr_enroll")
	}
	st, ok := btf.UnderlyingType(ms.Value).(*btf.Struct)
	if !ok {
		t.Fatalf("nsr_enroll value is %v, not a struct", ms.Value)
	}
	goType := reflect.TypeOf(v1Enrollment{})
	if int(st.Size) != binary.Size(v1Enrollment{}) || len(st.Members) != goType.NumField() {
		t.Fatalf("struct enrollment: %d bytes, %d members; Go copy: %d bytes, %d fields", st.Size, len(st.Members), binary.Size(v1Enrollment{}), goType.NumField())
	}
	for i, m := range st.Members {
		f := goType.Field(i)
		size, err := btf.Sizeof(m.Type)
		if err != nil {
			t.Fatal(err)
		}
		if uint32(m.Offset.Bytes()) != uint32(f.Offset) || size != int(f.Type.Size()) {
			t.Errorf("member %s: offset %d size %d; Go field %s: offset %d size %d", m.Name, m.Offset.Bytes(), size, f.Name, f.Offset, f.Type.Size())
		}
	}
}

func TestRecordRoundTrip(t *testing.T) {
	long := strings.Repeat("n", 1000)
	in := storedRecord{NetnsIno: 9, Name: long, Owner: "docker", ID: strings.Repeat("c", 64), Holder: "pid 1 on host h", Specs: []string{"80=3210", "[::1]:81=[::1]:3211"}, OwnerPID: 77, EnrolledUnixNs: 123}
	v, err := encodeRecord(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != recordValueSize {
		t.Fatalf("encoded %d bytes, want %d", len(v), recordValueSize)
	}
	out, err := decodeRecord(v)
	if err != nil || !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip: %+v, %v; want %+v", out, err, in)
	}
	if _, err := decodeRecord(make([]byte, recordValueSize)); !errors.Is(err, errRecordCorrupt) {
		t.Errorf("all-zero value decoded: %v", err)
	}
}

// A record that does not fit is refused, naming the netns, never truncated
// (the CLI makes it a usage error).
func TestRecordTooLongRefused(t *testing.T) {
	_, err := encodeRecord(storedRecord{Name: strings.Repeat("x", recordValueSize)})
	if !errors.Is(err, ErrRecordTooLarge) || !strings.Contains(err.Error(), `"`+strings.Repeat("x", recordValueSize)+`"`) {
		t.Fatalf("oversized record: %v", err)
	}
}

// Pin names are built in one place; the layout version is in the path of
// every map.
func TestPinPaths(t *testing.T) {
	p := pins{"/sys/fs/bpf/nsredirect"}
	if got := p.mapPath("nsr_rules"); got != "/sys/fs/bpf/nsredirect/v3/nsr_rules" {
		t.Errorf("mapPath = %s", got)
	}
	if got := MapPin(p.dir, recordsMap); got != "/sys/fs/bpf/nsredirect/v3/nsr_records" {
		t.Errorf("MapPin = %s", got)
	}
	if got := p.v1Map(v1EnrollMap); got != "/sys/fs/bpf/nsredirect/nsr_enroll" {
		t.Errorf("v1Map = %s", got)
	}
	if got := p.link(hooks[1]); got != "/sys/fs/bpf/nsredirect/link_connect4" {
		t.Errorf("link = %s", got)
	}
}

// The capacities fit together: every enrollment can hold a default spec
// (6 entries), and a counter never runs out before its rule.
func TestCapacitiesFit(t *testing.T) {
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	rules := spec.Maps["nsr_rules"].MaxEntries
	counters := spec.Maps["nsr_counters"].MaxEntries
	if rules < 6*MaxEnrollments {
		t.Errorf("%d rule entries cannot hold %d enrollments of one default spec (6 entries)", rules, MaxEnrollments)
	}
	if counters < rules {
		t.Errorf("%d counters < %d rule entries: counters could run out first", counters, rules)
	}
	if recordsSpec().MaxEntries != MaxEnrollments {
		t.Errorf("record store holds %d, MaxEnrollments is %d", recordsSpec().MaxEntries, MaxEnrollments)
	}
}
