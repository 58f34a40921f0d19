// Package trace loads bpf/trace.c for one tracer: its programs attached at
// the cgroup2 root through bpf_links that are never pinned, on the pinned
// maps of the redirect programs, writing events to a ring buffer of its own.
//
// Everything it creates lives as long as the Tracer's file descriptors: the
// kernel detaches the links and frees the ring buffer when the process
// ends, however it ends. The daemon's programs, pins and maps are only
// read; the loader's heal and cleanup never see these links (they look at
// the pinned links only, and a program using a map not of the pinned state
// is never taken as ours).
package trace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/loader"
)

// DefaultRingBytes is the size of the kernel ring buffer of one tracer:
// about 10,000 events of 104 bytes (96 and the ring's header). When a
// burst fills it the programs count drops and carry on: a connect never
// waits for the tracer.
const DefaultRingBytes = 1 << 20

// ErrNoState says there are no pinned maps to trace: no daemon has
// enrolled anything under the pin dir.
var ErrNoState = errors.New("no nsredirect state")

// Options say what to trace.
type Options struct {
	PinDir string
	// Cgroup is the cgroup2 root the daemon's programs are attached at.
	Cgroup string
	// Peer also traces getpeername rewrites.
	Peer bool
	// RingBytes is the ring buffer's size: a power of two multiple of the
	// page size; 0 for DefaultRingBytes.
	RingBytes int
}

// Tracer is one trace: its programs attached, its ring buffer read.
type Tracer struct {
	coll     *ebpf.Collection
	links    []link.Link
	reader   *ringbuf.Reader
	netns    *ebpf.Map
	drops    *ebpf.Map
	withTask bool
	bootWall time.Time
	stopping atomic.Bool
}

// WithTask reports whether events carry the pid and process name: cgroup
// socket address programs may not ask for them on every kernel (see
// HaveTaskHelpers); without, an event carries the uid and socket cookie.
func (t *Tracer) WithTask() bool { return t.withTask }

// HaveTaskHelpers reports whether this kernel lets cgroup socket address
// programs call bpf_get_current_pid_tgid and bpf_get_current_comm.
func HaveTaskHelpers() bool {
	for _, fn := range []asm.BuiltinFunc{asm.FnGetCurrentPidTgid, asm.FnGetCurrentComm} {
		if features.HaveProgramHelper(ebpf.CGroupSockAddr, fn) != nil {
			return false
		}
	}
	return true
}

// mapsTraced are the pinned maps of the redirect programs the trace
// programs read.
var mapsTraced = []string{bpfobj.TraceMapNsrRules, bpfobj.TraceMapNsrPeers, bpfobj.TraceMapNsrSockets, bpfobj.TraceMapNsrUdpPeers}

