package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	return l
}

// checkFlags are the flags of `check`.
type checkFlags struct {
	netns, dial, pinDir, cgroup string
	attached                    bool
}

func (f *checkFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.netns, "netns", "", "target netns: self, a path or pid:N")
	fs.StringVar(&f.cgroup, "cgroup", "", "cgroup2 mount, as the daemon's --cgroup; only used on Linux < 5.14, where a BPF probe reads the netns cookie (default: the first cgroup2 mount)")
	fs.StringVar(&f.dial, "dial", "", "also connect to ADDR:PORT from inside the netns, e.g. 127.0.0.1:80")
	fs.StringVar(&f.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory of the pinned state")
	fs.BoolVar(&f.attached, "attached", false, "without --netns: exit 0 when the programs are attached and pinned (healthcheck of `nsredirect docker`, which may serve no netns yet)")
}

func checkCmd(_ context.Context, io IO, args []string) error {
	fs := flagSet("check", io)
	var f checkFlags
	f.register(fs)
	if err := parse(fs, args, io.Getenv); err != nil {
		return err
	}
	netnsArg, dial, pinDir, cgroup, attached := f.netns, f.dial, f.pinDir, f.cgroup, f.attached
	if netnsArg == "" && attached {
		return checkAttached(io, pinDir)
	}
	if netnsArg == "" {
		return usagef("--netns is required: self, /run/netns/NAME, /proc/PID/ns/net or pid:N (or --attached)")
	}
	target, err := netnsx.ParseTarget(netnsArg)
	if err != nil {
		return err
	}
	if dial != "" {
		if _, _, err := net.SplitHostPort(dial); err != nil {
			return usagef("--dial %q: %v; use ADDR:PORT, e.g. 127.0.0.1:80 or [::1]:80", dial, err)
		}
	}
	cookies, err := checkCookieSource(io.Getenv, cgroup)
	if err != nil {
		return err
	}
	defer cookies.Close()
	cookie, _, err := target.ResolveWith(cookies.Read)
	if err != nil {
		return err
	}
	l, err := loader.OpenPinned(pinDir, quietLog())
	if err != nil {
		if errors.Is(err, loader.ErrNotPinned) {
			return fmt.Errorf("no nsredirect state at %s: no daemon has enrolled anything", pinDir)
		}
		return err
	}
	defer l.Close()
	rec, err := l.Live(cookie)
	if err != nil {
		return fmt.Errorf("netns %s: %w", target, err)
	}
	if dial != "" {
		err := target.Do(func() error {
			c, err := net.DialTimeout("tcp", dial, 2*time.Second)
			if err != nil {
				return err
			}
			return c.Close()
		})
		if err != nil {
			return fmt.Errorf("netns %s: rule live but connect to %s failed: %w", target, dial, err)
		}
	}
	holder := rec.Holder
	if holder == "" {
		holder = fmt.Sprintf("pid %d", rec.OwnerPID)
	}
	fmt.Fprintf(io.Stdout, "ok: netns %s (%s): %s live, owner %s %s\n", target, rec.Name, strings.Join(rec.Labels, ","), holder, aliveWord(rec.OwnerAlive))
	return nil
}

// checkCookieSource reads netns cookies as the daemon does; the BPF probe,
// where needed, is attached where the daemon attaches (loader.Cgroup2Root:
// the hybrid fallback, the root check). check is a one-shot command: on a
// kernel before 5.14 each call attaches the probe at the root and detaches
// it (cgroup_mutex, the effective programs of every cgroup recomputed
// twice); docs/usage.md says so, and --attached needs no probe.
func checkCookieSource(getenv Env, cgroup string) (*loader.CookieSource, error) {
	force, err := parseCookieKnob(getenv)
	if err != nil {
		return nil, err
	}
	if !force && loader.HaveSockoptCookie() {
		return loader.NewCookieSource("", false)
	}
	root, err := loader.Cgroup2Root(cgroup, "/proc/self/mountinfo", quietLog())
	if err != nil {
		return nil, err
	}
	return loader.NewCookieSource(root, force)
}

