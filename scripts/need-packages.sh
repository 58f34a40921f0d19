#!/usr/bin/env bash
# need-packages.sh WHO PKG...: installs, with apt-get, the Debian packages of
# the list that are not installed, and nothing else. What is installed is
# read from dpkg each time (no stamp file that could outlive a removed
# package), so a second run costs one dpkg-query. WHO names the make target
# in the messages.
set -euo pipefail
who=${1:?usage: need-packages.sh WHO PKG...}
shift
missing=()
for p in "$@"; do
	# Status "install ok installed" only: a removed package keeps "deinstall ok config-files".
	if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
		missing+=("$p")
	fi
done
[ ${#missing[@]} -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ]; then
	echo "make $who: ${missing[*]} not installed; run as root (sudo make $who) to apt-get install them" >&2
	exit 2
fi
echo "make $who: apt-get install ${missing[*]}" >&2
# Indexes older than a day (or none: a fresh machine) are refreshed first.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
	apt-get update -qq
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || {
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
