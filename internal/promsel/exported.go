package promsel

import (
	"fmt"
	"io"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// FromText reads a /metrics page in the text format.
func FromText(r io.Reader) (Exported, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse /metrics: %w", err)
	}
	list := make([]*dto.MetricFamily, 0, len(fams))
	for _, f := range fams {
		list = append(list, f)
	}
	return FromFamilies(list), nil
}

// FromFamilies lists the sample names of metric families as a scrape
// stores them: a summary's NAME{quantile}, NAME_sum and NAME_count, a
// histogram's NAME_bucket{le}, NAME_sum and NAME_count. A family with no
// sample is not exported.
func FromFamilies(fams []*dto.MetricFamily) Exported {
	e := Exported{}
	add := func(name string, labels []*dto.LabelPair, extra ...string) {
		if e[name] == nil {
			e[name] = map[string]bool{}
		}
		for _, l := range labels {
			e[name][l.GetName()] = true
		}
		for _, l := range extra {
			e[name][l] = true
		}
	}
	for _, f := range fams {
		n := f.GetName()
		for _, m := range f.GetMetric() {
			switch f.GetType() {
			case dto.MetricType_SUMMARY:
				add(n, m.GetLabel(), "quantile")
				add(n+"_sum", m.GetLabel())
				add(n+"_count", m.GetLabel())
			case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
				add(n+"_bucket", m.GetLabel(), "le")
				add(n+"_sum", m.GetLabel())
				add(n+"_count", m.GetLabel())
			default:
				add(n, m.GetLabel())
			}
		}
	}
	return e
}
