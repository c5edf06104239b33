#!/usr/bin/env bash
# A virtual cluster on this machine: N nodes, each a network namespace and a UTS namespace of its own (hostname
# node1..nodeN), joined by a private bridge with no uplink, each node's link optionally shaped (docs/vcluster.md).
#
#   scripts/vcluster.sh up N [--rate R]     # R: a tc rate (100mbit, 1gbit, 500kbit, ...) or none (the default)
#   scripts/vcluster.sh down                # every process in a node is killed, then the namespaces and bridge go
#   scripts/vcluster.sh status              # the nodes, their addresses, rate and processes; exit 1 when down
#   scripts/vcluster.sh exec NODE CMD...    # CMD inside NODE (its network and hostname; the files are shared)
#   scripts/vcluster.sh pids NODE           # the processes inside NODE, one pid a line
#   scripts/vcluster.sh mpiexec ARGS...     # Open MPI's mpiexec with the launch agent and the cluster's network:
#                                           # e.g. mpiexec -n 4 --host node1:2,node2:2 python train.py
#
# Node K is the network namespace vc-nodeK with eth0 at SUBNET.K/24, whose peer vc-nodeK is a port of the bridge
# vcbr0. The bridge has no address and no other port, so nothing on it reaches the machine or the outside; mpiexec
# runs inside node1 (as a batch script runs on a job's first node) and reaches the other nodes over the bridge. A
# rate shapes both directions of the node's link (tbf on each end of the veth pair); loopback inside a node is never
# shaped. A node's TCP gives up on a peer after ~6 s of unacknowledged data (tcp_retries2=4, not 15: ~15 min) and
# probes an idle connection after 1 s, so a dead link ends a job in seconds (docs/vcluster.md). `up` is idempotent:
# it makes whatever is missing, removes the nodes above N and sets every link's rate; a step the kernel refuses
# prints one line and the command exits 1. Needs root. A Slurm with one slurmd per node: scripts/vcluster_slurm.sh.
#
# Environment: VCLUSTER_SUBNET (first three octets, default 10.213.0; refused if the machine already routes it),
# VCLUSTER_NAME (default vc: the names' prefix, vcbr0 and vc-nodeK; another name makes a second cluster beside it),
# VCLUSTER_STATE (default /run/vcluster, /run/vcluster-NAME with a name: the UTS namespaces' bind mounts, the record).
set -uo pipefail

SUBNET=${VCLUSTER_SUBNET:-10.213.0}
STATE=${VCLUSTER_STATE:-/run/vcluster${VCLUSTER_NAME:+-$VCLUSTER_NAME}}
PREFIX=${VCLUSTER_NAME:-vc}
BRIDGE=${PREFIX}br0
MAX_NODES=64
FAILED=0
[[ $PREFIX =~ ^[a-z][a-z0-9]{0,5}$ ]] || {
    echo "vcluster: VCLUSTER_NAME must be 1-6 lowercase letters or digits from a letter (interface names are short)" >&2
    exit 2
}

usage() {
    echo "usage: $0 up N [--rate R] | down | status | exec NODE CMD... | pids NODE | mpiexec ARGS..." >&2
    exit 2
}

fail() {
    echo "vcluster: $*" >&2
    FAILED=1
}

# Run a command; if it fails print one line naming the step and the kernel's answer. `try DESC CMD...`
try() {
    local desc=$1 out
    shift
    if ! out=$("$@" 2>&1); then
        fail "$desc: ${out%%$'\n'*}"
        return 1
    fi
}

need_root() {
    [ "$(id -u)" -eq 0 ] || { echo "vcluster: needs root (network and UTS namespaces)" >&2; exit 1; }
    local tool
    for tool in ip tc bridge nsenter unshare mount; do
        command -v "$tool" >/dev/null || { echo "vcluster: $tool not found" >&2; exit 1; }
    done
}

# The nodes that exist now: node names from the network namespaces vc-nodeK, in order.
existing_nodes() {
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$PREFIX-\\(node[0-9]\\+\\)\$/\\1/p" | sort -V
}

