package loader

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// How the netns cookie of a namespace is learnt, as logged at start-up.
const (
	// CookieSockopt reads getsockopt(SO_NETNS_COOKIE), Linux >= 5.14.
	CookieSockopt = "sockopt"
	// CookieBPFProbe asks the kernel through the probe program in
	// bpf/netns_cookie.c, for Linux 5.9 to 5.13.
	CookieBPFProbe = "bpf-probe"
)

// probePort is where a probe socket connects (network byte order is the
// program's business); it must match NSR_PROBE_PORT in bpf/netns_cookie.c.
const probePort = 9

// CookieSource reads the cookie of the network namespace the calling thread
// is in: the same number bpf_get_netns_cookie() gives the programs, so rules
// written under it match. Read is meant to run inside netnsx.Target.Do.
type CookieSource struct {
	// Name is CookieSockopt or CookieBPFProbe.
	Name   string
	cgroup string
	// mu serializes probes, which share the probe map.
	mu   sync.Mutex
	objs *bpfobj.NetnsCookieObjects
	// lnk keeps the probe attached for the source's life: an attach or
	// detach at the root takes cgroup_mutex and recomputes the effective
	// programs of every cgroup on the host, so it is done once, not per read.
	lnk link.Link
}

// HaveSockoptCookie reports whether getsockopt(SO_NETNS_COOKIE) works
// (Linux >= 5.14): then a CookieSource needs no cgroup.
func HaveSockoptCookie() bool { return probeNetnsCookie() == nil }

// NewCookieSource picks SO_NETNS_COOKIE where the kernel has it and the BPF
// probe otherwise, or always with forceProbe (how tests cover the probe on a
// new kernel). The probe program is attached at cgroup, which must hold this
// process, once, until Close. Call after CheckKernel.

func NewCookieSource(cgroup string, forceProbe bool) (*CookieSource, error) {
	if !forceProbe {
		if err := probeNetnsCookie(); err == nil {
			return &CookieSource{Name: CookieSockopt}, nil
		} else if !errors.Is(err, ebpf.ErrNotSupported) {
			return nil, fmt.Errorf("probe getsockopt(SO_NETNS_COOKIE): %w", err)
		}
	}
	if err := removeMemlock(); err != nil {
		return nil, err
	}
	var objs bpfobj.NetnsCookieObjects
	if err := bpfobj.LoadNetnsCookieObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("load the netns cookie probe program (needs bpf_get_socket_cookie and bpf_get_netns_cookie in cgroup/connect4, Linux >= 5.7): %w", err)
	}
	s := &CookieSource{Name: CookieBPFProbe, cgroup: cgroup, objs: &objs}
	lnk, err := s.attach()
	if err != nil {
		objs.Close()
		return nil, err
	}
	s.lnk = lnk
	return s, nil
}

// Read returns the cookie of the calling thread's network namespace.
func (s *CookieSource) Read() (uint64, error) {
	if s.Name == CookieSockopt {
		return netnsx.SockoptCookie()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.objs == nil {
		return 0, errors.New("netns cookie probe: already closed")
	}
	return s.ask()
}

func (s *CookieSource) attach() (link.Link, error) {
	lnk, err := link.AttachCgroup(link.CgroupOptions{Path: s.cgroup, Attach: ebpf.AttachCGroupInet4Connect, Program: s.objs.NsrNetnsCookie})
	if err != nil {
		return nil, fmt.Errorf("attach the netns cookie probe to cgroup %s: %w", s.cgroup, err)
	}
	return lnk, nil
}

// ask runs one probe: a UDP socket of this thread's netns, filed under its
// socket cookie, connect()ed to 127.0.0.1:9 so the attached program fills in
// the netns cookie and refuses the connect.
func (s *CookieSource) ask() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("netns cookie probe: socket: %w", err)
	}
	defer unix.Close(fd)
	sock, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("netns cookie probe: getsockopt(SO_COOKIE) (Linux >= 4.12): %w", err)
	}
	probe := s.objs.NsrNetnsProbe
	if err := probe.Update(sock, uint64(0), ebpf.UpdateNoExist); err != nil {
		return 0, fmt.Errorf("netns cookie probe: file socket %d: %w", sock, err)
	}
	defer func() { _ = probe.Delete(sock) }()

	err = unix.Connect(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: probePort})
	var netns uint64
	if lerr := probe.Lookup(sock, &netns); lerr != nil {
		return 0, fmt.Errorf("netns cookie probe: read the answer: %w", lerr)
	}
	if !errors.Is(err, unix.EPERM) || netns == 0 {
		// The program did not see our connect: this process is not in the
		// cgroup it was attached to.
		return 0, fmt.Errorf("netns cookie probe: the probe program did not run for this process (connect: %v); run nsredirect in a cgroup under %s, or pass the cgroup2 root as --cgroup", err, s.cgroup)
	}
	return netns, nil
}

// Close detaches and unloads the probe program. A nil source has nothing to
// close.
func (s *CookieSource) Close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.objs == nil {
		return nil
	}
	var err error
	if s.lnk != nil {
		err = s.lnk.Close()
		s.lnk = nil
	}
	err = errors.Join(err, s.objs.Close())
	s.objs = nil
	return err
}

// probeNetnsCookie reports ebpf.ErrNotSupported on kernels before 5.14.
func probeNetnsCookie() error {
	_, err := netnsx.SockoptCookie()
	if errors.Is(err, unix.ENOPROTOOPT) {
		return ebpf.ErrNotSupported
	}
	return err
}
