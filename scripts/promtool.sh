#!/usr/bin/env bash
# promtool.sh: prints the path of promtool, the Prometheus rule checker,
# taken from Debian's prometheus package without installing it (installing
# it would start a Prometheus server): `apt-get download` and `dpkg-deb -x`
# into the test cache ($NSREDIRECT_TEST_CACHE, by default
# /var/cache/nsredirect-test), in a directory keyed by the package version.
# The binary's sha256 is recorded at extraction and checked at every use.
#
#   "$(scripts/promtool.sh)" check rules deploy/prometheus/nsredirect-rules.yaml
set -euo pipefail
candidate() { apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
ver=$(candidate)
# A machine with every package of `make deps` installed may have no apt
# indexes (container images drop them): root fetches them.
if { [ -z "$ver" ] || [ "$ver" = "(none)" ]; } && [ "$(id -u)" = 0 ]; then
	apt-get update -qq >&2
	ver=$(candidate)
fi
if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
	echo "promtool.sh: apt knows no prometheus package; run apt-get update as root (Debian 12 has it)" >&2
	exit 1
fi
cache=${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}
dir=$cache/tools/promtool-$(echo "$ver" | tr -c 'A-Za-z0-9.+\n-' '_')-$(dpkg --print-architecture)
bin=$dir/promtool
if [ -x "$bin" ] && [ -f "$dir/sha256" ] && (cd "$dir" && sha256sum --quiet -c sha256 >/dev/null 2>&1); then
	echo "$bin"
	exit 0
fi
[ ! -e "$dir" ] || echo "promtool.sh: $dir is incomplete or does not match its checksum; extracting again" >&2
rm -rf "$dir"
mkdir -p "$cache/tools"
tmp=$(mktemp -d "$cache/tools/.promtool.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "promtool.sh: apt-get download prometheus=$ver into $dir" >&2
# As root apt warns that its _apt user cannot write here; the download is fine.
(cd "$tmp" && apt-get download -q=2 "prometheus=$ver" 2> >(grep -v 'unsandboxed as root' >&2))
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
mkdir "$tmp/out"
mv "$tmp/root/usr/bin/promtool" "$tmp/out/promtool"
(cd "$tmp/out" && sha256sum promtool >sha256)
# Another run may have finished first: keep theirs.
mv -T "$tmp/out" "$dir" 2>/dev/null || true
echo "$bin"