node_index() {
    local n=${1#node}
    [[ $1 == node* && $n =~ ^[0-9]+$ && $n -ge 1 && $n -le $MAX_NODES ]] || return 1
    echo "$n"
}

# tc's rate -> bits per second (empty when not a rate)
rate_bps() {
    local r=${1,,} num unit
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit)$ ]] || return 1
    num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
    awk -v n="$num" -v u="$unit" 'BEGIN {
        m = (u == "bit") ? 1 : (u == "kbit") ? 1e3 : (u == "mbit") ? 1e6 : 1e9; printf "%d\n", n * m }'
}

# shape DEV (optionally in namespace NS) to RATE, or remove its shaping when RATE is none
shape() {
    local ns=$1 dev=$2 rate=$3 bps burst
    local tcn=(tc)
    [ -n "$ns" ] && tcn=(tc -n "$ns")
    if [ "$rate" = none ]; then
        if "${tcn[@]}" qdisc show dev "$dev" root 2>/dev/null | grep -q '^qdisc tbf'; then
            try "remove the rate of $dev${ns:+ in $ns}" "${tcn[@]}" qdisc del dev "$dev" root
        fi
        return
    fi
    bps=$(rate_bps "$rate")
    # tbf's bucket: 100 us of traffic, at least 16000 B (ten full-size frames; tbf cuts a bigger GSO packet into
    # frames that fit). A link never sends faster than its rate, but a bucket refills while the link is idle and
    # lets the next message's first bucketful leave at the veth's speed: a larger one (1 ms, 64 KiB) sent a 0.34 MB
    # allreduce made after a pause twice as fast as the same calls back to back. Much below 16 KB tbf's timer fires
    # every frame or two and the link falls short of its rate (docs/vcluster.md, "Why the bucket is small").
    burst=$((bps / 8 / 10000))
    [ "$burst" -lt 16000 ] && burst=16000
    try "shape $dev${ns:+ in $ns} to $rate" \
        "${tcn[@]}" qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 20ms
}

ensure_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        try "add bridge $BRIDGE" ip link add "$BRIDGE" type bridge || return 1
    fi
    sysctl -qw "net.ipv6.conf.$BRIDGE.disable_ipv6=1" 2>/dev/null
    try "set $BRIDGE up" ip link set "$BRIDGE" up
}

# Node K: its network namespace and link, its UTS namespace (bind-mounted at STATE/uts/nodeK), its rate.
ensure_node() {
    local k=$1 rate=$2 node=node$1 ns=$PREFIX-node$1 host=$PREFIX-node$1
    if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        try "$node: add network namespace $ns" ip netns add "$ns" || return 1
    fi
    try "$node: its TCP settings" ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
        net.ipv6.conf.default.disable_ipv6=1 net.ipv4.tcp_retries2=4 net.ipv4.tcp_keepalive_time=1 \
        net.ipv4.tcp_keepalive_intvl=1 net.ipv4.tcp_keepalive_probes=3 || return 1
    try "$node: loopback up" ip -n "$ns" link set lo up || return 1
    if ! ip link show "$host" >/dev/null 2>&1; then
        try "$node: add veth pair $host / eth0" \
            ip link add "$host" type veth peer name eth0 netns "$ns" || return 1
    fi
    sysctl -qw "net.ipv6.conf.$host.disable_ipv6=1" 2>/dev/null
    try "$node: attach $host to $BRIDGE" ip link set "$host" master "$BRIDGE" up || return 1
    if ! ip -n "$ns" -4 addr show dev eth0 | grep -q "inet $SUBNET.$k/24"; then
        try "$node: address $SUBNET.$k/24" ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0 || return 1
    fi
    try "$node: eth0 up" ip -n "$ns" link set eth0 up || return 1
    if ! mountpoint -q "$STATE/uts/$node"; then
        touch "$STATE/uts/$node"
        try "$node: UTS namespace" unshare --uts="$STATE/uts/$node" hostname "$node" || return 1
    fi
    shape "$ns" eth0 "$rate"
    shape "" "$host" "$rate"
}

