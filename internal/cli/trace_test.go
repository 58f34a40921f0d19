package cli

import (
	"slices"
	"testing"

	"github.com/nsredirect/nsredirect/internal/entry"
	"github.com/nsredirect/nsredirect/internal/loader"
)

func rec(owner, name, id string) loader.Record {
	return loader.Record{Enrollment: loader.Enrollment{Owner: owner, Name: name, ID: id}}
}

func TestTraceFilterAndLabels(t *testing.T) {
	web := rec("docker", "web", "3f2a9c0e7b1d4e5f6a7b8c9d")
	pod := rec("kube", "default/api-0", "uid-1")
	run := rec("run", "/run/netns/a", "/run/netns/a")
	for _, tc := range []struct {
		f    traceFilter
		want []loader.Record
	}{
		{traceFilter{}, []loader.Record{web, pod, run}},
		{traceFilter{container: "web"}, []loader.Record{web}},
		{traceFilter{container: "3f2a9c0e7b1d"}, []loader.Record{web}},
		{traceFilter{container: "3f2a"}, nil}, // too short an ID prefix to be sure
		{traceFilter{pod: "default/api-0"}, []loader.Record{pod}},
		{traceFilter{pod: "web"}, nil},
	} {
		var got []loader.Record
		for _, r := range []loader.Record{web, pod, run} {
			if tc.f.matches(r) {
				got = append(got, r)
			}
		}
		if !slices.EqualFunc(got, tc.want, func(a, b loader.Record) bool { return a.Name == b.Name }) {
			t.Errorf("%+v matches %v; want %v", tc.f, got, tc.want)
		}
	}
	for r, want := range map[*loader.Record]string{&web: "container web (3f2a9c0e7b1d)", &pod: "pod default/api-0", &run: "netns /run/netns/a"} {
		if got := netnsLabel(*r); got != want {
			t.Errorf("label of %+v: %q; want %q", *r, got, want)
		}
	}
}

func TestParseDest(t *testing.T) {
	for in, want := range map[string]string{"127.0.0.1:80": "127.0.0.1:80/tcp", "[::1]:53/udp": "[::1]:53/udp", "127.0.0.1:443/tcp": "127.0.0.1:443/tcp"} {
		d, err := parseDest(in)
		if err != nil || destString(d) != want {
			t.Errorf("parseDest(%q) = %s, %v; want %s", in, destString(d), err, want)
		}
	}
	for _, bad := range []string{"127.0.0.1", "80", "127.0.0.1:0", "127.0.0.1:80/sctp", "localhost:80"} {
		if _, err := parseDest(bad); err == nil {
			t.Errorf("parseDest(%q): no error", bad)
		}
	}
	d, _ := parseDest("127.0.0.1:53/udp")
	if d.Proto != entry.UDP {
		t.Errorf("/udp parsed as %v", d.Proto)
	}
}

func TestExplainArgs(t *testing.T) {
	for _, tc := range []struct {
		args  []string
		dest  string
		flags int
	}{
		{[]string{"127.0.0.1:80", "--netns", "/x"}, "127.0.0.1:80", 2},
		{[]string{"--netns", "/x", "127.0.0.1:80"}, "127.0.0.1:80", 2},
		{[]string{"--dial", "127.0.0.1:80"}, "127.0.0.1:80", 1},
		{[]string{"--netns", "/x"}, "", 2},
		{[]string{"--netns=/x", "127.0.0.1:80"}, "127.0.0.1:80", 1},
		{[]string{"--netns", "/x", "127.0.0.1:80", "--pin-dir", "/p"}, "127.0.0.1:80", 4},
		{[]string{"--netns", "/x", "127.0.0.1:80", "127.0.0.1:81"}, "127.0.0.1:80", 3},
	} {
		dest, flags := explainArgs(tc.args)
		if dest != tc.dest || len(flags) != tc.flags {
			t.Errorf("explainArgs(%q) = %q, %q", tc.args, dest, flags)
		}
	}
}
