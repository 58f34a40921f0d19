package main

import (
	"math"
	"regexp"
	"strings"
	"testing"
)

func TestStats(t *testing.T) {
	s := sample{10, 12, 11}
	if s.median() != 11 {
		t.Errorf("median %v", s.median())
	}
	if got := s.spread(); math.Abs(got-2.0/11) > 1e-9 {
		t.Errorf("spread %v", got)
	}
	if (sample{1, 2, 3, 4}).median() != 2.5 {
		t.Error("even median")
	}
	if !math.IsNaN(sample{}.median()) || (sample{5}).spread() != 0 {
		t.Error("empty / single")
	}
	obs := []float64{}
	for i := 1; i <= 100; i++ {
		obs = append(obs, float64(i))
	}
	if percentile(obs, 50) != 50 || percentile(obs, 99) != 99 || percentile(obs, 100) != 100 {
		t.Errorf("percentiles %v %v", percentile(obs, 50), percentile(obs, 99))
	}
	if got := ratio(sample{97}, sample{100}); got != "0.97×" {
		t.Errorf("ratio %q", got)
	}
	if got := cell(sample{100, 110, 90}, "%.0f"); got != "100 ±20%" {
		t.Errorf("cell %q", got)
	}
	md := table([]string{"a", "b"}, [][]string{{"1", "2"}})
	if !strings.Contains(md, "| a | b |\n|---|---|\n| 1 | 2 |") {
		t.Errorf("table:\n%s", md)
	}
}

// Every table names the commit it measured.
func TestMachineNamesCommit(t *testing.T) {
	m := machine()
	if !regexp.MustCompile(`, commit [0-9a-f]{12}( with uncommitted changes)?$|, commit unknown`).MatchString(m) {
		t.Errorf("machine() = %q: want it to end with the commit measured", m)
	}
}