# Every node's link forwarding (a port set up again passes no frame for a moment), and no node remembering a peer as
# unreachable: a link that was down leaves FAILED neighbour entries, and a connection to such a peer fails at once
# ("No route to host") until they expire.
await_links() {
    local k
    for k in $(seq "$1"); do
        for _ in $(seq 50); do
            bridge link show dev "$PREFIX-node$k" 2>/dev/null | grep -q "state forwarding" && break
            sleep 0.1
        done
        bridge link show dev "$PREFIX-node$k" 2>/dev/null | grep -q "state forwarding" ||
            fail "node$k: its link $PREFIX-node$k is not forwarding after 5 s"
        ip -n "$PREFIX-node$k" neigh flush all 2>/dev/null
    done
}

# The pids whose network namespace is NODE's (every process started inside it).
node_pids() {
    ip netns pids "$PREFIX-$1" 2>/dev/null
}

remove_node() {
    local node=$1 pids
    pids=$(node_pids "$node")
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null
        for _ in $(seq 50); do
            [ -z "$(node_pids "$node")" ] && break
            sleep 0.1
        done
    fi
    if mountpoint -q "$STATE/uts/$node"; then
        try "$node: unmount its UTS namespace" umount "$STATE/uts/$node"
    fi
    rm -f "$STATE/uts/$node"
    if ip link show "$PREFIX-$node" >/dev/null 2>&1; then
        try "$node: delete link $PREFIX-$node" ip link del "$PREFIX-$node"
    fi
    if ip netns list | awk '{print $1}' | grep -qx "$PREFIX-$node"; then
        try "$node: delete network namespace $PREFIX-$node" ip netns del "$PREFIX-$node"
    fi
}

check_subnet() {
    # the subnet must be ours alone: no route of the machine's (but the bridge's own) inside it or covering it, bar
    # the default route
    local used
    used=$({
        ip -4 route show root "$SUBNET.0/24"
        ip -4 route show match "$SUBNET.0/24" | grep -v '^default'
    } | grep -v "dev $BRIDGE" | awk '{print $1}' | sort -u | tr '\n' ' ')
    if [ -n "$used" ]; then
        echo "vcluster: subnet $SUBNET.0/24 overlaps the machine's routes (${used% }): set VCLUSTER_SUBNET" >&2
        exit 1
    fi
}

cmd_up() {
    local n=${1:-} rate=none k node
    shift || usage
    while [ $# -gt 0 ]; do
        case $1 in
        --rate) rate=${2:-}; shift 2 || usage ;;
        --rate=*) rate=${1#--rate=}; shift ;;
        *) usage ;;
        esac
    done
    if ! [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le $MAX_NODES ]]; then
        echo "vcluster: N must be 1..$MAX_NODES, got '$n'" >&2
        exit 2
    fi
    rate=${rate,,}
    [ "$rate" = unshaped ] && rate=none
    if [ "$rate" != none ] && ! [ "$(rate_bps "$rate")" -gt 0 ] 2>/dev/null; then
        echo "vcluster: --rate must be a tc rate like 100mbit, 1gbit, 500kbit, or none; got '$rate'" >&2
        exit 2
    fi
    need_root
    check_subnet
    mkdir -p "$STATE/uts"
    for node in $(existing_nodes); do
        k=$(node_index "$node") && [ "$k" -gt "$n" ] && remove_node "$node"
    done
    ensure_bridge || exit 1
    for k in $(seq "$n"); do
        ensure_node "$k" "$rate"
    done
    await_links "$n"
    printf 'nodes=%s\nrate=%s\nsubnet=%s.0/24\n' "$n" "$rate" "$SUBNET" >"$STATE/cluster"
    [ "$FAILED" -eq 0 ] || exit 1
    echo "vcluster: up: $n nodes on $BRIDGE ($SUBNET.0/24), rate $rate"
}