// Open loads the trace programs on the pinned maps under o.PinDir and
// attaches them at o.Cgroup. Nothing is traced until SetNetns names netns.
func Open(o Options) (_ *Tracer, err error) {
	repl := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range repl {
			m.Close()
		}
	}()
	for _, name := range mapsTraced {
		m, err := ebpf.LoadPinnedMap(loader.MapPin(o.PinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w at %s (%s is not pinned): no daemon has enrolled anything", ErrNoState, o.PinDir, name)
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", loader.MapPin(o.PinDir, name), err)
		}
		repl[name] = m
	}
	spec, err := bpfobj.LoadTrace()
	if err != nil {
		return nil, err
	}
	if o.RingBytes == 0 {
		o.RingBytes = DefaultRingBytes
	}
	spec.Maps[bpfobj.TraceMapTraceEvents].MaxEntries = uint32(o.RingBytes)
	t := &Tracer{withTask: HaveTaskHelpers()}
	var withTask uint8
	if t.withTask {
		withTask = 1
	}
	if err := spec.Variables[bpfobj.TraceVarWithTask].Set(withTask); err != nil {
		return nil, fmt.Errorf("set with_task: %w", err)
	}
	if !o.Peer {
		delete(spec.Programs, bpfobj.TraceProgTraceGetpeer4)
		delete(spec.Programs, bpfobj.TraceProgTraceGetpeer6)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return nil, fmt.Errorf("load the trace programs: %w", err)
	}
	t.coll = coll
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	t.netns, t.drops = coll.Maps[bpfobj.TraceMapTraceNetns], coll.Maps[bpfobj.TraceMapTraceDrops]
	cg, err := os.Open(o.Cgroup)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", o.Cgroup, err)
	}
	defer cg.Close()
	for name, ps := range spec.Programs {
		// A bpf_link, never a BPF_PROG_ATTACH: only a link goes away with
		// the last descriptor of the process that made it.
		l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(cg.Fd()), Program: coll.Programs[name], Attach: ps.AttachType})
		if err != nil {
			return nil, fmt.Errorf("attach %s to cgroup %s: %w", name, o.Cgroup, err)
		}
		t.links = append(t.links, l)
	}
	if t.reader, err = ringbuf.NewReader(coll.Maps[bpfobj.TraceMapTraceEvents]); err != nil {
		return nil, fmt.Errorf("read the trace ring buffer: %w", err)
	}
	t.bootWall = bootWall()
	return t, nil
}

// bootWall is the wall time at which CLOCK_MONOTONIC (bpf_ktime_get_ns)
// was 0.
func bootWall() time.Time {
	var ts unix.Timespec
	now := time.Now()
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Time{}
	}
	return now.Add(-time.Duration(ts.Nano()))
}

// SetNetns makes cookies the netns traced, and only those.
func (t *Tracer) SetNetns(cookies map[uint64]bool) error {
	var k uint64
	var v uint8
	var stale []uint64
	it := t.netns.Iterate()
	for it.Next(&k, &v) {
		if !cookies[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read the traced netns: %w", err)
	}
	for _, k := range stale {
		if err := t.netns.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("stop tracing netns %d: %w", k, err)
		}
	}
	for c := range cookies {
		if err := t.netns.Update(c, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("trace netns %d: %w", c, err)
		}
	}
	return nil
}

// Drops counts the events lost so far because the ring buffer was full.
func (t *Tracer) Drops() uint64 {
	var perCPU []uint64
	if err := t.drops.Lookup(uint32(0), &perCPU); err != nil {
		return 0
	}
	var n uint64
	for _, x := range perCPU {
		n += x
	}
	return n
}

// ErrClosed is what Read returns once the Tracer is closed.
var ErrClosed = ringbuf.ErrClosed

// pollEvery is how often Read looks at the ring: the programs wake it
// only once the ring is a quarter full (see emit in bpf/trace.c).
const pollEvery = 100 * time.Millisecond

// Stop makes Read return ErrClosed once it has read every event already
// in the ring, within pollEvery.
func (t *Tracer) Stop() { t.stopping.Store(true) }

// Read waits for the next event; it returns ErrClosed after Close, and
// after Stop once the ring is empty.
func (t *Tracer) Read() (Event, error) {
	var rec ringbuf.Record
	for {
		stopping := t.stopping.Load()
		deadline := time.Now().Add(pollEvery)
		if stopping {
			deadline = time.Now()
		}
		t.reader.SetDeadline(deadline)
		err := t.reader.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Every record in the ring was read before this.
			if stopping {
				return Event{}, ErrClosed
			}
			continue
		}
		if err != nil {
			return Event{}, err
		}
		break
	}
	var raw bpfobj.TraceTraceEvent
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
		return Event{}, fmt.Errorf("decode a trace event of %d bytes: %w", len(rec.RawSample), err)
	}
	return decode(raw, t.bootWall), nil
}

