package loader

import (
	"testing"

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
	keys := ruleKeys(42, rules)
	if len(keys) != 12 {
		t.Fatalf("%d keys, want 6 per spec", len(keys))
	}
	seen := map[any]bool{}
	for i, k := range keys {
		want := uint8(ipprotoUDP)
		if i >= 6 {
			want = ipprotoTCP
		}
		if k.Proto != want {
			t.Errorf("key %d: proto %d, want %d", i, k.Proto, want)
		}
		if seen[k] {
			t.Errorf("key %d written twice: %+v", i, k)
		}
		seen[k] = true
	}
}
