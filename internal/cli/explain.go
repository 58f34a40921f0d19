package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nsredirect/nsredirect/internal/entry"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/trace"
)

// A step of explain's walk.
type explainStep struct {
	Step   string `json:"step"`
	Result string `json:"result"` // pass, fail, note (does not decide), skip
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

const (
	stepPass = "pass"
	stepFail = "fail"
	stepNote = "note"
)

// parseDest reads ADDR:PORT[/udp|/tcp].
func parseDest(s string) (entry.Dest, error) {
	d := entry.Dest{Proto: entry.TCP}
	ap := s
	if a, p, ok := strings.Cut(s, "/"); ok {
		ap = a
		switch p {
		case "tcp":
		case "udp":
			d.Proto = entry.UDP
		default:
			return d, usagef("destination %q: protocol %q; use ADDR:PORT, ADDR:PORT/udp or ADDR:PORT/tcp", s, p)
		}
	}
	addr, err := netip.ParseAddrPort(ap)
	if err != nil || addr.Port() == 0 {
		return d, usagef("destination %q: use ADDR:PORT[/udp], e.g. 127.0.0.1:80 or [::1]:53/udp", s)
	}
	d.Addr, d.Port = addr.Addr(), addr.Port()
	return d, nil
}

// explainArgs splits DEST from the flags, wherever it is among them: an
// argument that is neither a flag nor a flag's value. More than one such
// argument leaves the others in flags, for parse to refuse.
func explainArgs(args []string) (dest string, flags []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case strings.HasPrefix(a, "-"):
			flags = append(flags, a)
			if takesValue(a) && i+1 < len(args) {
				i++
				flags = append(flags, args[i])
			}
		case dest == "":
			dest = a
		default:
			flags = append(flags, a)
		}
	}
	return dest, flags
}

// takesValue reports whether flag arg (not in --name=value form) takes
// the next argument as its value: every flag of explain but the booleans.
func takesValue(arg string) bool {
	name := strings.TrimLeft(arg, "-")
	return !strings.Contains(name, "=") && name != "dial" && name != "json"
}

type explainFlags struct {
	target         targetFlags
	pinDir, cgroup string
	dial, json     bool
}

func (f *explainFlags) register(fs *flag.FlagSet) {
	f.target.register(fs, "explain for")
	fs.StringVar(&f.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory of the pinned state")
	fs.StringVar(&f.cgroup, "cgroup", "", "cgroup2 mount the daemon attaches at, as its --cgroup (default: the first cgroup2 mount)")
	fs.BoolVar(&f.dial, "dial", false, "also connect (or send one datagram) to DEST from inside the target and report what the kernel decided, as trace sees it")
	fs.BoolVar(&f.json, "json", false, "print the steps as JSON")
}

func explainCmd(_ context.Context, io IO, args []string) error {
	fs := flagSet("explain", io)
	var f explainFlags
	f.register(fs)
	destArg, flags := explainArgs(args)
	if err := parse(fs, flags, io.Getenv); err != nil {
		return err
	}
	tf, pinDir, cgroup, dial, asJSON := f.target, f.pinDir, f.cgroup, f.dial, f.json
	if destArg == "" {
		return usagef("no destination: give ADDR:PORT[/udp] after the target, e.g. `nsredirect explain --container web 127.0.0.1:80`")
	}
	dest, err := parseDest(destArg)
	if err != nil {
		return err
	}
	if tf.netns == "" && tf.container == "" && tf.pod == "" {
		return usagef("no target: give --netns TARGET, --container NAME or --pod NAMESPACE/NAME")
	}
	filter, err := tf.filter()
	if err != nil {
		return err
	}
	if err := loader.CheckPrivileges(); err != nil {
		return err
	}
	root, err := loader.Cgroup2Root(cgroup, "/proc/self/mountinfo", quietLog())
	if err != nil {
		return err
	}
	e := &explainer{io: io, pinDir: pinDir, root: root, dest: dest, filter: filter, targets: tf}
	ok := e.walk(dial)
	if asJSON {
		enc := json.NewEncoder(io.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			Destination string        `json:"destination"`
			Redirected  bool          `json:"redirected"`
			Steps       []explainStep `json:"steps"`
		}{destString(dest), ok, e.steps}); err != nil {
			return err
		}
	} else {
		for _, s := range e.steps {
			fmt.Fprintf(io.Stdout, "%-5s %-9s %s\n", strings.ToUpper(s.Result), s.Step, s.Detail)
			if s.Fix != "" {
				fmt.Fprintf(io.Stdout, "      %-9s fix: %s\n", "", s.Fix)
			}
		}
	}
	if !ok {
		for _, s := range e.steps {
			if s.Result == stepFail {
				return fmt.Errorf("%s would not be redirected: %s: %s", destString(dest), s.Step, s.Detail)
			}
		}
	}
	if !asJSON {
		fmt.Fprintf(io.Stdout, "%s would be redirected to %s\n", destString(dest), e.to)
	}
	return nil
}

