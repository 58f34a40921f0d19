package loader

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// scanRules and scanCounters see every entry exactly once across several
// batches, per-CPU values whole.
func TestScanSeesEveryEntryAcrossBatches(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to create maps")
		}
		t.Skip("needs root to create maps")
	}
	if err := removeMemlock(); err != nil {
		t.Fatal(err)
	}
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		t.Fatal(err)
	}
	rules, err := ebpf.NewMap(spec.Maps[bpfobj.RedirectMapNsrRules])
	if err != nil {
		t.Fatal(err)
	}
	defer rules.Close()
	counters, err := ebpf.NewMap(spec.Maps[bpfobj.RedirectMapNsrCounters])
	if err != nil {
		t.Fatal(err)
	}
	defer counters.Close()
	const n = 3*scanBatch + 17
	cpus := ebpfCPUs()
	for i := range uint32(n) {
		k := bpfobj.RedirectRuleKey{NetnsCookie: uint64(i % 5), Port: uint16(i), Family: 4}
		if err := rules.Put(k, bpfobj.RedirectRuleVal{Index: i}); err != nil {
			t.Fatal(err)
		}
		perCPU := make([]uint64, cpus)
		perCPU[cpus-1] = uint64(i)
		if err := counters.Put(bpfobj.RedirectCounterKey{NetnsCookie: uint64(i % 5), Index: i}, perCPU); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[uint32]int{}
	if err := scanRules(rules, func(k bpfobj.RedirectRuleKey, v bpfobj.RedirectRuleVal) {
		if uint32(k.Port) != v.Index {
			t.Errorf("key %v came with value %v", k, v)
		}
		seen[v.Index]++
	}); err != nil {
		t.Fatal(err)
	}
	seenC := map[uint32]int{}
	if err := scanCounters(counters, func(k bpfobj.RedirectCounterKey, perCPU []uint64) {
		if len(perCPU) != cpus || perCPU[cpus-1] != uint64(k.Index) {
			t.Errorf("counter %v came with %v", k, perCPU)
		}
		seenC[k.Index]++
	}); err != nil {
		t.Fatal(err)
	}
	for i := range uint32(n) {
		if seen[i] != 1 || seenC[i] != 1 {
			t.Fatalf("entry %d seen %d times in rules, %d in counters; want once", i, seen[i], seenC[i])
		}
	}
}
