package daemon

import (
	"errors"
	"strings"
	"testing"

	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestHostNetnsUnknownFailsClosed: with no host process visible (the proc
// root of a container's own pid namespace, or ns files it may not read)
// and init_net's fixed inode neither seen nor promised by the kernel
// release, netnsx.FindHost says why it cannot tell, and the daemon refuses
// every target instead of enrolling it with a warning.
func TestHostNetnsUnknownFailsClosed(t *testing.T) {
	root := t.TempDir() // no 1/, no 2/: nothing of the host visible
	testenv.Privileged(t)
	ns := testenv.NewNetns(t)
	// In a netns of its own (no witness of the fixed inode) the release
	// decides: before 6.18 unknown, from 6.18 init_net's fixed inode.
	err := ns.Target().Do(func() error {
		if _, err := netnsx.FindHost(root, netnsx.HostOptions{Release: "6.12.57+deb13-amd64"}); !errors.Is(err, netnsx.ErrHostUnknown) || !strings.Contains(err.Error(), "no fixed inode") {
			t.Errorf("Linux 6.12, no witness: %v; want unknown, saying the kernel gives no fixed inode", err)
		}
		if id, err := netnsx.FindHost(root, netnsx.HostOptions{Release: "6.18.2"}); err != nil || id.Ino != netnsx.InitNetIno {
			t.Errorf("Linux 6.18: %v, %v; want init_net's fixed inode", id, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "docker", Log: quiet(), Proc: root})
	d.hostOpts = netnsx.HostOptions{IgnoreFixedInode: true}
	err = d.Reconcile([]Target{{Name: "c", Kind: "container", Netns: ns.Target(), Rules: rules(t, "80=3210")}})
	if !errors.Is(err, netnsx.ErrHostUnknown) || !strings.Contains(err.Error(), "container c") || len(k.Enrolled) != 0 {
		t.Errorf("host netns unknown: Reconcile = %v, enrolled %v; want container c refused, nothing enrolled", err, k.Enrolled)
	}
	host, err := netnsx.FindHost("/proc", netnsx.HostOptions{})
	if err != nil {
		t.Fatalf("the test runs as root on the host: %v", err)
	}
	d = New(k, testenv.Cookies(t), Options{Owner: "docker", Log: quiet(), Proc: root, HostNetns: &host})
	if err := d.Reconcile([]Target{{Name: "c", Kind: "container", Netns: ns.Target(), Rules: rules(t, "80=3210")}}); err != nil || len(k.Enrolled) != 1 {
		t.Errorf("host netns given: Reconcile = %v, enrolled %v; want c enrolled", err, k.Enrolled)
	}
	self, _ := netnsx.ParseTarget("self")
	if err := d.Reconcile([]Target{{Name: "h", Kind: "container", Netns: self, Rules: rules(t, "80=3210")}}); !errors.Is(err, ErrHostNetns) {
		t.Errorf("the host's own netns with the identity given: %v; want ErrHostNetns", err)
	}
}
