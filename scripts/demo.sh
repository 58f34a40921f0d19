#!/usr/bin/env bash
# The README's demo: a throwaway network namespace with the demo backend on
# :3210, a client that dials 127.0.0.1:80 and is refused (the Convex
# ECONNREFUSED), then nsredirect 80=3210, and the same request succeeding.
# Everything it creates is removed on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
	echo "demo: needs root to create a network namespace and load eBPF; run: sudo make demo" >&2
	exit 2
fi
NSR=bin/nsredirect
BACKEND=bin/demo-backend
NS="nsr-demo-$$"
PIN_DIR="${NSREDIRECT_PIN_DIR:-/sys/fs/bpf/nsredirect}"
backend_pid="" daemon_pid=""

cleanup() {
	set +e
	[ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
	[ -n "$backend_pid" ] && kill -TERM "$backend_pid" 2>/dev/null && wait "$backend_pid" 2>/dev/null
	ip netns del "$NS" 2>/dev/null
	echo "== cleaned up: netns $NS deleted, daemon stopped (its rules and, as the last instance, its pins removed)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }

step "create netns $NS with a backend listening on 127.0.0.1:3210 (and [::1]:3210)"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" "$BACKEND" --listen :3210 &
backend_pid=$!
for _ in $(seq 50); do ip netns exec "$NS" curl -s -o /dev/null http://127.0.0.1:3210/healthz && break; sleep 0.1; done

step "without nsredirect, the backend's own call to http://127.0.0.1 (port 80) is refused, as in Convex"
ip netns exec "$NS" curl -sS --max-time 3 http://127.0.0.1/ || true
ip netns exec "$NS" curl -sS --max-time 3 http://127.0.0.1:3210/action || true

step "start: nsredirect run --netns /run/netns/$NS --redirect 80=3210 --remove-on-exit"
"$NSR" run --netns "/run/netns/$NS" --redirect 80=3210 --remove-on-exit --pin-dir "$PIN_DIR" &
daemon_pid=$!
for _ in $(seq 100); do "$NSR" check --netns "/run/netns/$NS" --pin-dir "$PIN_DIR" >/dev/null 2>&1 && break; sleep 0.1; done
"$NSR" check --netns "/run/netns/$NS" --dial 127.0.0.1:80 --pin-dir "$PIN_DIR"

step "the same requests now succeed: no proxy, no iptables, nothing listening on port 80"
ip netns exec "$NS" curl -sS --max-time 3 http://127.0.0.1/
ip netns exec "$NS" curl -sS --max-time 3 'http://[::1]/'
ip netns exec "$NS" curl -sS --max-time 3 http://127.0.0.1:3210/action
if command -v node >/dev/null; then
	ip netns exec "$NS" node -e 'fetch("http://127.0.0.1/").then(r => r.text()).then(t => console.log("node fetch:", t.trim()))'
fi
echo "listening sockets in $NS (no port 80):"
ip netns exec "$NS" ss -Hltn | awk '{print "   ", $4}'

step "the host is untouched: 127.0.0.1:80 here is not redirected"
curl -sS --max-time 2 -o /dev/null http://127.0.0.1/ 2>&1 | sed 's/^/   /' || true

step "nsredirect status"
"$NSR" status --pin-dir "$PIN_DIR"