// Close detaches the programs and frees the ring buffer; Read returns
// ErrClosed.
func (t *Tracer) Close() {
	if t.reader != nil {
		t.reader.Close()
	}
	for _, l := range t.links {
		l.Close()
	}
	if t.coll != nil {
		t.coll.Close()
	}
}

// Event is one decision the kernel made.
type Event struct {
	Time        time.Time
	NetnsCookie uint64
	SockCookie  uint64
	// PID and TID are 0 and Comm empty where the kernel does not give
	// them to these programs (WithTask).
	PID, TID int
	UID      uint32
	Comm     string
	Hook     string // connect, sendmsg, recvmsg, getpeername
	Proto    string // tcp, udp
	Family   int    // 4 or 6
	Verdict  string // Redirected, NoRule, SourceRewritten, PeerRewritten
	// Dialled is what the process dialled (connect, sendmsg), or what it
	// is shown (recvmsg's source, getpeername's peer); Target is where the
	// socket really goes or talks to.
	Dialled, Target netip.AddrPort
}

// The verdicts.
const (
	Redirected      = "redirected"
	NoRule          = "no-rule"
	SourceRewritten = "source-rewritten"
	PeerRewritten   = "peer-rewritten"
)

// Verdicts are the verdict names, for --verdict.
var Verdicts = []string{Redirected, NoRule, SourceRewritten, PeerRewritten}

func decode(r bpfobj.TraceTraceEvent, boot time.Time) Event {
	e := Event{
		Time:        boot.Add(time.Duration(r.KtimeNs)),
		NetnsCookie: r.NetnsCookie,
		SockCookie:  r.SockCookie,
		PID:         int(r.PidTgid >> 32),
		TID:         int(uint32(r.PidTgid)),
		UID:         r.Uid,
		Family:      int(r.Family),
		Dialled:     addrPort(r.Family, r.Dialled, r.DialledPort),
		Target:      addrPort(r.Family, r.Target, r.TargetPort),
	}
	comm := make([]byte, 0, len(r.Comm))
	for _, c := range r.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	e.Comm = string(comm)
	switch r.Proto {
	case unix.IPPROTO_TCP:
		e.Proto = "tcp"
	case unix.IPPROTO_UDP:
		e.Proto = "udp"
	default:
		e.Proto = fmt.Sprint(r.Proto)
	}
	e.Hook = map[bpfobj.TraceTraceHook]string{
		bpfobj.TraceTraceHookTRACE_CONNECT: "connect", bpfobj.TraceTraceHookTRACE_SENDMSG: "sendmsg",
		bpfobj.TraceTraceHookTRACE_RECVMSG: "recvmsg", bpfobj.TraceTraceHookTRACE_GETPEERNAME: "getpeername",
	}[bpfobj.TraceTraceHook(r.Hook)]
	e.Verdict = map[bpfobj.TraceTraceVerdict]string{
		bpfobj.TraceTraceVerdictTRACE_REDIRECTED: Redirected, bpfobj.TraceTraceVerdictTRACE_NO_RULE: NoRule,
		bpfobj.TraceTraceVerdictTRACE_SOURCE_REWRITTEN: SourceRewritten, bpfobj.TraceTraceVerdictTRACE_PEER_REWRITTEN: PeerRewritten,
	}[bpfobj.TraceTraceVerdict(r.Verdict)]
	return e
}

// addrPort reads an address and port as the programs hold them: network
// byte order in words read natively, IPv4 in the first word.
func addrPort(family uint8, words [4]uint32, port uint16) netip.AddrPort {
	var b [16]byte
	for i, w := range words {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	var a netip.Addr
	if family == 4 {
		a = netip.AddrFrom4([4]byte(b[:4]))
	} else {
		a = netip.AddrFrom16(b).Unmap()
		if a.Is4() {
			a = netip.AddrFrom16(b) // as dialled: ::ffff:a.b.c.d
		}
	}
	var pb [2]byte
	binary.NativeEndian.PutUint16(pb[:], port)
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(pb[:]))
}
