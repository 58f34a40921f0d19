package main

import (
	"fmt"
	"image/color"
	"os"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

var pathNames = []string{"direct", "nsredirect", "socat", "iptables"}

// report prints the tables and writes them with a chart to the output dir.
func report(c config, r *results) error {
	md := render(r)
	fmt.Print("\n" + md)
	if err := os.MkdirAll(c.outDir, 0o755); err != nil {
		return err
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	if c.quick {
		stamp += "-quick"
	}
	mdPath, pngPath, latestMD, latestPNG := resultPaths(c.outDir, stamp)
	for _, p := range []string{mdPath, latestMD} {
		if err := os.WriteFile(p, []byte(md), 0o644); err != nil {
			return err
		}
	}
	for _, p := range []string{pngPath, latestPNG} {
		if err := chart(r, p); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
	}
	fmt.Printf("\nwritten: %s, %s (and latest.md, latest.png)\n", mdPath, pngPath)
	return nil
}

func render(r *results) string {
	var b strings.Builder
	mode := "full"
	if r.cfg.quick {
		mode = "quick"
	}
	fmt.Fprintf(&b, "### nsredirect benchmark (%s run)\n\n%s. Median of %d repeats ± spread ((max−min)/median); ratio = path / direct.\n",
		mode, r.machine, r.cfg.reps)
	fmt.Fprintf(&b, "Loads: wrk -t1 -c16 for %d s, iperf3 for %d s, %d sequential connect() per repeat. Each path has its own netns and server; paths rotate order every repeat.\n\n",
		r.cfg.wrkSecs, r.cfg.iperfSecs, r.cfg.dials)

	header := append([]string{"workload"}, pathNames...)
	row := func(name, format string, m map[string]sample, ratios bool) []string {
		out := []string{name}
		for _, p := range pathNames {
			c := cell(m[p], format)
			if ratios && p != "direct" {
				c += " (" + ratio(m[p], m["direct"]) + ")"
			}
			out = append(out, c)
		}
		return out
	}
	b.WriteString(table(header, [][]string{
		row("new connection per request, req/s", "%.0f", r.newConn, true),
		row("keep-alive, req/s", "%.0f", r.keepAlive, true),
		row("bulk (iperf3), Gbit/s", "%.1f", r.bulk, true),
		row("connect() p50, µs", "%.1f", r.connectP50, true),
		row("connect() p99, µs", "%.1f", r.connectP99, true),
		row("machine CPU per new-connection request, µs", "%.1f", r.cpuPerReq, true),
		failuresRow(r),
	}))

	b.WriteString("\nconnect() through nsredirect as the rule map fills (80=3210 is 6 map entries per netns, as rule.Expand writes them; the map holds 65,536 entries, the enrollment map 16,384 netns):\n\n")
	var rows [][]string
	for _, s := range r.scaling {
		rows = append(rows, []string{fmt.Sprint(s.netns), cell(s.p50, "%.1f µs"), cell(s.p99, "%.1f µs"), ratio(s.p50, r.scaling[0].p50)})
	}
	b.WriteString(table([]string{"enrolled netns", "connect p50", "connect p99", "p50 vs 1 netns"}, rows))

	b.WriteString(renderKernelCost(r.kcost))
	b.WriteString(renderUDP(r.udp))
	fmt.Fprintf(&b, "\nnsredirect daemon RSS: %.1f MB. Image nsredirect:latest: %s.\n\n", float64(r.daemonRSSKB)/1024, r.imageSize)
	b.WriteString(targets(r))
	return b.String()
}

// targets states each target from the issue against the numbers, met or not.
func targets(r *results) string {
	med := func(m map[string]sample, p string) float64 { return m[p].median() }
	check := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**missed**"
	}
	nc := med(r.newConn, "nsredirect")
	var lines []string
	add := func(name string, ok bool, detail string) {
		lines = append(lines, fmt.Sprintf("| %s | %s | %s |", name, check(ok), detail))
	}
	add("new connections ≥ 0.97× direct", nc >= 0.97*med(r.newConn, "direct"), ratio(r.newConn["nsredirect"], r.newConn["direct"]))
	add("new connections ≥ 10× socat", nc >= 10*med(r.newConn, "socat"), fmt.Sprintf("%.1f×", nc/med(r.newConn, "socat")))
	add("new connections ≥ iptables REDIRECT", nc >= med(r.newConn, "iptables"), fmt.Sprintf("%.2f×", nc/med(r.newConn, "iptables")))
	within := func(m map[string]sample) (bool, string) {
		d, n := m["direct"], m["nsredirect"]
		noise := max(d.spread(), n.spread(), 0.03)
		return n.median() >= d.median()*(1-noise), fmt.Sprintf("%s, noise ±%.0f%%", ratio(n, d), 100*noise)
	}
	ok, detail := within(r.keepAlive)
	add("keep-alive within noise of direct", ok, detail)
	ok, detail = within(r.bulk)
	add("bulk within noise of direct", ok, detail)
	if len(r.scaling) > 1 {
		first, last := r.scaling[0].p50, r.scaling[len(r.scaling)-1].p50
		noise := max(first.spread(), last.spread(), 0.10)
		add("connect() flat from 1 to 10,000 netns", last.median() <= first.median()*(1+noise), ratio(last, first)+fmt.Sprintf(", noise ±%.0f%%", 100*noise))
	}
	add("no connect refused or dropped through nsredirect", r.failures["nsredirect"] == 0, fmt.Sprint(r.failures["nsredirect"]))
	add("daemon RSS < 20 MB", r.daemonRSSKB > 0 && r.daemonRSSKB < 20*1024, fmt.Sprintf("%.1f MB", float64(r.daemonRSSKB)/1024))
	return "| target | result | measured |\n|---|---|---|\n" + strings.Join(lines, "\n") + "\n"
}

// chart draws each path's throughput relative to direct, per workload.
func chart(r *results, file string) error {
	p := plot.New()
	p.Title.Text = "nsredirect vs socat vs iptables REDIRECT (relative to direct = 1.0)"
	p.Y.Label.Text = "throughput / direct"
	workloads := []struct {
		name string
		m    map[string]sample
	}{{"new connection/request", r.newConn}, {"keep-alive", r.keepAlive}, {"bulk", r.bulk}}
	colors := []color.Color{color.RGBA{R: 40, G: 110, B: 200, A: 255}, color.RGBA{R: 220, G: 120, B: 40, A: 255}, color.RGBA{R: 120, G: 120, B: 120, A: 255}}
	w := vg.Points(40)
	for i, name := range pathNames[1:] {
		vals := make(plotter.Values, len(workloads))
		for j, wl := range workloads {
			if d := wl.m["direct"].median(); d > 0 {
				vals[j] = wl.m[name].median() / d
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = colors[i]
		bars.LineStyle.Width = 0
		bars.Offset = vg.Length(i-1) * w
		p.Add(bars)
		p.Legend.Add(name, bars)
	}
	one := plotter.NewFunction(func(float64) float64 { return 1 })
	one.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(one)
	p.Legend.Top = true
	p.Legend.Left = true
	names := make([]string, len(workloads))
	for i, wl := range workloads {
		names[i] = wl.name
	}
	p.NominalX(names...)
	p.Y.Min, p.Y.Max = 0, 1.3
	return p.Save(8*vg.Inch, 4.5*vg.Inch, file)
}

func failuresRow(r *results) []string {
	out := []string{"connects refused or timed out (all runs)"}
	for _, p := range pathNames {
		out = append(out, fmt.Sprint(r.failures[p]))
	}
	return out
}
