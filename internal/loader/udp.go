package loader

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/entry"
)

// udpHooks run only while some netns of the host has a UDP rule: sendmsg
// and recvmsg run per datagram, so a host without UDP rules must not pay for
// them. Their programs are pinned at every start (prog_<name>), their links
// (link_<name>) exist exactly while the rule map holds a UDP entry. The UDP
// connect programs sit on the connect hooks next to the TCP ones (a cgroup
// bpf_link attaches with multi-program semantics); getpeername is shared.
var udpHooks = []hook{
	{bpfobj.RedirectProgNsrUdpConnect4, ebpf.AttachCGroupInet4Connect, HookUDPConnect4},
	{bpfobj.RedirectProgNsrUdpConnect6, ebpf.AttachCGroupInet6Connect, HookUDPConnect6},
	{bpfobj.RedirectProgNsrSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, HookSendmsg4},
	{bpfobj.RedirectProgNsrSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, HookSendmsg6},
	{bpfobj.RedirectProgNsrRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, HookRecvmsg4},
	{bpfobj.RedirectProgNsrRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, HookRecvmsg6},
}

// Kernel protocol numbers in rule_key.proto.
const (
	ipprotoTCP = 6
	ipprotoUDP = 17
)

func protoNumber(p entry.Proto) uint8 {
	if p == entry.UDP {
		return ipprotoUDP
	}
	return ipprotoTCP
}

// anyUDPRule reports whether the rule map holds a UDP entry, for any netns:
// the kernel, not the records, says whether the UDP hooks are needed.
func (l *Loader) anyUDPRule() (bool, error) {
	found := false
	err := scanRules(l.maps.NsrRules, func(k bpfobj.RedirectRuleKey, _ bpfobj.RedirectRuleVal) {
		if k.Proto == ipprotoUDP {
			found = true
		}
	})
	if err != nil {
		return false, fmt.Errorf("look for UDP rules: %w", err)
	}
	return found, nil
}

// attachUDP pins the UDP programs of a freshly loaded collection and, at
// start, brings their links in line with the rule map: an attached link
// gets the new program through link.Update, a detached or defunct one is
// replaced while UDP rules are live, and links left while none is are
// removed.
func (l *Loader) attachUDP(coll *ebpf.Collection, cgroup string, cgroupID uint64) error {
	want, err := l.anyUDPRule()
	if err != nil {
		return err
	}
	for _, h := range udpHooks {
		prog := coll.Programs[h.prog]
		if want {
			if err := l.attachHook(h, prog, cgroup, cgroupID); err != nil {
				return err
			}
			continue
		}
		l.detachUDP(h)
		if err := pinAtomically(prog, l.pins.prog(h)); err != nil {
			return err
		}
	}
	return nil
}

// udpScanEvery: Heal scans the rule map for UDP rules (syncUDP) only every
// this many calls while the UDP links are as they should be: pinned and
// attached, or none pinned. A new UDP rule attaches the links in the
// Enroll that adds it, and removing the last one removes them, in
// whichever daemon does it. What is left, a link pin removed by hand under
// a live UDP rule or a rule gone with no daemon's help, is found by the
// scan. A pinned UDP link that is detached is re-created at the next
// resync, like the TCP ones.
const udpScanEvery = 10

// anyUDPPinned reports whether a link of a UDP hook is pinned.
func (l *Loader) anyUDPPinned() bool {
	for _, h := range udpHooks {
		if _, err := os.Lstat(l.pins.link(h)); err == nil {
			return true
		}
	}
	return false
}

// syncUDP attaches the UDP hooks from their pinned programs when the rule
// map holds a UDP entry and they are not attached, and removes their links
// when it holds none. Called with the pin dir locked, after every change of
// the rule map. It returns the hooks it attached.
func (l *Loader) syncUDP() ([]string, error) {
	want, err := l.anyUDPRule()
	if err != nil {
		return nil, err
	}
	return l.syncUDPFor(want)
}

// syncUDPFor attaches the UDP hooks (want) or removes them.
func (l *Loader) syncUDPFor(want bool) ([]string, error) {
	if !want {
		for _, h := range udpHooks {
			l.detachUDP(h)
		}
		return nil, nil
	}
	if l.cgroup == "" {
		// Opened for status or cleanup: the daemons' Heal attaches it.
		var errs []error
		for _, h := range udpHooks {
			if ok, err := linkAttached(l.pins.link(h)); err != nil {
				errs = append(errs, err)
			} else if !ok {
				errs = append(errs, fmt.Errorf("the %s hook of the UDP rules is not attached; a running daemon re-attaches it at its next resync", h.name))
			}
		}
		return nil, errors.Join(errs...)
	}
	cgroupID, err := inodeOf(l.cgroup)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", l.cgroup, err)
	}
	attached, err := l.reattachDetached(udpHooks, l.cgroup, cgroupID)
	for _, name := range attached {
		l.log.WithFields(logrus.Fields{"hook": name, "cgroup": l.cgroup}).Info("a UDP rule is live: attached at cgroup2 root")
	}
	return attached, err
}

// detachUDP removes the pinned link of h, its last reference: the program
// leaves the hook.
func (l *Loader) detachUDP(h hook) {
	if err := os.Remove(l.pins.link(h)); err == nil {
		l.log.WithField("hook", h.name).Info("no UDP rule is left: detached")
	}
}

// UDPHooksAttached reports whether every UDP hook has an attached link.
func (l *Loader) UDPHooksAttached() (bool, error) {
	for _, h := range udpHooks {
		ok, err := linkAttached(l.pins.link(h))
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}
