package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad kube-mode input is refused before any privilege, kernel or API
// check, so this runs anywhere, and nothing is attached.
func TestKubeUsageErrors(t *testing.T) {
	dir := t.TempDir()
	kc := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: abc}}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	execKC := filepath.Join(dir, "exec")
	if err := os.WriteFile(execKC, []byte(`current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {exec: {command: aws}}}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	node := map[string]string{"NSREDIRECT_NODE_NAME": "n1"}
	for _, tc := range []struct {
		env     map[string]string
		args    []string
		mention string
	}{
		{nil, []string{"kube"}, "--node-name is required"},
		{node, []string{"kube", "--annotation", "not a key"}, `"not a key"`},
		{node, []string{"kube", "--annotation", "a/b/c"}, `"a/b/c"`},
		{map[string]string{"NSREDIRECT_NODE_NAME": "n1", "NSREDIRECT_ANNOTATION": "-x"}, []string{"kube"}, `"-x"`},
		{node, []string{"kube", "--proc", dir}, dir},
		{node, []string{"kube", "--proc", "/nonexistent"}, "/nonexistent"},
		{node, []string{"kube"}, "--kubeconfig"},
		{node, []string{"kube", "--kubeconfig", filepath.Join(dir, "missing")}, "missing"},
		{node, []string{"kube", "--kubeconfig", execKC}, "exec"},
		{node, []string{"kube", "--kubeconfig", kc, "--pin-dir", filepath.Join(dir, "pins")}, "not a bpffs"},
		{node, []string{"kube", "--kubeconfig", kc, "--pin-dir", "relative"}, `"relative"`},
		{node, []string{"kube", "--log-format", "xml"}, `"xml"`},
		{node, []string{"kube", "extra"}, `"extra"`},
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