func checkAttached(io IO, pinDir string) error {
	l, err := loader.OpenPinned(pinDir, quietLog())
	if err != nil {
		if errors.Is(err, loader.ErrNotPinned) {
			return fmt.Errorf("no nsredirect state at %s: no daemon has attached", pinDir)
		}
		return err
	}
	defer l.Close()
	if err := l.Intact(); err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "ok: programs attached, state pinned at %s\n", pinDir)
	return nil
}

func aliveWord(alive bool) string {
	if alive {
		return "alive"
	}
	return "dead (rules handed over, waiting for its daemon)"
}

// The states of an enrollment in `status`: whose it is and whether its netns
// still exists. A dead owner of a live netns handed its rules over (they
// keep redirecting until a daemon adopts them); a netns that no longer
// exists has rules nothing can use, which `cleanup --gone` removes.
const (
	stateAlive      = "alive"
	stateHandedOver = "handed-over"
	stateNetnsGone  = "netns-gone"
)

// enrollmentState says which of the states r is in; netnsAlive tells
// whether r's netns still exists.
func enrollmentState(r loader.Record, netnsAlive bool) string {
	switch {
	case r.OwnerAlive:
		return stateAlive
	case !netnsAlive:
		return stateNetnsGone
	default:
		return stateHandedOver
	}
}

// stateText is a state as the status table shows it.
func stateText(state string) string {
	switch state {
	case stateHandedOver:
		return "handed over, waiting for its daemon"
	case stateNetnsGone:
		return "netns gone"
	}
	return state
}

// recordNetnsAlive reports whether the netns of r still exists, looked up
// by its inode under proc (and /run/netns). A record without an inode (of
// an older version) is taken as alive: not proven gone.
func recordNetnsAlive(proc string, r loader.Record) bool {
	return r.NetnsIno == 0 || netnsx.InoAlive(proc, r.NetnsIno)
}

// cleanupGoneCmd is the command that removes what `status` shows as netns
// gone.
func cleanupGoneCmd(pinDir string) string {
	if pinDir == loader.DefaultPinDir {
		return "nsredirect cleanup --gone"
	}
	return "nsredirect cleanup --gone --pin-dir " + pinDir
}

type statusRow struct {
	Netns    string `json:"netns"`
	ID       string `json:"id,omitempty"`
	Cookie   uint64 `json:"cookie"`
	NetnsIno uint64 `json:"netns_inode"`
	Mode     string `json:"mode"`
	Rule     string `json:"rule"`
	OwnerPID uint32 `json:"owner_pid"`
	Holder   string `json:"holder,omitempty"`
	Alive    bool   `json:"owner_alive"`
	// NetnsAlive is whether the netns still exists.
	NetnsAlive bool `json:"netns_alive"`
	// State is alive, handed-over (a dead owner of a live netns) or
	// netns-gone (a dead owner of a netns that no longer exists).
	State string `json:"state"`
	// Fix is the command that clears a netns-gone row.
	Fix       string    `json:"fix,omitempty"`
	Redirects uint64    `json:"redirects"`
	Since     time.Time `json:"since"`
}

// statusJSON is `status --json`.
type statusJSON struct {
	Rules []statusRow       `json:"rules"`
	Maps  []metrics.MapFill `json:"maps"`
}

// statusFlags are the flags of `status`.
type statusFlags struct {
	json   bool
	pinDir string
}

func (f *statusFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.json, "json", false, "print JSON")
	fs.StringVar(&f.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory of the pinned state")
}

