#!/usr/bin/env bash
# gotool.sh MODULE/CMD@VERSION: prints the path of that Go program, built
# once with `go install` into the test cache ($NSREDIRECT_TEST_CACHE, by
# default /var/cache/nsredirect-test) under a directory keyed by the
# package, its version and the Go toolchain, so a cold Go build cache does
# not rebuild it. The binary's sha256 is recorded beside it at build time and
# checked at every use: a truncated or altered binary is rebuilt, not run.
#
#   "$(scripts/gotool.sh honnef.co/go/tools/cmd/staticcheck@v0.8.2)" ./...
set -euo pipefail
spec=${1:?usage: gotool.sh MODULE/CMD@VERSION}
case $spec in
*@v*) ;;
*) echo "gotool.sh: $spec: give a pinned version, e.g. honnef.co/go/tools/cmd/staticcheck@v0.8.2" >&2; exit 2 ;;
esac
pkg=${spec%@*} ver=${spec##*@}
name=$(basename "$pkg")
gover=$(go env GOVERSION)
cache=${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}
dir=$cache/tools/$name-$ver-$gover-$(echo "$pkg" | sha256sum | cut -c1-8)
bin=$dir/$name
if [ -x "$bin" ] && [ -f "$dir/sha256" ] && (cd "$dir" && sha256sum --quiet -c sha256 >/dev/null 2>&1); then
	echo "$bin"
	exit 0
fi
[ ! -e "$dir" ] || echo "gotool.sh: $dir is incomplete or does not match its checksum; rebuilding" >&2
rm -rf "$dir"
mkdir -p "$cache/tools"
tmp=$(mktemp -d "$cache/tools/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "gotool.sh: building $spec with $gover into $dir" >&2
GOBIN=$tmp CGO_ENABLED=0 go install -trimpath "$spec" >&2
(cd "$tmp" && sha256sum "$name" >sha256)
# Another run may have finished the same build first: keep theirs.
mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
trap - EXIT
echo "$bin"