func destString(d entry.Dest) string {
	return netip.AddrPortFrom(d.Addr, d.Port).String() + "/" + d.Proto.String()
}

type explainer struct {
	io      IO
	pinDir  string
	root    string
	dest    entry.Dest
	filter  traceFilter
	targets targetFlags
	steps   []explainStep
	to      netip.AddrPort
}

func (e *explainer) add(step, result, detail, fix string) bool {
	e.steps = append(e.steps, explainStep{step, result, detail, fix})
	return result != stepFail
}

// enrollHint is how the target gets a rule for dest, in its mode.
func (e *explainer) enrollHint() string {
	spec := fmt.Sprintf("%d=PORT", e.dest.Port)
	if e.dest.Proto == entry.UDP {
		spec += "/udp"
	}
	switch {
	case e.targets.container != "":
		return fmt.Sprintf("label the container nsredirect.redirect=%s (or the label `nsredirect docker --label` reads) and recreate it", spec)
	case e.targets.pod != "":
		return fmt.Sprintf("annotate the pod nsredirect.io/redirect: %s (or the annotation `nsredirect kube --annotation` reads)", spec)
	}
	return fmt.Sprintf("`nsredirect run --netns %s --redirect %s`", e.targets.netns, spec)
}

// walk takes each step of the decision in the order the kernel does and
// reports whether the redirect would happen.
func (e *explainer) walk(dial bool) bool {
	family := 6
	if e.dest.Addr.Is4() {
		family = 4
	}
	// The programs only ever look at loopback and unspecified
	// destinations.
	if a := e.dest.Addr.Unmap(); !a.IsLoopback() && !a.IsUnspecified() {
		return e.add("dest", stepFail, fmt.Sprintf("%s is neither loopback nor unspecified: nsredirect never redirects it", destString(e.dest)), "dial 127.0.0.1 (or ::1), where the rule applies")
	}

	l, err := loader.OpenPinned(e.pinDir, quietLog())
	if errors.Is(err, loader.ErrNotPinned) {
		return e.add("state", stepFail, fmt.Sprintf("no nsredirect state at %s: no daemon has enrolled anything", e.pinDir), e.enrollHint())
	}
	if err != nil {
		return e.add("state", stepFail, err.Error(), advice("explain", err))
	}
	defer l.Close()
	e.add("state", stepPass, fmt.Sprintf("pinned state at %s, layout version %d (this build's)", e.pinDir, loader.LayoutVersion), "")

	rec, target, ok := e.netnsStep(l)
	if !ok {
		return false
	}
	hit, found, err := l.RuleFor(rec.Cookie, e.dest)
	switch {
	case err != nil:
		return e.add("rule", stepFail, err.Error(), "")
	case !found:
		return e.add("rule", stepFail, fmt.Sprintf("no rule for %s in this netns; its rules: %s", destString(e.dest), strings.Join(rec.Labels, ", ")), e.enrollHint())
	}
	e.to = hit.To
	e.add("rule", stepPass, fmt.Sprintf("%s → %s (rule %s)", destString(e.dest), hit.To, orDash(hit.Label)), "")

	ok = e.programsStep(l, family, rec)
	if rec.OwnerAlive {
		holder := rec.Holder
		if holder == "" {
			holder = fmt.Sprintf("pid %d", rec.OwnerPID)
		}
		e.add("owner", stepPass, fmt.Sprintf("%s daemon, %s, alive", rec.Owner, holder), "")
	} else {
		e.add("owner", stepNote, fmt.Sprintf("%s daemon pid %d is gone: the rules were handed over and still redirect, waiting for its daemon", rec.Owner, rec.OwnerPID), "start its daemon again to adopt them")
	}
	if ok && dial {
		ok = e.dialStep(target, rec.Cookie)
	}
	return ok && !slices.ContainsFunc(e.steps, func(s explainStep) bool { return s.Result == stepFail })
}

