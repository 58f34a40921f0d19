package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The release's bytes are a function of the source, VERSION, the epoch and
// the Go toolchain: another Go release links another runtime and compiles
// other code. So the release is built with exactly the toolchain the
// checkout's go.mod names (its toolchain line, or its go line when it has
// none: `go mod tidy` drops a toolchain line equal to the go line), and
// refuses any other. The go command is never allowed to fetch one
// (GOTOOLCHAIN=local): the machine may be offline, and a download would
// hide which toolchain built the bytes.

// pinnedGo returns the toolchain a go.mod names, e.g. "go1.26.8".
func pinnedGo(gomod []byte) (string, error) {
	var goLine, toolchain string
	sc := bufio.NewScanner(bytes.NewReader(gomod))
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "//")
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case "go":
			goLine = "go" + f[1]
		case "toolchain":
			toolchain = f[1]
		}
	}
	if toolchain != "" && toolchain != "default" {
		return toolchain, nil
	}
	if goLine == "" {
		return "", fmt.Errorf("go.mod has neither a toolchain nor a go line")
	}
	return goLine, nil
}

// goEnv is the environment of every go command the release runs: never a
// toolchain download, and the defaults of the knobs that change the code
// generated (a GOAMD64=v3 or GOEXPERIMENT in the caller's environment would
// change the bytes).
func goEnv(extra ...string) []string {
	env := append(os.Environ(), "GOTOOLCHAIN=local", "GOAMD64=v1", "GOARM64=v8.0", "GOEXPERIMENT=")
	return append(env, extra...)
}

// runningGo is the version of the go command in PATH, the one that builds
// the binaries.
func runningGo(repo string) (string, error) {
	cmd := exec.Command("go", "env", "GOVERSION")
	cmd.Dir = repo
	cmd.Env = goEnv()
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// checkToolchain refuses a release built with another toolchain than the
// pinned one: the promise is byte-identical output.
func checkToolchain(running, pinned string) error {
	if running == pinned {
		return nil
	}
	return fmt.Errorf("%w: Go %s is running but the release is pinned to %s (go.mod): the bytes depend on the Go version; put %s's go first in PATH (GOTOOLCHAIN=local, nothing is downloaded)", errUsage, running, pinned, pinned)
}

// toolchain returns the pinned Go version of the checkout, after checking
// that it is the one running.
func (r *release) toolchain() (string, error) {
	gomod, err := os.ReadFile(filepath.Join(r.Repo, "go.mod"))
	if err != nil {
		return "", err
	}
	pinned, err := pinnedGo(gomod)
	if err != nil {
		return "", fmt.Errorf("%s: %w", filepath.Join(r.Repo, "go.mod"), err)
	}
	running, err := runningGo(r.Repo)
	if err != nil {
		return "", err
	}
	return pinned, checkToolchain(running, pinned)
}
