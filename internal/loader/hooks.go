package loader

// The hooks the programs run at and the names their pins (link_<name>,
// prog_<name>) and the link_repairs_total metric give them.

import (
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

type hook struct {
	prog   string
	attach ebpf.AttachType
	name   string
}

// hooks are attached (and healed) in this order: sock_release first, so a
// record the connect programs make is never left by a socket closed before
// the program that deletes it was on.
var hooks = []hook{
	{bpfobj.RedirectProgNsrSockRelease, ebpf.AttachCgroupInetSockRelease, HookSockRelease},
	{bpfobj.RedirectProgNsrConnect4, ebpf.AttachCGroupInet4Connect, HookConnect4},
	{bpfobj.RedirectProgNsrConnect6, ebpf.AttachCGroupInet6Connect, HookConnect6},
	{bpfobj.RedirectProgNsrGetpeername4, ebpf.AttachCgroupInet4GetPeername, HookGetpeername4},
	{bpfobj.RedirectProgNsrGetpeername6, ebpf.AttachCgroupInet6GetPeername, HookGetpeername6},
}

// The names of the hooks that are attached whenever anything is enrolled.
const (
	HookSockRelease  = "sock_release"
	HookConnect4     = "connect4"
	HookConnect6     = "connect6"
	HookGetpeername4 = "getpeername4"
	HookGetpeername6 = "getpeername6"
)

// The names of the UDP hooks (udp.go), attached only while a UDP rule is
// live.
const (
	HookUDPConnect4 = "udp_connect4"
	HookUDPConnect6 = "udp_connect6"
	HookSendmsg4    = "sendmsg4"
	HookSendmsg6    = "sendmsg6"
	HookRecvmsg4    = "recvmsg4"
	HookRecvmsg6    = "recvmsg6"
)

func allHooks() []hook { return append(append([]hook(nil), hooks...), udpHooks...) }

// HookNames names the hooks attached whenever anything is enrolled, in the
// order they are attached.
func HookNames() []string { return hookNames(hooks) }

// UDPHookNames names the UDP hooks, attached only while a UDP rule is live.
func UDPHookNames() []string { return hookNames(udpHooks) }

func hookNames(hs []hook) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = h.name
	}
	return out
}

// LinkPin is where the bpf_link of hook (HookConnect4, a name of
// UDPHookNames...) is pinned under pin dir dir; ProgPin is where its
// program is.
func LinkPin(dir, hook string) string { return filepath.Join(dir, "link_"+hook) }

// ProgPin: see LinkPin.
func ProgPin(dir, hook string) string { return filepath.Join(dir, "prog_"+hook) }

// OwnersDir holds the owner lock of each enrolled netns (owners/<cookie>)
// under pin dir dir.
func OwnersDir(dir string) string { return filepath.Join(dir, ownersDir) }