// netnsStep finds the target's netns, its cookie and its enrollment.
func (e *explainer) netnsStep(l *loader.Loader) (loader.Record, netnsx.Target, bool) {
	recs, err := l.Records()
	if err != nil {
		return loader.Record{}, netnsx.Target{}, e.add("netns", stepFail, err.Error(), "")
	}
	var target netnsx.Target
	var rec loader.Record
	found := false
	if e.targets.netns != "" {
		target, _ = netnsx.ParseTarget(e.targets.netns)
		cookies, err := checkCookieSource(e.io.Getenv, e.root)
		if err != nil {
			return rec, target, e.add("netns", stepFail, err.Error(), "")
		}
		cookie, _, err := target.ResolveWith(cookies.Read)
		cookies.Close()
		if err != nil {
			return rec, target, e.add("netns", stepFail, err.Error(), "")
		}
		for _, r := range recs {
			if r.Cookie == cookie {
				rec, found = r, true
			}
		}
		if !found {
			return rec, target, e.add("netns", stepFail, fmt.Sprintf("netns %s (cookie %d) is not enrolled", target, cookie), e.enrollHint())
		}
	} else {
		for _, r := range recs {
			if e.filter.matches(r) {
				rec, found = r, true
			}
		}
		what := "container " + e.targets.container
		if e.targets.pod != "" {
			what = "pod " + e.targets.pod
		}
		if !found {
			return rec, target, e.add("netns", stepFail, what+" is not enrolled (no rule of nsredirect names it)", e.enrollHint())
		}
		id, err := netnsx.InoLiveID(rec.NetnsIno)
		pids := netnsx.PIDsIn("/proc", id)
		if err != nil || len(pids) == 0 {
			return rec, target, e.add("netns", stepFail, fmt.Sprintf("%s is enrolled (cookie %d) but no process is in its netns any more: netns gone", what, rec.Cookie), cleanupGoneCmd(e.pinDir))
		}
		target, _ = netnsx.ParseTarget(fmt.Sprintf("/proc/%d/ns/net", pids[0]))
	}
	e.add("netns", stepPass, fmt.Sprintf("%s, cookie %d, enrolled by %s as %s", target, rec.Cookie, rec.Owner, rec.Name), "")
	return rec, target, true
}

// programsStep checks that the program of our pinned link for the hook
// that decides dest is in effect at the cgroup of every process of the
// netns, read from the kernel, and says whether it is this build's.
func (e *explainer) programsStep(l *loader.Loader, family int, rec loader.Record) bool {
	hook := loader.HookFor(e.dest.Proto, family)
	p, attached, err := l.LinkProgram(hook)
	if err != nil {
		return e.add("programs", stepFail, err.Error(), "")
	}
	if !attached {
		fix := "restart the daemon: it attaches its programs again within a second"
		if e.dest.Proto == entry.UDP {
			fix = "UDP programs are attached only while a UDP rule is live; " + fix
		}
		return e.add("programs", stepFail, fmt.Sprintf("the %s link is not attached", hook), fix)
	}
	cgroups := map[string][]int{}
	if id, err := netnsx.InoLiveID(rec.NetnsIno); err == nil {
		for _, pid := range netnsx.PIDsIn("/proc", id) {
			if cg, err := processCgroup(e.root, pid); err == nil {
				cgroups[cg] = append(cgroups[cg], pid)
			}
		}
	}
	if len(cgroups) == 0 {
		cgroups[e.root] = nil // a process yet to come: whatever the root runs
	}
	ok := true
	for _, cg := range slices.Sorted(maps.Keys(cgroups)) {
		ids, err := loader.EffectivePrograms(cg, p.Attach)
		who := fmt.Sprintf("cgroup %s", cg)
		if pids := cgroups[cg]; len(pids) > 0 {
			who += fmt.Sprintf(" (pid %s)", joinInts(pids, 5))
		}
		switch {
		case err != nil:
			ok = e.add("programs", stepFail, err.Error(), "")
		case !slices.Contains(ids, p.ID):
			ok = e.add("programs", stepFail, fmt.Sprintf("%s program %d (%s) is attached at the root but not in effect for %s; in effect there: %v", hook, p.ID, p.Name, who, ids),
				fmt.Sprintf("a program attached below the root without BPF_F_ALLOW_MULTI hides ours: see `bpftool cgroup tree %s`", cg))
		default:
			e.add("programs", stepPass, fmt.Sprintf("%s program %d (%s) in effect for %s, %d program(s) in all", hook, p.ID, p.Name, who, len(ids)), "")
		}
	}
	if p.ThisBuild {
		e.add("version", stepPass, fmt.Sprintf("the %s link runs this build's program (tag %s) on layout %d", hook, p.Tag, loader.LayoutVersion), "")
	} else {
		e.add("version", stepNote, fmt.Sprintf("the %s link runs program tag %s, not this build's: another nsredirect version of layout %d attached it", hook, p.Tag, loader.LayoutVersion), "fine while it serves; to run this version's, restart the daemons with it")
	}
	return ok
}

