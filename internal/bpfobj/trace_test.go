package bpfobj

import (
	"reflect"
	"testing"
)

// bpf/trace.c redeclares the types of redirect.c's maps it reads (the
// tracer hands it redirect.c's pinned maps); they must stay the same.
func TestTraceTypesMatchRedirect(t *testing.T) {
	for _, pair := range [][2]any{
		{RedirectRuleKey{}, TraceRuleKey{}},
		{RedirectRuleVal{}, TraceRuleVal{}},
		{RedirectOrigDst{}, TraceOrigDst{}},
		{RedirectUdpPeer{}, TraceUdpPeer{}},
	} {
		a, b := reflect.TypeOf(pair[0]), reflect.TypeOf(pair[1])
		if a.Size() != b.Size() || a.NumField() != b.NumField() {
			t.Errorf("%s is %d bytes in %d fields, %s %d in %d", a, a.Size(), a.NumField(), b, b.Size(), b.NumField())
			continue
		}
		for i := range a.NumField() {
			fa, fb := a.Field(i), b.Field(i)
			if fa.Name != fb.Name || fa.Type != fb.Type || fa.Offset != fb.Offset {
				t.Errorf("%s.%s (%s at %d) differs from %s.%s (%s at %d)", a, fa.Name, fa.Type, fa.Offset, b, fb.Name, fb.Type, fb.Offset)
			}
		}
	}
	spec, err := LoadTrace()
	if err != nil {
		t.Fatal(err)
	}
	redirect, err := LoadRedirect()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{RedirectMapNsrRules, RedirectMapNsrPeers, RedirectMapNsrSockets, RedirectMapNsrUdpPeers} {
		a, b := redirect.Maps[name], spec.Maps[name]
		if b == nil || a.Type != b.Type || a.KeySize != b.KeySize || a.ValueSize != b.ValueSize || a.MaxEntries != b.MaxEntries || a.Flags != b.Flags {
			t.Errorf("map %s: redirect.c declares %+v, trace.c %+v", name, a, b)
		}
	}
	for name := range spec.Maps {
		t.Logf("trace.c map %s", name)
	}
}