cmd_down() {
    local node
    need_root
    for node in $(existing_nodes); do
        remove_node "$node"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        try "delete bridge $BRIDGE" ip link del "$BRIDGE"
    fi
    if [ -d "$STATE" ]; then
        for f in "$STATE"/uts/*; do
            [ -e "$f" ] || continue
            mountpoint -q "$f" && try "unmount $f" umount "$f"
            rm -f "$f"
        done
        rm -rf "$STATE"
    fi
    [ "$FAILED" -eq 0 ] || exit 1
    echo "vcluster: down"
}

cmd_status() {
    local nodes node addr rate pids
    nodes=$(existing_nodes)
    if [ -z "$nodes" ]; then
        echo "vcluster: down"
        exit 1
    fi
    [ -f "$STATE/cluster" ] && sed 's/^/# /' "$STATE/cluster"
    for node in $nodes; do
        addr=$(ip -n "$PREFIX-$node" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')
        rate=$(tc -n "$PREFIX-$node" qdisc show dev eth0 root 2>/dev/null | sed -n 's/.* rate \([^ ]*\).*/\1/p')
        pids=$(node_pids "$node" | wc -l)
        printf '%s  %s  hostname %s  rate %s  %s processes\n' "$node" "${addr:-no-address}" \
            "$(nsenter --uts="$STATE/uts/$node" hostname 2>/dev/null || echo '?')" "${rate:-unshaped}" "$pids"
    done
}

