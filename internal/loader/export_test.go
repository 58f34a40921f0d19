package loader

import (
	"io"
)

// Attach attaches the probe program until the returned closer is closed, so
// a test can watch other sockets' connects while it is in place.
func (s *CookieSource) Attach() (io.Closer, error) {
	return s.attach()
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
