#!/usr/bin/env bash
# A real single-node Kubernetes v1.37.2 on this machine, and nsredirect
# installed on it the way docs/kubernetes.md says a user does:
#
#   etcd (Debian), kube-apiserver, kube-controller-manager, kube-scheduler,
#   kubelet (failCgroupV1: false; the cgroupfs driver, or systemd's with
#   --cgroup-driver systemd) and kubectl (built by build.sh),
#   containerd 1.6 + runc (Debian; runc wrapped to clamp oom_score_adj to 0:
#   root here lacks CAP_SYS_RESOURCE), CNI bridge + host-local + loopback
#   (Debian) on a bridge whose addresses exist only on this machine, images
#   FROM scratch imported with `ctr -n k8s.io images import`.
#
# The node's mounts live in a mount namespace of their own (kubelet's and
# containerd's mounts, and a fresh bpffs at /sys/fs/bpf): the first install
# (kubectl apply -k) runs with that bpffs a private mount (a node without
# systemd, or bpffs mounted by hand), the second (helm install) with it
# shared (what systemd does).
#
# Every process started is stopped by pid, and every directory, mount,
# cgroup, bridge and netns the cluster makes is removed, also on failure.
#
#   cluster.sh --repo DIR --bin DIR [--results FILE] [--logs DIR]
#              [--cgroup-driver cgroupfs|systemd] [--timeout-scale N] [--tools DIR]
#
# --cgroup-driver systemd: kubelet's and runc's cgroups are systemd units
# (kubepods.slice, cri-containerd-*.scope), which needs systemd as PID 1 on
# a pure cgroup2 host: kubelet's supported path (`make
# test-runtimes-guest-kube` runs it so in a qemu guest). --timeout-scale N
# multiplies every wait's bound (a TCG guest is ~10x slower; the bounds
# only cap a hang). --tools DIR: pause, dialer and ociimage prebuilt (build.sh
# builds them into DIR/images), instead of built here.
set -euo pipefail

usage="usage: cluster.sh --repo DIR --bin DIR [--results FILE] [--logs DIR] [--cgroup-driver cgroupfs|systemd] [--timeout-scale N] [--tools DIR]"
repo= kbin= results= keep= driver=cgroupfs scale=1 tools=
while [[ $# -gt 0 ]]; do
	case $1 in
	--repo) repo=$2; shift 2 ;;
	--bin) kbin=$2; shift 2 ;;
	--results) results=$2; shift 2 ;;
	--logs) keep=$2; shift 2 ;;
	--cgroup-driver) driver=$2; shift 2 ;;
	--timeout-scale) scale=$2; shift 2 ;;
	--tools) tools=$2; shift 2 ;;
	*) echo "cluster.sh: unknown argument $1; $usage" >&2; exit 2 ;;
	esac
done
[[ -n $repo && -n $kbin ]] || { echo "$usage" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "cluster.sh: run as root" >&2; exit 2; }
[[ $scale =~ ^[1-9][0-9]*$ ]] || { echo "cluster.sh: --timeout-scale $scale: give a whole factor, e.g. --timeout-scale 5" >&2; exit 2; }
case $driver in
cgroupfs) ;;
systemd)
	[[ $(cat /proc/1/comm) == systemd && $(stat -f -c %T /sys/fs/cgroup) == cgroup2fs ]] ||
		{ echo "cluster.sh: --cgroup-driver systemd needs systemd as PID 1 on a pure cgroup2 host (PID 1 is $(cat /proc/1/comm), /sys/fs/cgroup is $(stat -f -c %T /sys/fs/cgroup))" >&2; exit 2; }
	;;
*) echo "cluster.sh: --cgroup-driver $driver: give cgroupfs or systemd" >&2; exit 2 ;;
esac
results=${results:-${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}/kubernetes/results.md}
keep=${keep:-${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}/kubernetes/logs} # a failed run's logs, kept until the next run
here=$(cd "$(dirname "$0")" && pwd)

