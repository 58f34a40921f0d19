// Package metrics exposes nsredirect's counters to Prometheus. Counters are
// read from the kernel's per-CPU maps at scrape time, never polled.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// RuleStat is one rule of one netns and how many connects it redirected.
type RuleStat struct {
	Netns, Rule string
	Redirects   uint64
}

// Snapshot is what a scrape reports.
type Snapshot struct {
	Rules []RuleStat
	// EnrollErrors counts failed enrollments per netns name (a bad label,
	// a vanished netns).
	EnrollErrors map[string]uint64
	// LinkRepairs counts links of ours re-created per hook (connect4, ...)
	// after they were found detached or defunct.
	LinkRepairs map[string]uint64
	// PeerStorageFailures counts connects and UDP datagrams redirected
	// whose dialled address could not be stored for getpeername or recvfrom.
	PeerStorageFailures uint64
	// Maps is how full each pinned map is.
	Maps []MapFill
}

// MapFill is the fill level of one pinned map, as the loader reads it and
// as scrapes and `status` show it.
type MapFill struct {
	Map      string `json:"map"`
	Entries  int    `json:"entries"`
	Capacity int    `json:"capacity"`
}

type collector struct {
	snapshot  func() Snapshot
	redirects *prometheus.Desc
	rules     *prometheus.Desc
	errors    *prometheus.Desc
	repairs   *prometheus.Desc
	peerFails *prometheus.Desc
	entries   *prometheus.Desc
	capacity  *prometheus.Desc
}

// NewCollector reads snapshot on every scrape.
func NewCollector(snapshot func() Snapshot) prometheus.Collector {
	return &collector{
		snapshot:  snapshot,
		redirects: prometheus.NewDesc("nsredirect_redirects_total", "Connects redirected, per netns and rule.", []string{"netns", "rule"}, nil),
		rules:     prometheus.NewDesc("nsredirect_rules", "Rules this instance has live in the kernel.", nil, nil),
		errors:    prometheus.NewDesc("nsredirect_enroll_errors_total", "Failed attempts to enroll a netns (bad spec, netns gone, already served).", []string{"netns"}, nil),
		repairs:   prometheus.NewDesc("nsredirect_link_repairs_total", "Links of ours found detached or defunct and re-created, or running a program not ours and given ours back, per hook.", []string{"hook"}, nil),
		peerFails: prometheus.NewDesc("nsredirect_peer_storage_failures_total", "Connects and UDP datagrams redirected whose dialled address could not be stored, so getpeername or recvfrom shows the target port.", nil, nil),
		entries:   prometheus.NewDesc("nsredirect_map_entries", "Entries in each pinned map.", []string{"map"}, nil),
		capacity:  prometheus.NewDesc("nsredirect_map_capacity", "Maximum entries of each pinned map.", []string{"map"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.redirects
	ch <- c.rules
	ch <- c.errors
	ch <- c.repairs
	ch <- c.peerFails
	ch <- c.entries
	ch <- c.capacity
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.snapshot()
	for _, r := range s.Rules {
		ch <- prometheus.MustNewConstMetric(c.redirects, prometheus.CounterValue, float64(r.Redirects), r.Netns, r.Rule)
	}
	ch <- prometheus.MustNewConstMetric(c.rules, prometheus.GaugeValue, float64(len(s.Rules)))
	for n, e := range s.EnrollErrors {
		ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(e), n)
	}
	for h, n := range s.LinkRepairs {
		ch <- prometheus.MustNewConstMetric(c.repairs, prometheus.CounterValue, float64(n), h)
	}
	ch <- prometheus.MustNewConstMetric(c.peerFails, prometheus.CounterValue, float64(s.PeerStorageFailures))
	for _, m := range s.Maps {
		ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(m.Entries), m.Map)
		ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(m.Capacity), m.Map)
	}
}

// Registry builds the registry nsredirect serves: our collector, build info
// and the Go/process collectors.
func Registry(snapshot func() Snapshot, version string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "nsredirect_build_info",
		Help:        "Build of the running nsredirect; always 1.",
		ConstLabels: prometheus.Labels{"version": version},
	})
	build.Set(1)
	reg.MustRegister(NewCollector(snapshot), build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Listen opens the metrics socket; it is separate from Serve so a bad
// address fails before anything is attached.
func Listen(addr string) (net.Listener, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("metrics address %q: %v; use HOST:PORT, e.g. 127.0.0.1:9590", addr, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address %q: %w", addr, err)
	}
	return ln, nil
}

// Serve answers /metrics, /healthz and /readyz on ln until ctx ends.
func Serve(ctx context.Context, ln net.Listener, reg *prometheus.Registry, healthy, ready func() error) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", probe(healthy))
	mux.HandleFunc("/readyz", probe(ready))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func probe(check func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		if err := check(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	}
}
