package main

import (
	"fmt"
	"math"
	"sort"
	"strings"
)

// sample is one measurement repeated several times.
type sample []float64

func (s sample) sorted() []float64 {
	c := append([]float64(nil), s...)
	sort.Float64s(c)
	return c
}

// median of the repeats; NaN when there are none.
func (s sample) median() float64 {
	c := s.sorted()
	switch n := len(c); {
	case n == 0:
		return math.NaN()
	case n%2 == 1:
		return c[n/2]
	default:
		return (c[n/2-1] + c[n/2]) / 2
	}
}

// spread is (max-min)/median, the relative range of the repeats.
func (s sample) spread() float64 {
	c := s.sorted()
	if len(c) < 2 {
		return 0
	}
	m := s.median()
	if m == 0 {
		return 0
	}
	return (c[len(c)-1] - c[0]) / m
}

// percentile of raw observations (not repeats), p in [0,100].
func percentile(obs []float64, p float64) float64 {
	if len(obs) == 0 {
		return math.NaN()
	}
	c := append([]float64(nil), obs...)
	sort.Float64s(c)
	i := int(math.Ceil(p/100*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

// cell renders "median ±spread%".
func cell(s sample, format string) string {
	if len(s) == 0 {
		return "n/a"
	}
	return fmt.Sprintf(format+" ±%.0f%%", s.median(), 100*s.spread())
}

// ratio renders a/b as "0.98×".
func ratio(a, b sample) string {
	if len(a) == 0 || len(b) == 0 || b.median() == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f×", a.median()/b.median())
}

// table renders a markdown table.
func table(header []string, rows [][]string) string {
	var b strings.Builder
	b.WriteString("| " + strings.Join(header, " | ") + " |\n|")
	for range header {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, r := range rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	return b.String()
}