NODE=nsr-node
BRIDGE=nsrk8s0
BRIDGE_MAC=0a:58:0a:f4:00:01  # the CNI bridge plugin's form (0a:58 + the gateway's IPv4), for the bridges it makes
NODE_IP=10.244.0.1    # the bridge's address: kubelet, the pods' gateway
API_IP=10.96.0.1      # the `kubernetes` Service's ClusterIP, a local address here: no kube-proxy
POD_CIDR=10.244.0.0/24
SVC_CIDR=10.96.0.0/24
ETCD_PORT=23790

# The paths kubelet, containerd and the CNI plugins write to whatever their
# flags say: removed at the end unless they were there before.
OUTSIDE=(/var/lib/kubelet /var/lib/cni /var/log/containers /var/log/pods /run/containerd)
declare -A preexisting
for d in "${OUTSIDE[@]}"; do [[ -e $d ]] && preexisting[$d]=1; done
# The pods' cgroups: kubepods (cgroupfs driver; under each v1 hierarchy too)
# or kubepods.slice (systemd's).
KUBEPODS="/sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/kubepods.slice"
for c in $KUBEPODS; do
	if [[ -e $c ]]; then echo "cluster.sh: $c exists: another kubelet runs on this machine; stop it first" >&2; exit 2; fi
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then echo "cluster.sh: bridge $BRIDGE exists (a previous run?); ip link del $BRIDGE" >&2; exit 2; fi

W=$(mktemp -d /tmp/nsr-kube.XXXXXX)
chmod 755 "$W"
touch "$W/.start"  # shims leave sockets in /run/containerd/s whatever the config: newer ones are ours
declare -A pids   # name -> pid, every daemon started
holder=           # the node's mount namespace
export KUBECONFIG=$W/admin.kubeconfig
kubectl() { "$kbin/kubectl" "$@"; }
helm() { HELM_CACHE_HOME=$W/helm/cache HELM_CONFIG_HOME=$W/helm/config HELM_DATA_HOME=$W/helm/data "$kbin/helm" "$@"; }
node() { nsenter -t "$holder" -m -- "$@"; }
log() { echo "[$(date +%T)] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
row() { echo "$*" >>"$W/results.md"; log "result: $*"; }

# alive PID: running (not gone, not a zombie waiting for its parent).
alive() { [[ -d /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# stop PID: SIGTERM, then SIGKILL after 10 s.
stop() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 100; i++)); do
		alive "$pid" || break
		sleep 0.1 # polling interval, bounded by the loop
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# until TIMEOUT CMD...: CMD until it succeeds, for at most TIMEOUT seconds
# (times --timeout-scale).
until_ok() {
	local timeout=$1 end
	shift
	end=$((SECONDS + timeout * scale))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < end)) || return 1
		sleep 0.2 # polling interval, bounded by TIMEOUT
	done
}

cgroup_pids() {
	# shellcheck disable=SC2086 # KUBEPODS is a list of globs
	find $KUBEPODS -name cgroup.procs 2>/dev/null | xargs -r cat 2>/dev/null | sort -u
}

