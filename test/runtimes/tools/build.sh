#!/usr/bin/env bash
# Builds Docker Engine 29 (dockerd, docker-proxy) and Docker Compose v5 from
# the Go modules pinned in dockerd/ and compose/ into a directory of the test
# cache ($NSREDIRECT_TEST_CACHE, by default /var/cache/nsredirect-test)
# keyed by what they are built from (both modules' go.mod and go.sum, this
# script, the Go toolchain), so every clone on the machine shares one build
# and a second run builds nothing. The sha256 sums recorded at build time are
# checked at every run: a truncated or altered build is rebuilt, not trusted.
# Prints the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}
dockerd_version=29.8.0 compose_version=v5.6.0
key=$(cat "$here"/dockerd/go.{mod,sum} "$here"/compose/go.{mod,sum} "$0" <(go env GOVERSION) | sha256sum | cut -c1-16)
out=$cache/runtimes/bin-$key
if [[ -f $out/sha256 ]] && (cd "$out" && sha256sum --quiet -c sha256 >/dev/null 2>&1); then
	echo "$out"
	exit 0
fi
[[ ! -f $out/sha256 ]] || echo "build.sh: $out does not match its checksums; rebuilding" >&2
rm -rf "$out" && mkdir -p "$out"
start=$(date +%s)
(cd "$here/dockerd" && CGO_ENABLED=0 go build -trimpath -tags 'netgo osusergo static_build nri_no_wasm' \
	-ldflags "-s -w -X github.com/moby/moby/v2/dockerversion.Version=$dockerd_version" \
	-o "$out/" github.com/moby/moby/v2/cmd/dockerd github.com/moby/moby/v2/cmd/docker-proxy) >&2
(cd "$here/compose" && CGO_ENABLED=0 go build -trimpath \
	-ldflags "-s -w -X github.com/docker/compose/v5/internal.Version=$compose_version" \
	-o "$out/docker-compose" github.com/docker/compose/v5/cmd) >&2
echo "build.sh: Docker Engine $dockerd_version and Compose $compose_version built in $(($(date +%s) - start)) s" >&2
(cd "$out" && sha256sum dockerd docker-proxy docker-compose >sha256.tmp && mv sha256.tmp sha256)
echo "$out"
