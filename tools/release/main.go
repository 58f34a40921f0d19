// Command release builds nsredirect's release artifacts into one directory,
// offline and reproducibly: for linux/amd64 and linux/arm64 a static binary
// in a tarball with the licences, README and systemd unit, a .deb (nfpm),
// an image tarball that `docker load` and `ctr images import` accept
// (go-containerregistry, no Docker daemon), then one multi-arch OCI index,
// an SPDX SBOM from the binaries' module graph and SHA256SUMS over it all.
//
//	go run . -repo ../.. -version v1.2.3 -out ../../dist   (SOURCE_DATE_EPOCH from the environment)
//	go run . -push ghcr.io/OWNER/nsredirect -out ../../dist  (the release workflow: push the index)
//
// Every timestamp is SOURCE_DATE_EPOCH, every owner root, every walk sorted,
// and the Go toolchain the one go.mod pins (it refuses another, exit 2:
// toolchain.go): two runs with the same VERSION and epoch give
// byte-identical files (TestRelease/Reproducible).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"time"
)

// errUsage marks bad input: exit 2.
var errUsage = errors.New("usage")

func main() {
	err := run(os.Args[1:])
	if err == nil {
		return
	}
	fmt.Fprintln(os.Stderr, "release:", err)
	if errors.Is(err, errUsage) {
		os.Exit(2)
	}
	os.Exit(1)
}

func run(args []string) error {
	fs := flag.NewFlagSet("release", flag.ContinueOnError)
	repo := fs.String("repo", "../..", "the nsredirect checkout to build")
	version := fs.String("version", "", "the release version, vMAJOR.MINOR.PATCH[-PRE[.N]]")
	out := fs.String("out", "dist", "output directory (replaced)")
	image := fs.String("image", "ghcr.io/nsredirect/nsredirect", "image repository the tarballs are tagged with")
	push := fs.String("push", "", "push the OCI index in -out to this repository (needs the registry's credentials) instead of building")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *push != "" {
		return pushIndex(*out, *push)
	}
	if !versionRE.MatchString(*version) {
		return fmt.Errorf("%w: -version %q: give a semantic version such as v1.2.3 (make release VERSION=v1.2.3)", errUsage, *version)
	}
	epoch, err := sourceDateEpoch(os.Getenv("SOURCE_DATE_EPOCH"))
	if err != nil {
		return err
	}
	r := &release{Repo: *repo, Version: *version, Out: *out, Image: *image, Epoch: epoch}
	return r.build()
}

// versionRE is what a release version may be: vMAJOR.MINOR.PATCH, with an
// optional pre-release of one or two alphanumeric parts (-rc1, -rc.1). No
// +BUILD: an image tag cannot hold a "+". The release workflow's tag
// trigger is the same set (TestTagTrigger): GitHub's tag filters cannot say
// more than that.
var versionRE = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)?)?$`)

func sourceDateEpoch(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, fmt.Errorf("%w: SOURCE_DATE_EPOCH is not set: export it, e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%%ct)", errUsage)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, fmt.Errorf("%w: SOURCE_DATE_EPOCH=%q: give seconds since 1970, e.g. $(git log -1 --format=%%ct)", errUsage, s)
	}
	return time.Unix(n, 0).UTC(), nil
}
