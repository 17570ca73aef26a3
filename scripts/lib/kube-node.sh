# shellcheck shell=bash
# The real node of scripts/kube-testenv (sourced by it): kubelet, containerd with its CRI plugin and
# runc, CNI on a bridge whose pod IPs the host reaches, and a registry on 127.0.0.1 that containerd
# pulls from over plain HTTP. Uses say, run, api, wait_until, stop_one, CACHE_ROOT, STATE and
# K8S_VERSION from the script.

CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
NODE_BIN="$CACHE_ROOT/node-$K8S_VERSION-containerd-$CONTAINERD_VERSION/bin"
NODE_NAME=${KUBE_TESTENV_NODE:-binder-node}
REGISTRY_PORT=${KUBE_TESTENV_REGISTRY_PORT:-15000}
REGISTRY="127.0.0.1:$REGISTRY_PORT"
BRIDGE=${KUBE_TESTENV_BRIDGE:-binder0}
POD_CIDR=10.244.0.0/24
NODE_IP=10.244.0.1
PAUSE_IMAGE="$REGISTRY/binder-testenv/pause:1"
NODE_RUN=/run/binder-testenv
KUBELET_ROOT=/var/lib/binder-testenv/kubelet
CTRD_ROOT=/var/lib/binder-testenv/containerd

debian_package() {  # debian_package NAME DIR: unpack Debian's package NAME into DIR without installing it
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$1" >/dev/null 2>&1) \
        || { apt-get update -qq >/dev/null && (cd "$tmp" && apt-get download -qq "$1" >/dev/null); }
    dpkg -x "$tmp/$1"_*.deb "$2"
    rm -rf "$tmp"
}

