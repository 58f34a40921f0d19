package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
)

const (
	httpPort = 3210 // the demo backend in every namespace
	bulkPort = 5201 // iperf3's server
)

// results holds every repeat of every measurement, by path name.
type results struct {
	machine     string
	newConn     map[string]sample // requests/s, Connection: close
	keepAlive   map[string]sample // requests/s
	bulk        map[string]sample // Gbit/s
	cpuPerReq   map[string]sample // µs of machine CPU per new-connection request
	connectP50  map[string]sample // µs
	connectP99  map[string]sample // µs
	scaling     []scalePoint
	daemonRSSKB int
	// failures counts connects a path refused or dropped, per path.
	failures  map[string]int
	imageSize string
	kcost     *kernelCost
	udp       *udpResults
	cfg       config
}

type scalePoint struct {
	netns    int
	p50, p99 sample
}

func newResults(c config) *results {
	m := func() map[string]sample { return map[string]sample{} }
	return &results{machine: machine(), newConn: m(), keepAlive: m(), bulk: m(), cpuPerReq: m(),
		connectP50: m(), connectP99: m(), failures: map[string]int{}, cfg: c}
}

// measure runs every workload over every path, rotating the order of paths
// in each repeat so drift on a shared machine does not favour one of them.
func measure(e *env) (*results, error) {
	r := newResults(e.cfg)
	if err := e.bpffs(); err != nil {
		return nil, err
	}
	nss := map[string]netnsx.Target{}
	names := map[string]string{}
	for i, p := range paths {
		name := fmt.Sprintf("nsr-bench-%d-%d", i, time.Now().UnixNano()%100000)
		t, err := e.netns(name)
		if err != nil {
			return nil, err
		}
		nss[p.name], names[p.name] = t, name
		if _, err := e.start("ip", "netns", "exec", name, "iperf3", "-s", "-p", strconv.Itoa(bulkPort)); err != nil {
			return nil, err
		}
	}
	for rep := 0; rep < e.cfg.reps; rep++ {
		for i := range paths {
			p := paths[(i+rep)%len(paths)]
			if err := e.ctx.Err(); err != nil {
				return nil, err
			}
			fmt.Printf("repeat %d/%d: %s\n", rep+1, e.cfg.reps, p.name)
			if err := measurePath(e, r, p, nss[p.name], names[p.name]); err != nil {
				return nil, fmt.Errorf("%s: %w", p.name, err)
			}
		}
	}
	if err := measureScaling(e, r, nss["nsredirect"], names["nsredirect"]); err != nil {
		return nil, fmt.Errorf("scaling: %w", err)
	}
	k, err := measureKernelCost(e)
	if err != nil {
		return nil, fmt.Errorf("in-kernel cost: %w", err)
	}
	r.kcost = k
	if r.udp, err = measureUDP(e); err != nil {
		return nil, fmt.Errorf("udp: %w", err)
	}
	r.imageSize = imageSize()
	return r, nil
}

func port(p path, from, to int) int {
	if p.name == "direct" {
		return to
	}
	return from
}

func measurePath(e *env, r *results, p path, ns netnsx.Target, nsName string) error {
	down, err := p.setup(e, ns, nsName, 80, httpPort)
	if err != nil {
		return err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port(p, 80, httpPort))
	busy := busyJiffies()
	rps, total, fails, err := wrk(e, nsName, url, true)
	busy = busyJiffies() - busy
	r.failures[p.name] += fails
	if err == nil {
		r.newConn[p.name] = append(r.newConn[p.name], rps)
		if total > 0 {
			// USER_HZ is 100: a jiffy is 10 ms.
			r.cpuPerReq[p.name] = append(r.cpuPerReq[p.name], float64(busy)*10000/float64(total))
		}
		if p.name == "nsredirect" {
			r.daemonRSSKB = max(r.daemonRSSKB, rssKB(e.daemonPID))
		}
		rps, _, fails, err = wrk(e, nsName, url, false)
		r.failures[p.name] += fails
		r.keepAlive[p.name] = append(r.keepAlive[p.name], rps)
	}
	if err == nil {
		var p50, p99 float64
		var fails int
		p50, p99, fails, err = connectLatency(e.ctx, ns, fmt.Sprintf("127.0.0.1:%d", port(p, 80, httpPort)), e.cfg.dials)
		r.failures[p.name] += fails
		r.connectP50[p.name] = append(r.connectP50[p.name], p50)
		r.connectP99[p.name] = append(r.connectP99[p.name], p99)
	}
	down()
	if err != nil {
		return err
	}
	// Bulk through a second rule, 81 -> iperf3's port.
	down, err = p.setup(e, ns, nsName, 81, bulkPort)
	if err != nil {
		return err
	}
	defer down()
	gbps, err := iperf(e, nsName, port(p, 81, bulkPort))
	if err != nil {
		return err
	}
	r.bulk[p.name] = append(r.bulk[p.name], gbps)
	return nil
}

var (
	rpsRe   = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	totalRe = regexp.MustCompile(`([0-9]+) requests in`)
	errRe   = regexp.MustCompile(`Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)`)
)

