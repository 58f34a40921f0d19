package loader

import (
	"slices"
	"testing"

	"github.com/nsredirect/nsredirect/internal/entry"
	"github.com/nsredirect/nsredirect/internal/rule"
)

func entries(t *testing.T, specs string) []entry.Rule {
	t.Helper()
	rs, err := rule.ParseList(specs)
	if err != nil {
		t.Fatal(err)
	}
	return rule.Entries(rs)
}

// A rule's counter survives a re-enrollment when the kernel held exactly
// that rule's entries under its index: the keys and values decide, not the
// label. A rule that now covers more, or other, destinations starts at zero.
func TestCounterKeptWhenTheEntriesAreTheSame(t *testing.T) {
	const cookie = 42
	before := entries(t, "80=3210,127.0.0.1:443=3211")
	st := cookieState{rules: wantedEntries(cookie, before)}
	held := st.entriesByIndex()
	for _, tc := range []struct {
		index int
		now   string
		kept  bool
	}{
		{0, "80=3210", true},
		{1, "127.0.0.1:443=3211", true},
		{0, "80=3211", false},           // another target port
		{0, "127.0.0.1:80=3210", false}, // fewer destinations
		{1, "443=3211", false},          // more destinations
		{0, "80=3210/udp", false},       // another protocol
		{1, "80=3210", false},           // another rule at this index
	} {
		now := entries(t, tc.now)[0]
		if got := sameEntries(held[uint32(tc.index)], ruleEntries(cookie, uint32(tc.index), now)); got != tc.kept {
			t.Errorf("rule %d becomes %s: counter kept %v; want %v", tc.index, tc.now, got, tc.kept)
		}
	}
	if st.anyUDP() {
		t.Error("TCP rules read as UDP")
	}
	if !(cookieState{rules: wantedEntries(cookie, entries(t, "53=5353/udp"))}).anyUDP() {
		t.Error("a UDP rule not read as UDP")
	}
}

// The record keeps how many entries each rule has in the kernel, for Live.
func TestEntryCounts(t *testing.T) {
	if got := entryCounts(42, entries(t, "80=3210,127.0.0.1:443=3211,[::1]:53=[::1]:5353/udp")); !slices.Equal(got, []int{6, 2, 1}) {
		t.Errorf("entry counts %v; want [6 2 1]", got)
	}
}
