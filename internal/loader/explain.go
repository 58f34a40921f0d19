package loader

// What `nsredirect explain` asks of the kernel: the rule entry for one
// destination, the program each pinned link runs against this build's, and
// the programs in effect at a cgroup.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/entry"
)

// RuleHit is the rule map's entry for one destination.
type RuleHit struct {
	// To is where the connect goes.
	To netip.AddrPort
	// Label is the rule's label in the enrollment record ("" if unknown).
	Label string
}

// RuleFor looks dst up in the rule map for netns cookie, as the programs
// do; ok is false when no entry matches.
func (l *Loader) RuleFor(cookie uint64, dst entry.Dest) (hit RuleHit, ok bool, err error) {
	k, _ := ruleEntry(cookie, 0, entry.Entry{Match: dst})
	var v bpfobj.RedirectRuleVal
	if err := l.maps.NsrRules.Lookup(k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return hit, false, nil
		}
		return hit, false, fmt.Errorf("look %s/%s up in the rule map: %w", netip.AddrPortFrom(dst.Addr, dst.Port), dst.Proto, err)
	}
	to := dst.Addr
	if v.KeepAddr == 0 {
		to = wordsAddr(k.Family, v.Addr)
	}
	hit.To = netip.AddrPortFrom(to, htons(v.Port))
	recs, err := l.Records()
	if err == nil {
		for _, r := range recs {
			if r.Cookie == cookie && int(v.Index) < len(r.Labels) {
				hit.Label = r.Labels[v.Index]
			}
		}
	}
	return hit, true, nil
}

func wordsAddr(family uint8, w [4]uint32) netip.Addr {
	var b [16]byte
	for i, x := range w {
		binary.NativeEndian.PutUint32(b[4*i:], x)
	}
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// HookFor names the hook whose program decides a destination of proto and
// family (4 or 6): connect for TCP, sendmsg for UDP (connect too).
func HookFor(proto entry.Proto, family int) string {
	switch {
	case proto == entry.UDP && family == 4:
		return HookSendmsg4
	case proto == entry.UDP:
		return HookSendmsg6
	case family == 4:
		return HookConnect4
	}
	return HookConnect6
}

// PinnedProgram is the program the pinned link of a hook runs.
type PinnedProgram struct {
	ID     ebpf.ProgramID
	Name   string
	Attach ebpf.AttachType
	// Tag is the program's tag; ThisBuild whether it is this build's.
	Tag       string
	ThisBuild bool
}

// LinkProgram reads the program the pinned link of hook (a name of
// HookNames or UDPHookNames) runs; ok is false when the link is not pinned
// or no longer attached.
func (l *Loader) LinkProgram(hookName string) (p PinnedProgram, ok bool, err error) {
	var h hook
	for _, x := range allHooks() {
		if x.name == hookName {
			h = x
		}
	}
	if h.name == "" {
		return p, false, fmt.Errorf("no hook %q", hookName)
	}
	p.Attach = h.attach
	attached, _, err := pinnedLinkProgram(l.pins.link(h), func(_ link.Link, id ebpf.ProgramID) (bool, error) {
		p.ID = id
		return false, nil
	})
	if err != nil || !attached {
		return p, false, err
	}
	prog, err := ebpf.NewProgramFromID(p.ID)
	if err != nil {
		return p, true, fmt.Errorf("open program %d of the %s link: %w", p.ID, h.name, err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return p, true, fmt.Errorf("read program %d: %w", p.ID, err)
	}
	p.Name, p.Tag = info.Name, info.Tag
	p.ThisBuild, err = l.isThisBuild(h, p.Tag)
	return p, true, err
}

// isThisBuild reports whether a program of tag is this build's for h: the
// kernel's tag of this build's program, loaded on the pinned maps (the
// tag covers the instructions as loaded).
func (l *Loader) isThisBuild(h hook, tag string) (bool, error) {
	spec, err := bpfobj.LoadRedirect()
	if err != nil {
		return false, err
	}
	for name := range spec.Programs {
		if name != h.prog {
			delete(spec.Programs, name)
		}
	}
	repl := map[string]*ebpf.Map{}
	for name, m := range l.programMaps() {
		if m != nil {
			repl[name] = m
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return false, fmt.Errorf("load this build's %s program to compare: %w", h.name, err)
	}
	defer coll.Close()
	info, err := coll.Programs[h.prog].Info()
	if err != nil {
		return false, err
	}
	return info.Tag == tag, nil
}

// EffectivePrograms lists the programs the kernel runs at attach point at
// for sockets of the cgroup at path (BPF_F_QUERY_EFFECTIVE: those attached
// there and at every ancestor that let them through), as `bpftool cgroup
// tree` shows them. The attribute has Linux 4.15's layout: newer layouts
// are refused by 5.10 once a program is attached (E2BIG).
func EffectivePrograms(path string, at ebpf.AttachType) ([]ebpf.ProgramID, error) {
	cg, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", path, err)
	}
	defer cg.Close()
	ids := make([]uint32, 64)
	attr := struct {
		targetFd, attachType, queryFlags, attachFlags uint32
		progIDs                                       uint64
		progCnt                                       uint32
		_                                             uint32
	}{targetFd: uint32(cg.Fd()), attachType: uint32(at), queryFlags: unix.BPF_F_QUERY_EFFECTIVE, progIDs: uint64(uintptr(unsafe.Pointer(&ids[0]))), progCnt: uint32(len(ids))}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_QUERY, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(ids)
	if errno != 0 {
		return nil, fmt.Errorf("query the programs in effect at cgroup %s: %w", path, errno)
	}
	out := make([]ebpf.ProgramID, 0, attr.progCnt)
	for _, id := range ids[:min(int(attr.progCnt), len(ids))] {
		out = append(out, ebpf.ProgramID(id))
	}
	return out, nil
}

// LayoutVersion is the layout of the pinned state this build reads.
const LayoutVersion = layoutVersion