cleanup() {
	local rc=$? p d i args
	set +e
	trap - EXIT INT TERM
	log "cleaning up (exit $rc)"
	# What the cluster says about a failure (not after an interrupt: the
	# signal has stopped etcd too, and each call would wait out its timeout).
	if [[ $rc != 0 && -z ${interrupted:-} && -n ${pids[kube-apiserver]:-} ]]; then
		echo "---- load average: $(cat /proc/loadavg)" >&2
		echo "---- events" >&2
		timeout 10 "$kbin/kubectl" get events -A 2>&1 | tail -n 20 >&2
		echo "---- daemon logs" >&2
		timeout 10 "$kbin/kubectl" -n nsredirect logs -l app.kubernetes.io/name=nsredirect --tail 30 2>&1 | cut -c1-400 >&2
		# A daemon container kubelet restarted: what the one before said.
		timeout 10 "$kbin/kubectl" -n nsredirect logs -l app.kubernetes.io/name=nsredirect --previous --tail 30 2>/dev/null | cut -c1-400 | sed 's/^/previous: /' >&2
		mkdir -p "$W/logs/kubectl"
		timeout 20 "$kbin/kubectl" get pods -A -o wide >"$W/logs/kubectl/pods.txt" 2>&1
		timeout 20 "$kbin/kubectl" get events -A -o wide >"$W/logs/kubectl/events.txt" 2>&1
		timeout 20 "$kbin/kubectl" describe pods -A >"$W/logs/kubectl/describe-pods.txt" 2>&1
	fi
	if [[ $rc != 0 && -d $W/logs ]]; then
		for f in "$W"/logs/*.log; do echo "---- tail of $f" >&2; tail -n 15 "$f" >&2; done
	fi
	[[ -n ${pids[kubelet]:-} ]] && stop "${pids[kubelet]}"
	# The shims of our containerd (found by its socket: they are not our
	# children, and a task's bundle and shim.pid go before its shim does).
	local shims=()
	# Every process of the host is looked at, with builtins only (a fork or
	# two for each of thousands of processes took tens of seconds); one that
	# exits meanwhile takes its cmdline with it, quietly.
	for f in /proc/[0-9]*/cmdline; do
		{ mapfile -d '' -t args <"$f"; } 2>/dev/null || continue
		if [[ ${args[0]:-} == /usr/bin/containerd-shim* && " ${args[*]} " == *" -address $W/containerd.sock "* ]]; then
			p=${f#/proc/}
			shims+=("${p%/cmdline}")
		fi
	done
	# The pods' processes (pause, app, nsredirect), by pid.
	for ((i = 0; i < 3; i++)); do
		for p in $(cgroup_pids); do kill -KILL "$p" 2>/dev/null; done
		until_ok 5 bash -c "! find $KUBEPODS -name cgroup.procs 2>/dev/null | xargs -r cat | grep -q ."
	done
	# systemd's units for them: it removes their cgroups itself.
	[[ $driver == systemd ]] && timeout 30 systemctl stop kubepods.slice 2>/dev/null
	for p in "${shims[@]}"; do stop "$p"; done
	for name in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
		[[ -n ${pids[$name]:-} ]] && stop "${pids[$name]}"
	done
	# The node's mount namespace goes with its last process: every mount
	# kubelet and containerd made (rootfs overlays, secret tmpfs, netns
	# files) and its bpffs with any pin left in it.
	[[ -n $holder ]] && stop "$holder"
	ip link del "$BRIDGE" 2>/dev/null
	# shellcheck disable=SC2086
	for d in $(find $KUBEPODS -depth -type d 2>/dev/null); do rmdir "$d" 2>/dev/null; done
	for d in "${OUTSIDE[@]}"; do
		[[ -n ${preexisting[$d]:-} ]] && continue
		if grep -q " $d" /proc/self/mountinfo; then umount -R "$d" 2>/dev/null; fi
		rm -rf "$d"
	done
	if [[ -n ${preexisting[/run/containerd]:-} ]]; then
		# Another containerd's directory: only the sockets our shims left,
		# newer than this run and with nobody listening.
		for p in $(find /run/containerd/s -type s -newer "$W/.start" 2>/dev/null); do
			ss -xl | grep -qF "$p" || rm -f "$p"
		done
	fi
	grep -q " $W" /proc/self/mountinfo && umount -R "$W" 2>/dev/null
	rm -rf "$keep"
	if [[ $rc != 0 && -d $W/logs ]]; then
		# Every daemon's log, and every container's (pod-logs: the
		# nsredirect containers kubelet restarted too), for after the run.
		mkdir -p "$keep" && cp -r "$W/logs" "$keep/cluster" && cp -r "$W/pod-logs" "$keep/pods" 2>/dev/null
		echo "cluster.sh: the run's logs are in $keep" >&2
	fi
	rm -rf "$W"
	# What must be gone now.
	local left=()
	for d in "${OUTSIDE[@]}"; do [[ -z ${preexisting[$d]:-} && -e $d ]] && left+=("$d"); done
	[[ -e $W ]] && left+=("$W")
	# shellcheck disable=SC2086
	for c in $(ls -d $KUBEPODS 2>/dev/null); do left+=("cgroup $c"); done
	ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("bridge $BRIDGE")
	for name in "${!pids[@]}"; do alive "${pids[$name]}" && left+=("$name pid ${pids[$name]}"); done
	for p in "${shims[@]}"; do alive "$p" && left+=("containerd-shim pid $p"); done
	if ((${#left[@]})); then
		echo "cluster.sh: left behind: ${left[*]}" >&2
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
interrupted=
trap 'interrupted=1; exit 130' INT
trap 'interrupted=1; exit 143' TERM

mkdir -p "$W"/{pki,logs,etcd,containerd/root,containerd/state,containerd/opt,cni/net.d,cni/ipam,kubelet,pod-logs,images,runc-root}
: >"$W/results.md"
[[ -x $kbin/kube-apiserver && -x $kbin/etcd && -x $kbin/helm ]] || fail "$kbin lacks the cluster's binaries: run test/runtimes/kubernetes/build.sh"
if [[ -n $tools ]]; then
	for t in pause dialer ociimage; do
		[[ -x $tools/$t ]] || fail "--tools $tools has no $t: build.sh builds it into OUT/images"
		cp "$tools/$t" "$W/images/"
	done
else
	(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$W/images/" ./cmd/pause ./cmd/dialer ./cmd/ociimage)
fi

### The node: a mount namespace holding a fresh bpffs, private for now.
unshare -m --propagation private -- sh -c 'mount -t bpf bpf /sys/fs/bpf && exec sleep infinity' &
holder=$!
until_ok 10 node sh -c 'test "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs' || fail "no bpffs in the node's mount namespace"

### Certificates: a CA, the API server's, and client certificates.
pki=$W/pki
cert() { # name subject [extensions]
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
	openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
		-extfile <(printf '%s\n' "${3:-extendedKeyUsage=clientAuth}") -out "$pki/$1.crt" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/ca.key" -subj /CN=nsredirect-test-ca -days 2 -out "$pki/ca.crt" 2>/dev/null
cert apiserver /CN=kube-apiserver "subjectAltName=IP:$API_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
cert admin "/O=system:masters/CN=admin"
cert kubelet "/O=system:nodes/CN=system:node:$NODE"
cert apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client"
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key" 2>/dev/null
openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
kubeconfig() { # file cert
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://$API_IP", certificate-authority: $pki/ca.crt}}]
users: [{name: u, user: {client-certificate: $pki/$2.crt, client-key: $pki/$2.key}}]
EOF
}
kubeconfig "$W/admin.kubeconfig" admin
kubeconfig "$W/kubelet.kubeconfig" kubelet

### The bridge: the pods' network and the API server's address.
# With an address of its own: a bridge given none takes the lowest MAC of
# its ports, which changes as pods' veths come and go, and a pod whose
# neighbour entry for the gateway still holds a departed veth's MAC loses
# the node (kubelet's probes, the API server) until that entry expires,
# tens of seconds (the daemon pod then fails its liveness probe and misses
# pod events). The CNI bridge plugin sets one on the bridges it creates;
# this one is created here, for the API server's address.
ip link add "$BRIDGE" address "$BRIDGE_MAC" type bridge
# 3: NET_ADDR_SET, which the bridge keeps whatever ports it gets.
[[ $(cat "/sys/class/net/$BRIDGE/addr_assign_type") == 3 ]] || fail "bridge $BRIDGE: its address is not fixed (addr_assign_type $(cat "/sys/class/net/$BRIDGE/addr_assign_type"))"
ip addr add "$NODE_IP/24" dev "$BRIDGE"
ip addr add "$API_IP/32" dev "$BRIDGE"
ip link set "$BRIDGE" up

### Control plane.
start() { # name [node] command...: started in the host's namespaces (or the node's mount namespace), log in logs/
	local name=$1
	shift
	if [[ $1 == node ]]; then
		shift
		nsenter -t "$holder" -m -- "$@" >"$W/logs/$name.log" 2>&1 & # nsenter execs: $! is the daemon
	else
		"$@" >"$W/logs/$name.log" 2>&1 &
	fi
	pids[$name]=$!
}
start etcd "$kbin/etcd" --name nsr --data-dir "$W/etcd" \
	--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
	--listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
	--initial-cluster nsr=http://127.0.0.1:23800
until_ok 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health" || fail "etcd not healthy"
t0=$SECONDS
start kube-apiserver "$kbin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
	--bind-address "$API_IP" --advertise-address "$API_IP" --secure-port 443 \
	--service-cluster-ip-range "$SVC_CIDR" --allow-privileged \
	--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" --client-ca-file "$pki/ca.crt" \
	--kubelet-client-certificate "$pki/apiserver-kubelet.crt" --kubelet-client-key "$pki/apiserver-kubelet.key" \
	--service-account-issuer https://kubernetes.default.svc.cluster.local \
	--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
	--kubelet-preferred-address-types InternalIP --authorization-mode Node,RBAC --profiling=false
until_ok 120 kubectl get --raw /readyz || fail "kube-apiserver not ready within $((120 * scale)) s"
log "kube-apiserver ready in $((SECONDS - t0)) s"
start kube-controller-manager "$kbin/kube-controller-manager" --kubeconfig "$W/admin.kubeconfig" \
	--leader-elect=false --bind-address 127.0.0.1 --service-account-private-key-file "$pki/sa.key" \
	--root-ca-file "$pki/ca.crt" --use-service-account-credentials=false --profiling=false
start kube-scheduler "$kbin/kube-scheduler" --kubeconfig "$W/admin.kubeconfig" --leader-elect=false \
	--bind-address 127.0.0.1 --profiling=false

### The node: containerd, images, kubelet.
cat >"$W/runc-wrapper" <<EOF
#!/bin/sh
# runc, with a negative oom_score_adj in the container's spec clamped to 0:
# root here lacks CAP_SYS_RESOURCE, which lowering it needs.
prev=
for a in "\$@"; do
	case \$prev in
	--bundle|-b) sed -i -E 's/"oomScoreAdj":-[0-9]+/"oomScoreAdj":0/' "\$a/config.json" ;;
	--process|-p) sed -i -E 's/"oomScoreAdj":-[0-9]+/"oomScoreAdj":0/' "\$a" ;;
	esac
	prev=\$a
done
exec /usr/sbin/runc "\$@"
EOF
chmod 755 "$W/runc-wrapper"
cat >"$W/containerd.toml" <<EOF
version = 2
root = "$W/containerd/root"
state = "$W/containerd/state"
[grpc]
  address = "$W/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "nsr.test/pause:1"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$W/runc-wrapper"
        Root = "$W/runc-root"
        SystemdCgroup = $([[ $driver == systemd ]] && echo true || echo false)
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$W/cni/net.d"
EOF
cat >"$W/cni/net.d/10-nsrk8s.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "nsrk8s", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$W/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
start containerd node /usr/bin/containerd --config "$W/containerd.toml"
ctr() { /usr/bin/ctr --address "$W/containerd.sock" -n k8s.io "$@"; }
until_ok 30 ctr version || fail "containerd did not start"

img=$W/images
"$img/ociimage" -o "$img/pause.tar" -tag nsr.test/pause:1 -entrypoint /pause "$img/pause=/pause"
"$img/ociimage" -o "$img/app.tar" -tag nsr.test/app:1 -entrypoint /usr/local/bin/demo-backend \
	"$repo/bin/demo-backend=/usr/local/bin/demo-backend" "$img/dialer=/usr/local/bin/dialer"
# What `make image` builds (the Dockerfile's prebuilt stage), as `docker save` would hand it over.
"$img/ociimage" -o "$img/nsredirect.tar" -tag nsredirect:latest -entrypoint nsredirect -cmd docker \
	"$repo/bin/nsredirect=/usr/local/bin/nsredirect"
for i in pause app nsredirect; do node /usr/bin/ctr --address "$W/containerd.sock" -n k8s.io images import "$img/$i.tar" >/dev/null; done
row "| image nsredirect:latest (the archive \`ctr images import\` loads) | $(stat -c %s "$img/nsredirect.tar") bytes |"

cat >"$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: $driver
containerRuntimeEndpoint: unix://$W/containerd.sock
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $W/pod-logs
failSwapOn: false
oomScoreAdj: 0
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}
localStorageCapacityIsolation: false
resolvConf: /etc/resolv.conf
EOF
start kubelet node "$kbin/kubelet" --config "$W/kubelet.yaml" --kubeconfig "$W/kubelet.kubeconfig" \
	--root-dir "$W/kubelet" --hostname-override "$NODE" --node-ip "$NODE_IP"
until_ok 120 kubectl wait --for=condition=Ready "node/$NODE" --timeout=5s || fail "node $NODE not Ready within $((120 * scale)) s"
until_ok 60 kubectl get serviceaccount default || fail "no default service account (controller-manager)"
log "cluster up: node $NODE Ready"
row "| cluster up (etcd, apiserver, controller-manager, scheduler, containerd, kubelet Ready) | $SECONDS s after start |"

### The test pods.
kubectl create namespace nsr-test >/dev/null
web_pod() { # name
	cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: nsr-test
  annotations: {nsredirect.io/redirect: "80=3210"}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: nsr.test/app:1, imagePullPolicy: Never, args: [--listen, ":3210"]}
  - {name: probe, image: nsr.test/app:1, imagePullPolicy: Never, command: [/usr/local/bin/dialer, first, "127.0.0.1:3210", "127.0.0.1:80"]}
EOF
}

# redirected POD: 127.0.0.1:80 and [::1]:80 dialled from inside reach :3210.
redirected() {
	kubectl -n nsr-test exec "$1" -c app -- dialer get http://127.0.0.1:80/ | grep -q "200 OK hello from demo-backend" &&
		kubectl -n nsr-test exec "$1" -c app -- dialer get 'http://[::1]:80/' | grep -q "200 OK hello from demo-backend"
}

# first_ms POD: how long after the probe container started 127.0.0.1:80
# answered, beyond when :3210 itself did (the redirect's lag).
first_ms() {
	local out d r
	until_ok 40 bash -c "'$kbin/kubectl' -n nsr-test logs '$1' -c probe | grep -q direct_ms" || fail "pod $1: probe printed nothing"
	out=$(kubectl -n nsr-test logs "$1" -c probe)
	d=$(sed -n 's/.*direct_ms=\(-*[0-9]*\).*/\1/p' <<<"$out")
	r=$(sed -n 's/.*redirect_ms=\(-*[0-9]*\).*/\1/p' <<<"$out")
	((d >= 0 && r >= 0)) || fail "pod $1: $out"
	echo "$((r > d ? r - d : 0)) $d $r"
}

ours=() # the ids of the programs pinned under our bpffs
pinned_progs() { node bpftool -j -f prog show 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin):
    if any(x.startswith("/sys/fs/bpf/nsredirect") for x in p.get("pinned", [])):
        print(p["id"])'; }

# installed KIND: the DaemonSet pod Ready through its probes, an annotated
# pod redirected, then the lifecycle checks.
installed() {
	local kind=$1 ms d r out max=0 i dsp worst
	t0=$SECONDS
	kubectl -n nsredirect rollout status ds/nsredirect --timeout=$((120 * scale))s >&2 || fail "$kind: DaemonSet not Ready"
	row "| $kind: DaemonSet pod Ready (readiness probe /readyz) | $((SECONDS - t0)) s |"
	web_pod web | kubectl apply -f - >/dev/null
	kubectl -n nsr-test wait --for=condition=Ready pod/web --timeout=$((60 * scale))s >/dev/null || fail "$kind: pod web not Ready"
	until_ok 10 redirected web || fail "$kind: 127.0.0.1:80 / [::1]:80 in pod web do not reach :3210"
	row "| $kind: pod web dials 127.0.0.1:80 and [::1]:80 (kubectl exec), reaches :3210 | yes |"
	mapfile -t ours < <(pinned_progs)
	((${#ours[@]})) || fail "$kind: no program pinned under the node's /sys/fs/bpf/nsredirect: $(node find /sys/fs/bpf | head)"
	for i in 1 2 3; do
		kubectl -n nsr-test delete pod web --wait=true >/dev/null
		web_pod web | kubectl apply -f - >/dev/null
		kubectl -n nsr-test wait --for=condition=Ready pod/web --timeout=$((60 * scale))s >/dev/null || fail "$kind: recreated pod web not Ready"
		out=$(first_ms web) || fail "$kind: no timing from pod web's probe"
		read -r ms d r <<<"$out"
		((ms >= max)) && max=$ms worst="127.0.0.1:3210 answered ${d} ms after the container started, 127.0.0.1:80 ${r} ms"
	done
	# The lag is measured and reported against the 1 s target, not asserted
	# (a loaded machine may be slow without a fault); the probe's own bound
	# and first_ms catch a redirect that never comes.
	local target="within the 1 s target"
	((max <= 1000)) || { target="OVER the 1 s target"; log "$kind: delete+recreate followed after $max ms, over the 1 s target"; }
	redirected web || fail "$kind: recreated pod web not redirected"
	row "| $kind: delete + recreate of pod web followed (3 times; worst lag of 127.0.0.1:80 behind :3210, from inside) | $max ms, $target ($worst) |"

	# A rollout under a connect loop in the annotated pod.
	kubectl -n nsr-test exec web -c app -- dialer loop 127.0.0.1:80 /stop >"$W/loop.out" 2>&1 &
	local loop=$!
	until_ok 10 grep -q "^looping" "$W/loop.out" || fail "$kind: connect loop did not start: $(cat "$W/loop.out")"
	dsp=$(kubectl -n nsredirect get pods -l app.kubernetes.io/name=nsredirect -o name)
	kubectl -n nsredirect rollout restart ds/nsredirect >/dev/null
	kubectl -n nsredirect rollout status ds/nsredirect --timeout=$((180 * scale))s >&2 || fail "$kind: rollout restart did not complete"
	until_ok 60 bash -c "! '$kbin/kubectl' -n nsredirect get $dsp 2>/dev/null" || fail "$kind: old daemon pod $dsp still there"
	# The successor adopts pod web on its next resync tick.
	until_ok 10 bash -c "'$kbin/kubectl' -n nsredirect logs ds/nsredirect | grep 'redirect live' | grep -q nsr-test/web" ||
		fail "$kind: the new daemon pod never adopted nsr-test/web"
	kubectl -n nsr-test exec web -c app -- dialer touch /stop
	wait "$loop" || fail "$kind: connect loop failed: $(cat "$W/loop.out")"
	grep -q "refused=0 other=0" "$W/loop.out" || fail "$kind: connects failed across the rollout: $(cat "$W/loop.out")"
	row "| $kind: \`kubectl rollout restart ds/nsredirect\` under a connect loop in pod web | $(grep ok= "$W/loop.out") |"
	mapfile -t ours < <(pinned_progs)
	redirected web || fail "$kind: pod web not redirected after the rollout"
	# --log-format json holds for client-go's own messages too.
	local lines notjson
	lines=$(kubectl -n nsredirect logs ds/nsredirect | wc -l)
	notjson=$(kubectl -n nsredirect logs ds/nsredirect | grep -cv '^{' || true)
	((notjson == 0)) || fail "$kind: daemon log lines not JSON: $(kubectl -n nsredirect logs ds/nsredirect | grep -v '^{' | head -3)"
	row "| $kind: the new daemon pod's log (--log-format json) | $lines lines, all JSON |"
}

# uninstalled KIND: nothing pinned, nothing attached, pod web's redirect gone.
uninstalled() {
	local kind=$1 id left
	until_ok 60 bash -c "! '$kbin/kubectl' -n nsredirect get pods -l app.kubernetes.io/name=nsredirect -o name | grep -q ." || fail "$kind: daemon pods still there"
	# maps.debug and progs.debug are the kernel's (bpf_preload), in every bpffs.
	left=$(node ls -A /sys/fs/bpf | grep -vx 'maps.debug\|progs.debug' || true)
	[[ -z $left ]] || fail "$kind: left in the node's bpffs: $left"
	for id in "${ours[@]}"; do
		bpftool prog show id "$id" >/dev/null 2>&1 && fail "$kind: program $id still loaded (attached)"
	done
	kubectl -n nsr-test exec web -c app -- dialer get http://127.0.0.1:80/ >/dev/null 2>&1 && fail "$kind: pod web still redirected after uninstall"
	row "| $kind: uninstall leaves nothing pinned (node's /sys/fs/bpf empty) or attached (${#ours[@]} programs gone) | yes |"
	kubectl -n nsr-test delete pod web --wait=true >/dev/null
}

### 1. A node whose /sys/fs/bpf is a private mount; kubectl apply -k.
kind="kubectl apply -k, private bpffs"
kubectl apply -k "$repo/deploy/kubernetes" >&2
installed "$kind"

# Bad annotation, hostNetwork pod: Warning Events.
cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: nsr-test, annotations: {nsredirect.io/redirect: "80=notaport"}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: app, image: nsr.test/app:1, imagePullPolicy: Never, command: [/usr/local/bin/dialer, wait]}]
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: nsr-test, annotations: {nsredirect.io/redirect: "80=3210"}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers: [{name: app, image: nsr.test/app:1, imagePullPolicy: Never, command: [/usr/local/bin/dialer, wait]}]
EOF
for p in bad hostnet; do
	until_ok 30 bash -c "'$kbin/kubectl' -n nsr-test get events --field-selector involvedObject.name=$p,reason=InvalidRedirect,type=Warning -o name | grep -q ." ||
		fail "$kind: no Warning InvalidRedirect Event on pod $p"
	msg=$(kubectl -n nsr-test get events --field-selector "involvedObject.name=$p,reason=InvalidRedirect" -o jsonpath='{.items[0].message}')
	row "| $kind: pod $p: Warning InvalidRedirect (kubectl get events) | $msg |"
done
kubectl -n nsr-test delete pod bad hostnet --wait=true >/dev/null

kubectl delete -k "$repo/deploy/kubernetes" --wait=true >&2
uninstalled "$kind"

### 2. The same node with /sys/fs/bpf made shared (as systemd mounts it); helm install.
node mount --make-shared /sys/fs/bpf
kind="helm install, shared bpffs"
helm install nsredirect "$repo/deploy/helm/nsredirect" -n nsredirect --create-namespace --wait=false >&2
installed "$kind"
helm uninstall nsredirect -n nsredirect --wait >&2
uninstalled "$kind"
kubectl delete namespace nsredirect --wait=true >/dev/null

{
	host="hybrid cgroup host"
	[[ $(stat -f -c %T /sys/fs/cgroup) == cgroup2fs ]] && host="pure cgroup2 host, PID 1 $(cat /proc/1/comm)"
	echo "| Kubernetes v1.37.2 single node ($host, kernel $(uname -r), $driver cgroup driver, containerd $(/usr/bin/containerd --version | awk '{print $3}'), runc $(/usr/sbin/runc --version | awk 'NR == 1 {print $3}')) | result |"
	echo "|---|---|"
	cat "$W/results.md"
} >"$results"
cat "$results"
log "all Kubernetes checks passed"