cmd_exec() {
    local node=${1:-}
    shift || usage
    [ $# -gt 0 ] || usage
    node_index "$node" >/dev/null && [ -e "/run/netns/$PREFIX-$node" ] && mountpoint -q "$STATE/uts/$node" || {
        echo "vcluster: no node '$node' (scripts/vcluster.sh status)" >&2
        exit 1
    }
    exec nsenter --net="/run/netns/$PREFIX-$node" --uts="$STATE/uts/$node" -- "$@"
}

# mpiexec (the one on PATH, or $MPIEXEC) run inside node1, for the nodes: PRRTE starts its daemon on each other
# node through scripts/vcluster_agent (in place of ssh); its own traffic and MPI's TCP use the cluster's subnet only
# (ranks on different nodes talk over their shaped links, ranks on one node through shared memory, Open MPI's
# default); ranks fill each node's slots in order (--host nodeK:S; --oversubscribe alone maps by core and was seen to
# put every rank on the first node); idle daemon connections are probed every second, so a lost node is noticed.
mpiexec_cmd() {
    local net="$SUBNET.0/24"
    echo "${MPIEXEC:-mpiexec}" --map-by slot:oversubscribe \
        --prtemca plm_ssh_agent "$(dirname "$(readlink -f "$0")")/vcluster_agent" \
        --prtemca oob_tcp_if_include "$net" --mca oob_tcp_if_include "$net" \
        --prtemca oob_tcp_keepalive_time 1 --prtemca oob_tcp_keepalive_intvl 1 \
        --prtemca oob_tcp_keepalive_probes 3 --mca btl_tcp_if_include "$net"
}

# "node2 (ranks 2-3)": the ranks --host NODE:SLOTS,... gives each node (slots filled in order), from mpiexec's args
node_ranks() {
    local want=$1 hosts="" first=0 h node slots
    shift
    while [ $# -gt 0 ]; do
        case $1 in --host | -H) hosts=${2:-}; shift ;; --host=*) hosts=${1#--host=} ;; esac
        shift
    done
    for h in ${hosts//,/ }; do
        node=${h%%:*} slots=${h#*:}
        [ "$slots" = "$h" ] && slots=1
        [ "$node" = "$want" ] && { echo "$want (ranks $first-$((first + slots - 1)))"; return; }
        first=$((first + slots))
    done
    echo "$want"
}

# A stderr line of the job's that says it is failing, recorded in DIR with the nodes lost: the one Open MPI's launcher
# names, and any of the job's NODES with no process left when the failure began (a killed node's ranks may be
# noticed by their peers' sockets closing, before the launcher says anything). `watch_stderr DIR NODE...`
watch_stderr() {
    local dir=$1 line node
    shift
    while IFS= read -r line; do
        printf '%s\n' "$line" >&2
        case $line in
        *"MPI_ABORT was invoked"* | *"lost communication with a remote daemon"* | *MPI_ERRORS_ARE_FATAL*)
            [ -e "$dir/failing" ] && continue
            date +%s >"$dir/failing"
            # not node1: it runs the launcher, and its ranks may already have ended by the abort
            for node in "$@"; do
                [ "$node" = node1 ] || [ -n "$(node_pids "$node")" ] || echo "$node" >>"$dir/lost"
            done
            ;;
        *"Remote daemon:"*" on node "*) echo "${line##* on node }" >>"$dir/lost" ;;
        esac
    done
}

# The job's nodes whose every process is stopped (state T): a stalled node. `stalled_nodes NODE...`
stalled_nodes() {
    local node pid state stopped
    for node in "$@"; do
        stopped=""
        for pid in $(node_pids "$node"); do
            state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || continue
            [ "$state" = T ] && stopped=yes || { stopped=no; break; }
        done
        [ "$stopped" = yes ] && echo "$node"
    done
}

# The job through mpiexec_cmd, watched: Open MPI 5's mpiexec waits forever for the daemon of a stalled node (stopped,
# its kernel still acknowledging TCP) once a rank has aborted, and exits 0 after losing a node. So once the job's
# stderr says it is failing (MPI_Abort, a lost daemon, MPI's fatal error), mpiexec gets VCLUSTER_ABORT_GRACE_S
# (default 3 s) to end, then is killed with every stopped process of the job's nodes; and a failing job never exits
# 0. The last line names the nodes lost (the launcher's word) or stalled, with their ranks. Signals are forwarded.
cmd_mpiexec() {
    local dir pid status=0 grace=${VCLUSTER_ABORT_GRACE_S:-3} nodes node why="" killed="" h=""
    if [ "$(id -u)" -eq 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
    dir=$(mktemp -d) || exit 1
    export VCLUSTER_JOB_DIR=$dir  # for scripts/vcluster_agent
    nodes=$(for a in "$@"; do echo "$a"; done | sed -n '/^--host$\|^-H$/{n;p}' | tr ',' '\n' | cut -d: -f1)
    # shellcheck disable=SC2046,SC2086
    cmd_exec node1 $(mpiexec_cmd) "$@" 2> >(watch_stderr "$dir" $nodes) &
    pid=$!
    trap 'kill -TERM $pid 2>/dev/null' TERM
    trap 'kill -INT $pid 2>/dev/null' INT
    trap 'kill -USR1 $pid 2>/dev/null' USR1
    while kill -0 "$pid" 2>/dev/null; do
        if [ -e "$dir/failing" ] && [ $(($(date +%s) - $(cat "$dir/failing"))) -ge "$grace" ]; then
            # shellcheck disable=SC2086
            why=$(stalled_nodes $nodes | tr '\n' ' ')
            echo "vcluster: mpiexec still running ${grace} s after the job began to fail: killing it" >&2
            exec 3>&2 2>/dev/null  # not bash's own "Killed" line for it
            killed=yes
            kill -KILL "$pid"
            for node in $why; do
                # shellcheck disable=SC2046
                kill -KILL $(node_pids "$node") 2>/dev/null
            done
            break
        fi
        sleep 0.2
    done
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early
        wait "$pid" || status=$?
    done
    [ -z "$killed" ] || exec 2>&3 3>&-
    sleep 1  # the stderr watcher's last lines, the agents' records
    if [ -s "$dir/daemons" ]; then
        cut -d' ' -f1 "$dir/daemons" >>"$dir/lost"
        [ -e "$dir/failing" ] || date +%s >"$dir/failing"
    fi
    if [ -e "$dir/failing" ]; then
        for node in $(sort -u "$dir/lost" 2>/dev/null); do
            case " $why " in *" $node "*) continue ;; esac  # stalled, then killed here
            h+="$(node_ranks "$node" "$@") lost (its daemon died or was cut off); "
        done
        for node in $why; do
            h+="$(node_ranks "$node" "$@") stalled (every process stopped); "
        done
        echo "vcluster: the job failed${h:+: ${h%; }}" >&2
        [ "$status" -ne 0 ] || status=1
    fi
    rm -rf "$dir"
    return "$status"
}

case ${1:-} in
up) shift; cmd_up "$@" ;;
down) cmd_down ;;
status) cmd_status ;;
exec) shift; cmd_exec "$@" ;;
pids) [ $# -eq 2 ] || usage; node_pids "$2" ;;
mpiexec) shift; cmd_mpiexec "$@"; exit ;;
*) usage ;;
esac