func statusCmd(_ context.Context, io IO, args []string) error {
	fs := flagSet("status", io)
	var f statusFlags
	f.register(fs)
	proc := "/proc"
	if err := parse(fs, args, io.Getenv); err != nil {
		return err
	}
	asJSON, pinDir := f.json, f.pinDir
	rows := []statusRow{}
	maps := []metrics.MapFill{}
	l, err := loader.OpenPinned(pinDir, quietLog())
	switch {
	case errors.Is(err, loader.ErrNotPinned):
	case err != nil:
		return err
	default:
		defer l.Close()
		recs, err := l.Records()
		if err != nil {
			return err
		}
		for _, r := range recs {
			netnsAlive := recordNetnsAlive(proc, r)
			state := enrollmentState(r, netnsAlive)
			fix := ""
			if state == stateNetnsGone {
				fix = cleanupGoneCmd(pinDir)
			}
			for i, label := range r.Labels {
				rows = append(rows, statusRow{
					Netns: r.Name, ID: r.ID, Cookie: r.Cookie, NetnsIno: r.NetnsIno, Mode: r.Owner, Rule: label,
					OwnerPID: r.OwnerPID, Holder: r.Holder, Alive: r.OwnerAlive, NetnsAlive: netnsAlive, State: state, Fix: fix,
					Redirects: r.Redirects[i], Since: r.Enrolled.UTC(),
				})
			}
		}
		if maps, err = l.Fill(); err != nil {
			return err
		}
	}
	if asJSON {
		enc := json.NewEncoder(io.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(statusJSON{Rules: rows, Maps: maps})
	}
	if len(rows) == 0 {
		fmt.Fprintf(io.Stdout, "no rules live (pin dir %s)\n", pinDir)
	} else {
		tw := tabwriter.NewWriter(io.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NETNS\tRULE\tMODE\tOWNER\tHELD BY\tREDIRECTS\tCOOKIE\tID")
		gone := 0
		for _, r := range rows {
			if r.State == stateNetnsGone {
				gone++
			}
			holder := r.Holder
			if holder == "" {
				holder = fmt.Sprintf("pid %d", r.OwnerPID)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", r.Netns, r.Rule, r.Mode, stateText(r.State), holder, r.Redirects, r.Cookie, orDash(r.ID))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if gone > 0 {
			fmt.Fprintf(io.Stdout, "\n%d rule(s) of netns that no longer exist: `%s` removes them\n", gone, cleanupGoneCmd(pinDir))
		}
	}
	if len(maps) > 0 {
		fmt.Fprintln(io.Stdout)
		tw := tabwriter.NewWriter(io.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "MAP\tENTRIES\tCAPACITY\tFILL")
		for _, m := range maps {
			pct := 0.0
			if m.Capacity > 0 {
				pct = 100 * float64(m.Entries) / float64(m.Capacity)
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f%%\n", m.Map, m.Entries, m.Capacity, pct)
		}
		return tw.Flush()
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// cleanupFlags are the flags of `cleanup`.
type cleanupFlags struct {
	all, gone bool
	pinDir    string
}

func (f *cleanupFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.all, "all", false, "remove every rule, program, link and pin of ours, even of live daemons")
	fs.BoolVar(&f.gone, "gone", false, "remove only the rules of dead daemons whose netns no longer exists (status: netns gone), keeping those handed over for a live netns")
	fs.StringVar(&f.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory of the pinned state")
}

func cleanupCmd(_ context.Context, io IO, args []string) error {
	fs := flagSet("cleanup", io)
	var f cleanupFlags
	f.register(fs)
	if err := parse(fs, args, io.Getenv); err != nil {
		return err
	}
	all, gone, pinDir := f.all, f.gone, f.pinDir
	if all && gone {
		return usagef("--all and --gone together: --all removes everything, --gone only the rules of netns that no longer exist; pick one")
	}
	if err := loader.CheckPrivileges(); err != nil {
		return err
	}
	l, err := loader.OpenPinned(pinDir, quietLog())
	if errors.Is(err, loader.ErrNotPinned) {
		fmt.Fprintf(io.Stdout, "nothing to clean up at %s\n", pinDir)
		return nil
	}
	if err != nil {
		return err
	}
	defer l.Close()
	match := func(r loader.Record) bool { return all || !r.OwnerAlive }
	if gone {
		match = func(r loader.Record) bool { return !r.OwnerAlive && !recordNetnsAlive("/proc", r) }
	}
	removed, err := l.CleanupWhere(match)
	for _, r := range removed {
		fmt.Fprintf(io.Stdout, "removed netns %s (%s), owner pid %d %s\n", r.Name, strings.Join(r.Labels, ","), r.OwnerPID, map[bool]string{true: "alive", false: "dead"}[r.OwnerAlive])
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "cleanup done: %d enrollment(s) removed\n", len(removed))
	return nil
}
