package cli

import (
	"bytes"
	"context"
	"runtime/debug"
	"strings"
	"testing"
)

func run(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Main(context.Background(), args, IO{Stdout: &out, Stderr: &errOut, Getenv: func(k string) string { return env[k] }})
	return code, out.String(), errOut.String()
}

// Usage errors are found before any privilege or kernel check, so these run
// anywhere.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		env     map[string]string
		args    []string
		mention string
	}{
		{nil, []string{"nope"}, `"nope"`},
		{nil, []string{"run"}, "--netns is required"},
		{nil, []string{"run", "--netns", "self"}, "--redirect is required"},
		{nil, []string{"run", "--netns", "self", "--redirect", "80"}, `"80"`},
		{nil, []string{"run", "--netns", "pid:-1", "--redirect", "80=1"}, `"pid:-1"`},
		{nil, []string{"run", "--netns", "netns1", "--redirect", "80=1"}, `"netns1"`},
		{nil, []string{"run", "--netns", "self", "--redirect", "80=1", "--log-format", "xml"}, `"xml"`},
		{nil, []string{"run", "--netns", "self", "--redirect", "80=1", "--bogus"}, "-bogus"},
		{map[string]string{"NSREDIRECT_NETNS": "self", "NSREDIRECT_REDIRECT": "80=1,81=0"}, []string{"run"}, `"81=0"`},
		{map[string]string{"NSREDIRECT_LOG_LEVEL": "loud"}, []string{"run", "--netns", "self", "--redirect", "80=1"}, `"loud"`},
		{nil, []string{"status", "--json=maybe"}, "maybe"},
		{nil, []string{"check", "--netns", "self", "--dial", "nohost"}, `"nohost"`},
		{nil, []string{"version", "extra"}, `"extra"`},
		{nil, []string{"cleanup", "--all", "--gone"}, "--gone"},
		{nil, []string{"trace", "--port", "-1"}, "--port -1"},
		{nil, []string{"trace", "--verdict", "all"}, `"all"`},
		{nil, []string{"trace", "--buffer-kib", "1000"}, "--buffer-kib 1000"},
		{nil, []string{"trace", "--pod", "nons"}, `"nons"`},
		{nil, []string{"trace", "--netns", "netns1"}, `"netns1"`},
		{nil, []string{"explain", "--netns", "self"}, "no destination"},
		{nil, []string{"explain", "127.0.0.1:80"}, "no target"},
		{nil, []string{"explain", "--netns", "self", "127.0.0.1:80", "127.0.0.1:81"}, `"127.0.0.1:81"`},
		{nil, []string{"explain", "--netns", "self", "127.0.0.1:80/sctp"}, `"sctp"`},
		{nil, []string{"explain", "--netns", "self", "--pod", "a/b", "127.0.0.1:80"}, "give one"},
	} {
		code, _, stderr := run(t, tc.env, tc.args...)
		if code != ExitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, ExitUsage, stderr)
		}
		if !strings.Contains(stderr, tc.mention) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v: stderr %q: want one line mentioning %q", tc.args, stderr, tc.mention)
		}
	}
}

func TestEnvFallbackAndFlagPrecedence(t *testing.T) {
	// The flag wins over the environment: the error names the flag's value.
	code, _, stderr := run(t, map[string]string{"NSREDIRECT_REDIRECT": "garbage"}, "run", "--netns", "self", "--redirect", "80=0")
	if code != ExitUsage || !strings.Contains(stderr, `"80=0"`) || strings.Contains(stderr, "garbage") {
		t.Errorf("flag did not override env: %d %s", code, stderr)
	}
}

func TestHelpAndVersion(t *testing.T) {
	if code, _, stderr := run(t, nil, "help"); code != ExitOK || !strings.Contains(stderr, "nsredirect run") {
		t.Errorf("help: %d %s", code, stderr)
	}
	if code, _, stderr := run(t, nil, "run", "--help"); code != ExitOK || !strings.Contains(stderr, "-redirect") {
		t.Errorf("run --help: %d %s", code, stderr)
	}
	if code, out, _ := run(t, nil, "version"); code != ExitOK || !strings.HasPrefix(out, "nsredirect ") {
		t.Errorf("version: %d %q", code, out)
	}
	if code, _, _ := run(t, nil); code != ExitUsage {
		t.Errorf("no args: exit %d", code)
	}
}

// The version printed: the link-time one first, else what `go install
// module@vX` recorded as the main module's version; a checkout build
// ("(devel)") or no build information stays dev.
func TestBuildVersion(t *testing.T) {
	main := func(v string) *debug.BuildInfo {
		return &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/nsredirect/nsredirect", Version: v}}
	}
	for _, tc := range []struct {
		name   string
		linked string
		bi     *debug.BuildInfo
		want   string
	}{
		{"ldflags win over build info", "v1.2.3", main("v1.0.0"), "v1.2.3"},
		{"ldflags, no build info", "v1.2.3", nil, "v1.2.3"},
		{"go install module@version", "dev", main("v1.4.0"), "v1.4.0"},
		{"go install module@pseudo-version", "dev", main("v0.0.0-20261201233000-deea856aaaaa"), "v0.0.0-20261201233000-deea856aaaaa"},
		{"empty -X counts as unset", "", main("v1.4.0"), "v1.4.0"},
		{"go build in a checkout", "dev", main("(devel)"), "dev"},
		{"no main module version", "dev", main(""), "dev"},
		{"no build info", "dev", nil, "dev"},
	} {
		if got := buildVersion(tc.linked, tc.bi); got != tc.want {
			t.Errorf("%s: buildVersion(%q, %v) = %q, want %q", tc.name, tc.linked, tc.bi, got, tc.want)
		}
	}
}

// The reference (docs/cli.md) reads each command's flags from its flags
// func: every flag it lists must be one the command itself parses, and the
// other way round (`--help` prints what the command registered).
func TestReferenceMatchesCommands(t *testing.T) {
	for _, c := range Reference() {
		code, _, stderr := run(t, nil, c.Name, "--help")
		if code != ExitOK {
			t.Fatalf("%s --help: exit %d: %s", c.Name, code, stderr)
		}
		printed := strings.Count(stderr, "\n  -")
		if printed != len(c.Flags) {
			t.Errorf("%s: --help prints %d flags, the reference has %d:\n%s", c.Name, printed, len(c.Flags), stderr)
		}
		for _, f := range c.Flags {
			if !strings.Contains(stderr, "  -"+f.Name+" ") && !strings.Contains(stderr, "  -"+f.Name+"\n") {
				t.Errorf("%s: reference flag --%s is not one the command parses:\n%s", c.Name, f.Name, stderr)
			}
		}
	}
}
