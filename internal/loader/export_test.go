package loader

import (
	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// ProbeIDs returns the IDs of the probe program and of the link that keeps
// it attached; zero when nothing is attached.
func (s *CookieSource) ProbeIDs() (prog, lnk int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lnk == nil {
		return 0, 0, nil
	}
	info, err := s.lnk.Info()
	if err != nil {
		return 0, 0, err
	}
	return int(info.Program), int(info.ID), nil
}

// Pending counts the entries left in the probe map: every probe must remove
// its own.
func (s *CookieSource) Pending() (int, error) {
	var k, v uint64
	n := 0
	it := s.objs.NsrNetnsProbe.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

func loadSpec() (*ebpf.CollectionSpec, error) { return bpfobj.LoadRedirect() }

// LinkProvenAttached is the per-second check of Heal.
func LinkProvenAttached(path string, at ebpf.AttachType) bool {
	_, ok := pinnedCgroupLinkAttached(path, at)
	return ok
}