version_ldflags() {
    local minor=${K8S_VERSION#v1.} flags="-s -w"
    minor=${minor%%.*}
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags="$flags -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags="$flags -X $pkg.gitTreeState=clean"
    done
    echo "$flags"
}

build_kubelet() {
    # from the same scratch module as the control plane (its go.mod pins every staging module)
    local work="$CACHE_ROOT/src-$K8S_VERSION"
    say "compiling kubelet $K8S_VERSION"
    (cd "$work" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$(version_ldflags)" \
        -o "$NODE_BIN/kubelet" k8s.io/kubernetes/cmd/kubelet)
}

build_containerd() {
    local work="$CACHE_ROOT/src-containerd-$CONTAINERD_VERSION"
    mkdir -p "$work"
    for cmd in containerd containerd-shim-runc-v2 ctr; do
        say "compiling $cmd $CONTAINERD_VERSION"
        (cd "$work" && CGO_ENABLED=0 GOBIN="$NODE_BIN" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
            -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
            "github.com/containerd/containerd/v2/cmd/$cmd@$CONTAINERD_VERSION")
    done
}

build_pause() {
    # the sandbox image's one program: sleep, reap children, exit on TERM or INT
    local work="$CACHE_ROOT/src-pause"
    mkdir -p "$work"
    printf 'module pause\ngo 1.22\n' > "$work/go.mod"
    cat > "$work/main.go" <<'GO'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
    say "compiling the pause program"
    (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$NODE_BIN/pause" .)
}

build_node() {
    if [ -x "$NODE_BIN/kubelet" ] && [ -x "$NODE_BIN/containerd" ] && [ -x "$NODE_BIN/pause" ] \
        && [ -x "$NODE_BIN/cni/bridge" ] && [ -x "$NODE_BIN/docker-registry" ]; then
        say "using cached node build in $NODE_BIN"
        return
    fi
    command -v go >/dev/null || { say "Go is needed to build the node"; exit 1; }
    mkdir -p "$NODE_BIN/cni"
    say "building the node: kubelet, containerd $CONTAINERD_VERSION, CNI plugins, registry, pause"
    [ -x "$NODE_BIN/kubelet" ] || build_kubelet
    [ -x "$NODE_BIN/containerd" ] && [ -x "$NODE_BIN/containerd-shim-runc-v2" ] && [ -x "$NODE_BIN/ctr" ] \
        || build_containerd
    [ -x "$NODE_BIN/pause" ] || build_pause
    if [ ! -x "$NODE_BIN/cni/bridge" ]; then
        say "unpacking Debian's CNI plugins"
        local x
        x=$(mktemp -d)
        debian_package containernetworking-plugins "$x"
        cp "$x"/usr/lib/cni/{bridge,host-local,loopback,portmap} "$NODE_BIN/cni/"
        rm -rf "$x"
    fi
    if [ ! -x "$NODE_BIN/docker-registry" ]; then
        say "unpacking Debian's docker-registry"
        local y
        y=$(mktemp -d)
        debian_package docker-registry "$y"
        cp "$y/usr/bin/docker-registry" "$NODE_BIN/docker-registry"
        rm -rf "$y"
    fi
    say "node build done: $NODE_BIN"
}

# --- running the node ----------------------------------------------------------------------------

node_certs() {  # the kubelet's client identity (system:node:<name>) and its serving certificate
    local pki="$STATE/pki"
    (
        cd "$pki"
        openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr \
            -subj "/CN=system:node:$NODE_NAME/O=system:nodes" 2>/dev/null
        openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out node.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout kubelet.key -out kubelet.csr -subj "/CN=$NODE_NAME" 2>/dev/null
        printf 'subjectAltName=IP:%s,DNS:%s\n' "$NODE_IP" "$NODE_NAME" > kubelet.ext
        openssl x509 -req -in kubelet.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -out kubelet.crt -extfile kubelet.ext 2>/dev/null
        chmod 600 node.key kubelet.key
    )
    sed -e "s|client-certificate: .*|client-certificate: $pki/node.crt|" \
        -e "s|client-key: .*|client-key: $pki/node.key|" "$STATE/kubeconfig" > "$STATE/node.kubeconfig"
    chmod 600 "$STATE/node.kubeconfig"
}

start_registry() {
    mkdir -p "$CACHE_ROOT/registry"
    cat > "$STATE/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $CACHE_ROOT/registry}
  delete: {enabled: true}
http: {addr: $REGISTRY}
YML
    run docker-registry "$NODE_BIN/docker-registry" serve "$STATE/registry.yml"
    wait_until 30 "the registry" curl -sf "http://$REGISTRY/v2/"
}

push() {  # push IMAGE: copy a locally built image into the registry, under the name pods use
    local image=$1 path=$1
    if [[ $image == */* ]]; then
        case "${image%%/*}" in
            *.*|*:*|localhost) say "push takes an image name without a registry host: $image"; return 2 ;;
        esac
    else
        path="library/$image"
    fi
    docker tag "$image" "$REGISTRY/$path"
    docker push -q "$REGISTRY/$path" >/dev/null
    docker rmi "$REGISTRY/$path" >/dev/null
}

push_images() {
    "$ROOT/scripts/docker-engine" start
    if ! docker image inspect binder-testenv/pause:1 >/dev/null 2>&1; then
        local root
        root=$(mktemp -d)
        cp "$NODE_BIN/pause" "$root/pause"
        tar -C "$root" -cf "$root.tar" pause
        docker import --change 'ENTRYPOINT ["/pause"]' "$root.tar" binder-testenv/pause:1 >/dev/null
        rm -rf "$root" "$root.tar"
    fi
    docker tag binder-testenv/pause:1 "$PAUSE_IMAGE"
    docker push -q "$PAUSE_IMAGE" >/dev/null
    docker rmi "$PAUSE_IMAGE" >/dev/null
    say "pushing the app images to the registry"
    for image in $("$ROOT/scripts/app-images" list); do push "$image"; done
}

containerd_config() {
    local certs="$STATE/certs.d"
    # the registry serves its own name, and stands in for Docker Hub (images named like "app:1")
    for host in "$REGISTRY" docker.io; do
        mkdir -p "$certs/$host"
        printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
            "$REGISTRY" "$REGISTRY" > "$certs/$host/hosts.toml"
    done
    mkdir -p "$STATE/cni"
    cat > "$STATE/cni/10-binder.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "binder-testenv", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni-ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
    cat > "$STATE/containerd.toml" <<TOML
version = 3
root = "$CTRD_ROOT"
# plugins that would make folders and sockets outside this node's own state
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri"]
state = "$NODE_RUN/containerd"
[grpc]
  address = "$NODE_RUN/containerd.sock"
[ttrpc]
  address = "$NODE_RUN/containerd.sock.ttrpc"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$certs"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      Root = "$NODE_RUN/runc"
      SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$NODE_BIN/cni"]
    conf_dir = "$STATE/cni"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "$certs"
TOML
}

kubelet_config() {
    local pki="$STATE/pki"
    cat > "$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
address: $NODE_IP
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$NODE_RUN/containerd.sock
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podPidsLimit: -1
nodeStatusUpdateFrequency: 2s
resolvConf: /etc/resolv.conf
podLogsDir: $KUBELET_ROOT/pod-logs
YAML
}

bridge_up() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$NODE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # Docker's FORWARD policy is DROP: let pods reach each other across the bridge
    iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null \
        || iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
}

start_containerd() {
    mkdir -p "$NODE_RUN" "$CTRD_ROOT"
    PATH="$NODE_BIN:$PATH" run containerd "$NODE_BIN/containerd" --config "$STATE/containerd.toml"
    wait_until 30 "containerd" "$NODE_BIN/ctr" --address "$NODE_RUN/containerd.sock" version
}

start_kubelet() {
    mkdir -p "$KUBELET_ROOT"
    run kubelet "$NODE_BIN/kubelet" --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/node.kubeconfig" \
        --root-dir="$KUBELET_ROOT" --node-ip="$NODE_IP" --hostname-override="$NODE_NAME" \
        --node-labels="type=real" --v=1
}

node_ready() {
    api GET "/api/v1/nodes/$NODE_NAME" | python3 -c '
import json, sys
conditions = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else 1)'
}

start_node() {
    say "starting the registry on $REGISTRY"
    start_registry
    push_images
    node_certs
    containerd_config
    kubelet_config
    bridge_up
    say "starting containerd and kubelet (node $NODE_NAME, pods on $POD_CIDR)"
    start_containerd
    start_kubelet
    wait_until 90 "the node to be Ready" node_ready
}

restart_kubelet() {
    stop_one kubelet
    start_kubelet
    wait_until 90 "the node to be Ready" node_ready
}

kill_containers() {  # every container of the node, then the shims that ran them
    local runc_root="$NODE_RUN/runc/k8s.io" id
    if [ -d "$runc_root" ]; then
        for id in $(runc --root "$runc_root" list -q 2>/dev/null); do
            runc --root "$runc_root" kill "$id" KILL 2>/dev/null || true
            runc --root "$runc_root" delete --force "$id" 2>/dev/null || true
        done
    fi
    local pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null \
            | grep -q -- "^$NODE_BIN/containerd-shim-runc-v2 .*$NODE_RUN/containerd.sock"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}

stop_node() {
    stop_one kubelet
    kill_containers
    stop_one containerd
    stop_one docker-registry
    # the mounts the node made: rootfs overlays, /dev/shm of sandboxes, pod volumes, network namespaces
    local m
    for m in $(awk -v a="$NODE_RUN" -v b="$KUBELET_ROOT" -v c="$CTRD_ROOT" \
            'index($2, a) == 1 || index($2, b) == 1 || index($2, c) == 1 || $2 ~ /^\/run\/netns\/cni-/ { print $2 }' \
            /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -f /run/netns/cni-* 2>/dev/null || true
    rmdir /run/netns 2>/dev/null || true
    # libcni's cache of this node's networks: the pods' bridge and the runtime's loopback
    rm -rf "$NODE_RUN" "$KUBELET_ROOT" "$CTRD_ROOT" /var/lib/cni/results/binder-testenv-* \
        /var/lib/cni/results/cni-loopback-* 2>/dev/null || true
    rmdir /var/lib/binder-testenv /var/lib/cni/results /var/lib/cni 2>/dev/null || true
    rm -rf /var/lib/kubelet/device-plugins 2>/dev/null || true
    rmdir /var/lib/kubelet 2>/dev/null || true
    # the links the kubelet makes to its pods' logs, and the cgroups it made for them
    find /var/log/containers -maxdepth 1 -lname "$KUBELET_ROOT/*" -delete 2>/dev/null || true
    rmdir /var/log/containers 2>/dev/null || true
    for m in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
        [ -d "$m" ] && find "$m" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    while iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null; do :; done
}
