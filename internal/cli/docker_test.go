package cli

import (
	"strings"
	"testing"
)

// Bad docker-mode input is refused before any privilege, kernel or Docker
// check, so this runs anywhere.
func TestDockerUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		env     map[string]string
		args    []string
		mention string
	}{
		{nil, []string{"docker", "--docker-host", "tcp://127.0.0.1:2375"}, `"tcp://127.0.0.1:2375"`},
		{nil, []string{"docker", "--docker-host", "unix://relative.sock"}, "unix:///PATH"},
		{map[string]string{"NSREDIRECT_DOCKER_HOST": "ssh://host"}, []string{"docker"}, `"ssh://host"`},
		{nil, []string{"docker", "--label", ""}, `--label ""`},
		{nil, []string{"docker", "--label", "a=b"}, `"a=b"`},
		{map[string]string{"NSREDIRECT_LABEL": "x y"}, []string{"docker"}, `"x y"`},
		{nil, []string{"docker", "--log-format", "xml"}, `"xml"`},
		{nil, []string{"docker", "extra"}, `"extra"`},
		{nil, []string{"check", "--attached=maybe"}, "maybe"},
	} {
		code, _, stderr := run(t, tc.env, tc.args...)
		if code != ExitUsage {
			t.Errorf("%v %v: exit %d, want %d (%s)", tc.env, tc.args, code, ExitUsage, stderr)
		}
		if !strings.Contains(stderr, tc.mention) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v %v: stderr %q: want one line mentioning %q", tc.env, tc.args, stderr, tc.mention)
		}
	}
}
