package loader

import (
	"os"
	"slices"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/rule"
)

// TestRuleKeysCarryProtocol: a /udp spec and a TCP spec for the same port
// write different kernel keys, each with the kernel's protocol number, so a
// UDP rule never redirects TCP and the other way round.
func TestRuleKeysCarryProtocol(t *testing.T) {
	rules, err := rule.ParseList("53=5353/udp,53=5354")
	if err != nil {
		t.Fatal(err)
	}
	entries := rule.Entries(rules)
	seen := map[any]bool{}
	for i, want := range []uint8{ipprotoUDP, ipprotoTCP} {
		keys := ruleEntries(42, uint32(i), entries[i])
		if len(keys) != 6 {
			t.Fatalf("%s: %d keys, want 6", entries[i].Label, len(keys))
		}
		for k := range keys {
			if k.Proto != want {
				t.Errorf("%s: key %+v has proto %d, want %d", entries[i].Label, k, k.Proto, want)
			}
			if seen[k] {
				t.Errorf("key %+v written twice", k)
			}
			seen[k] = true
		}
	}
}

// The per-second heal scans the rule map for UDP rules on every call while
// a UDP link of ours is pinned and not proven attached (these pins are
// empty files), and otherwise on every udpScanEvery-th call only: a link pin removed by hand under a live UDP rule (every UDP
// link gone) is found within udpScanEvery heals, and a host without UDP
// rules does not scan every second.
func TestHealScansForUDPRulesEveryTenthWithoutPins(t *testing.T) {
	udpScanDue := func(l *Loader) bool { _, scan := l.healNeeds(); return scan }
	dir := t.TempDir()
	l := newLoader(dir, logrus.New())
	var due []int
	for i := 1; i <= 3*udpScanEvery; i++ {
		if udpScanDue(l) {
			due = append(due, i)
		}
	}
	if want := []int{udpScanEvery, 2 * udpScanEvery, 3 * udpScanEvery}; !slices.Equal(due, want) {
		t.Fatalf("with no UDP link pinned the heal scanned at calls %v; want %v", due, want)
	}
	if udpScanEvery != 10 {
		t.Errorf("udpScanEvery = %d; docs/operations.md says every tenth heal", udpScanEvery)
	}
	// Any one UDP link pinned: every heal scans, whichever hook it is.
	for _, h := range udpHooks {
		if err := os.WriteFile(l.pins.link(h), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < udpScanEvery; i++ {
			if !udpScanDue(l) {
				t.Fatalf("with %s pinned, heal %d did not scan", l.pins.link(h), i+1)
			}
		}
		if err := os.Remove(l.pins.link(h)); err != nil {
			t.Fatal(err)
		}
	}
	// A TCP link pinned is not a UDP one.
	if err := os.WriteFile(l.pins.link(hooks[0]), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	scans := 0
	for i := 0; i < udpScanEvery; i++ {
		if udpScanDue(l) {
			scans++
		}
	}
	if scans != 1 {
		t.Errorf("with only %s pinned, %d of %d heals scanned; want 1", l.pins.link(hooks[0]), scans, udpScanEvery)
	}
}