// wrk drives url from inside the namespace; close asks for a new
// connection per request, as a Convex Node action's fetch does.
func wrk(e *env, nsName, url string, close bool) (rps float64, total, connectErrors int, err error) {
	args := []string{"netns", "exec", nsName, "wrk", "-t1", "-c16", fmt.Sprintf("-d%ds", e.cfg.wrkSecs)}
	if close {
		args = append(args, "-H", "Connection: close")
	}
	out, err := exec.CommandContext(e.ctx, "ip", append(args, url)...).CombinedOutput()
	if err != nil {
		return 0, 0, 0, fmt.Errorf("wrk %s: %v: %s", url, err, out)
	}
	m := rpsRe.FindSubmatch(out)
	if m == nil {
		return 0, 0, 0, fmt.Errorf("wrk %s: no Requests/sec in %q", url, out)
	}
	if em := errRe.FindSubmatch(out); em != nil {
		connectErrors, _ = strconv.Atoi(string(em[1]))
	}
	rps, _ = strconv.ParseFloat(string(m[1]), 64)
	if t := totalRe.FindSubmatch(out); t != nil {
		total, _ = strconv.Atoi(string(t[1]))
	}
	return rps, total, connectErrors, nil
}

func iperf(e *env, nsName string, port int) (float64, error) {
	out, err := exec.CommandContext(e.ctx, "ip", "netns", "exec", nsName, "iperf3", "-c", "127.0.0.1",
		"-p", strconv.Itoa(port), "-t", strconv.Itoa(e.cfg.iperfSecs), "-J").Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3 to :%d: %v: %s", port, err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &res); err != nil || res.Error != "" {
		return 0, fmt.Errorf("iperf3 to :%d: %v %s", port, err, res.Error)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

// connectLatency times up to n sequential connect() calls, for at most 5 s, from inside ns with a
// Go client and returns p50 and p99 in µs of the ones that succeeded, and
// how many failed (a path that drops connects under load).
func connectLatency(ctx context.Context, ns netnsx.Target, addr string, n int) (p50, p99 float64, failed int, err error) {
	obs := make([]float64, 0, n)
	err = ns.Do(func() error {
		d := net.Dialer{Timeout: 500 * time.Millisecond}
		// A path that drops connects (socat) would spend minutes in dial
		// timeouts: the measurement is bounded in time as well as count.
		deadline := time.Now().Add(5 * time.Second)
		for i := 0; i < n && time.Now().Before(deadline) && ctx.Err() == nil; i++ {
			start := time.Now()
			c, err := d.Dial("tcp", addr)
			took := time.Since(start)
			if err != nil {
				failed++
				continue
			}
			c.Close()
			obs = append(obs, float64(took.Nanoseconds())/1000)
		}
		if len(obs) == 0 {
			return fmt.Errorf("every connect to %s failed", addr)
		}
		return nil
	})
	return percentile(obs, 50), percentile(obs, 99), failed, err
}

// measureScaling fills the rule map with the entries of N-1 other enrolled
// namespaces (fake cookies; each gets the entries rule.Expand gives 80=3210, 6 today) and times
// connect() through nsredirect at each size.
func measureScaling(e *env, r *results, ns netnsx.Target, nsName string) error {
	down, err := paths[1].setup(e, ns, nsName, 80, httpPort)
	if err != nil {
		return err
	}
	defer down()
	m, err := ebpf.LoadPinnedMap(loader.MapPin(e.pinDir, bpfobj.RedirectMapNsrRules), nil)
	if err != nil {
		return err
	}
	defer m.Close()
	var keys []bpfobj.RedirectRuleKey
	defer func() {
		for _, k := range keys {
			_ = m.Delete(k)
		}
	}()
	rng := rand.New(rand.NewPCG(7, 11))
	// The entries a real enrollment of 80=3210 writes, from rule.Expand.
	spec, _ := rule.Parse("80=3210")
	exp := spec.Expand()
	for _, size := range []int{1, 100, 1000, 10000} {
		for len(keys)/len(exp) < size-1 {
			cookie := 1<<62 | rng.Uint64()>>2
			for _, x := range exp {
				k := bpfobj.RedirectRuleKey{NetnsCookie: cookie, Family: 6, Port: 0x5000}
				if x.Match.Addr.Is4() {
					a := x.Match.Addr.As4()
					k.Family, k.Addr[0] = 4, binary.LittleEndian.Uint32(a[:])
				} else {
					a := x.Match.Addr.As16()
					for i := range k.Addr {
						k.Addr[i] = binary.LittleEndian.Uint32(a[4*i:])
					}
				}
				v := bpfobj.RedirectRuleVal{Port: 0x8a0c, KeepAddr: 1}
				if err := m.Put(k, v); err != nil {
					return fmt.Errorf("fill rule map to %d netns: %w", size, err)
				}
				keys = append(keys, k)
			}
		}
		pt := scalePoint{netns: size}
		for rep := 0; rep < e.cfg.reps; rep++ {
			p50, p99, failed, err := connectLatency(e.ctx, ns, "127.0.0.1:80", e.cfg.dials)
			if err != nil {
				return err
			}
			r.failures["nsredirect"] += failed
			pt.p50, pt.p99 = append(pt.p50, p50), append(pt.p99, p99)
		}
		fmt.Printf("scaling: %d netns enrolled (%d map entries): connect p50 %.1f µs\n", size, len(keys)+len(exp), pt.p50.median())
		r.scaling = append(r.scaling, pt)
	}
	return nil
}

func imageSize() string {
	out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Size}}", "nsredirect:latest").Output()
	if err != nil {
		return "n/a (no nsredirect:latest image; `make image` builds it)"
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
	if err != nil {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MB", n/1e6)
}