// dialStep connects to dest from inside the target (or sends a datagram)
// and reports the verdict the trace programs saw.
func (e *explainer) dialStep(target netnsx.Target, cookie uint64) bool {
	t, err := trace.Open(trace.Options{PinDir: e.pinDir, Cgroup: e.root})
	if err != nil {
		return e.add("dial", stepFail, err.Error(), "")
	}
	defer t.Close()
	if err := t.SetNetns(map[uint64]bool{cookie: true}); err != nil {
		return e.add("dial", stepFail, err.Error(), "")
	}
	events := make(chan trace.Event, 16)
	go func() {
		defer close(events)
		for {
			ev, err := t.Read()
			if err != nil {
				return
			}
			events <- ev
		}
	}()
	addr := netip.AddrPortFrom(e.dest.Addr, e.dest.Port).String()
	var dialErr error
	err = target.Do(func() error {
		if e.dest.Proto == entry.UDP {
			c, err := net.ListenPacket("udp", ":0")
			if err != nil {
				return err
			}
			defer c.Close()
			ua, err := net.ResolveUDPAddr("udp", addr)
			if err != nil {
				return err
			}
			_, dialErr = c.WriteTo([]byte("nsredirect explain"), ua)
			return nil
		}
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			c.Close()
		}
		dialErr = err
		return nil
	})
	if err != nil {
		return e.add("dial", stepFail, fmt.Sprintf("enter netns %s: %v", target, err), "")
	}
	deadline := time.After(2 * time.Second)
	for {
		select {
		case ev, open := <-events:
			if !open {
				return e.add("dial", stepFail, "the trace ended before an event came", "")
			}
			if ev.Dialled.Port() != e.dest.Port || ev.Hook == "recvmsg" || ev.Hook == "getpeername" {
				continue
			}
			detail := fmt.Sprintf("%s %s %s: the kernel said %s to %s", ev.Proto, ev.Hook, ev.Dialled, ev.Verdict, ev.Target)
			if dialErr != nil {
				detail += fmt.Sprintf(" (then: %v)", dialErr)
			}
			if ev.Verdict != trace.Redirected {
				return e.add("dial", stepFail, detail, "")
			}
			fix := ""
			res := stepPass
			if dialErr != nil {
				res, fix = stepNote, fmt.Sprintf("redirected, but nothing answered at %s: is the backend listening there?", ev.Target)
			}
			e.add("dial", res, detail, fix)
			return true
		case <-deadline:
			return e.add("dial", stepFail, fmt.Sprintf("no decision seen for a %s to %s within 2s (dial: %v)", e.dest.Proto, addr, dialErr), "")
		}
	}
}

// processCgroup is the cgroup2 directory of pid under root.
func processCgroup(root string, pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(root, p), nil
		}
	}
	return "", fmt.Errorf("pid %d is in no cgroup2 cgroup", pid)
}

func joinInts(xs []int, max int) string {
	var s []string
	for i, x := range xs {
		if i == max {
			s = append(s, fmt.Sprintf("and %d more", len(xs)-max))
			break
		}
		s = append(s, fmt.Sprint(x))
	}
	return strings.Join(s, ", ")
}
