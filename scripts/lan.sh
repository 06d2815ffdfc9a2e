#!/usr/bin/env bash
# lan.sh — a small LAN of network namespaces for mcchat's integration tests.
#
# Usage: scripts/lan.sh up PREFIX | down PREFIX | status PREFIX | down-all
#        scripts/lan.sh addr PREFIX HOST ADDR/LEN...
#
# PREFIX is 1-16 letters/digits and names every namespace of one LAN, so several LANs can
# coexist. (Interface names are fixed per namespace — eth0, eth1, br0, h1.. — so the prefix
# never counts against the 15-character interface-name limit.) Needs root (real, or mapped
# root inside `unshare --user --map-root-user`), iproute2, and smcroute or (on a kernel without
# multicast routing) python3. scripts/test.sh runs
# this inside its own network + mount namespace with a private tmpfs on /run/netns, so the
# LANs it builds are invisible outside that run.
#
# Topology (all links are veth pairs between namespaces created here; nothing touches the
# namespace this script is started in):
#
#            segment A: 198.51.100.0/24, 2001:db8:a::/64          segment B: 203.0.113.0/24,
#                                                                            2001:db8:b::/64
#   PREFIX-h1 eth0 198.51.100.1   2001:db8:a::1 --+
#   PREFIX-h2 eth0 198.51.100.2   2001:db8:a::2 --+-- PREFIX-sw  --+
#   PREFIX-h3 eth0 198.51.100.3   2001:db8:a::3 --+   bridge br0   |
#                                                   (ports h1 h2   |
#                                                    h3 r)         |
#                           PREFIX-r eth0 198.51.100.254 ----------+
#                                         2001:db8:a::254
#                           PREFIX-r eth1 203.0.113.254  ---------- PREFIX-h4 eth0 203.0.113.4
#                                         2001:db8:b::254                         2001:db8:b::4
#
# - Segment B is a direct veth link router <-> h4 (no switch).
# - Hosts (h1..h4): lo up, eth0 up with MULTICAST, DAD off (addresses usable at once), a
#   default route (v4 and v6) via their segment's router address and no multicast route of
#   their own, so multicast leaves on eth0 by way of the default route.
# - PREFIX-sw: br0 with mcast_snooping 0 (floods multicast; no IGMP/MLD querier needed) and
#   STP off (ports forward at once). No IPv6 on the switch.
# - PREFIX-r: ip_forward=1, IPv6 forwarding=1, and an smcrouted (state, socket, pid file and
#   log in ${LAN_STATE_DIR:-/run/mcchat-lan}/PREFIX/) with (*,G) routes eth0 -> eth1 and
#   eth1 -> eth0 for 239.255.0.0/16, ff15::/16, ff05::/16 and every group[/len] in $LAN_GROUPS
#   (space-separated, e.g. LAN_GROUPS="239.1.2.3 ff15::1:2/128"). Every VIF has the default
#   TTL threshold 1: only datagrams sent with TTL (hop limit) >= 2 cross the router, so a
#   TTL-1 datagram from segment A reaches h1..h3 but never h4.
#   On a kernel built without multicast routing (no /proc/net/ip_mr_vif: CONFIG_IP_MROUTE
#   unset, as on some VM kernels) scripts/mroute.py takes smcrouted's place and forwards the
#   same ranges by the same rules in user space, source addresses unchanged.
#
# `up` prints nothing on success and returns only once everything is ready (the router
# forwards). `down` is idempotent. `down-all` tears down every LAN whose state is
# in $LAN_STATE_DIR (scripts/test.sh calls it on exit). `status` prints the namespaces,
# addresses and multicast routes of one LAN.
#
# `addr` adds more addresses to eth0 of HOST (h1..h4 or r) of a LAN that is up, for tests of
# a multi-address host: IPv4 ones as given (a second address in a subnet the interface already
# has is what the kernel calls a secondary address), IPv6 ones with `nodad`, so every one is
# usable (not tentative) when it returns. It prints nothing on success.
set -euo pipefail

STATE_ROOT=${LAN_STATE_DIR:-/run/mcchat-lan}
# Ranges smcroute forwards in both directions, plus the caller's extra groups.
DEFAULT_GROUPS="239.255.0.0/16 ff15::/16 ff05::/16"

die() {
    echo "lan.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 up PREFIX | down PREFIX | status PREFIX | down-all" >&2
    echo "       $0 addr PREFIX HOST ADDR/LEN..." >&2
    exit 2
}

check_prefix() {
    [[ $1 =~ ^[A-Za-z0-9]{1,16}$ ]] || die "PREFIX must be 1-16 letters or digits, got '$1'"
}

need() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "$c not found (apt-get install iproute2 smcroute python3)"
    done
}

# Runs sysctl -w quietly inside namespace $1.
nsysctl() {
    local ns=$1
    shift
    ip netns exec "$ns" sysctl -qw "$@" >/dev/null
}

ns_exists() {
    [[ -e /run/netns/$1 ]]
}

add_ns() {
    local ns=$1
    ip netns add "$ns"
    ip -n "$ns" link set lo up
}

# Host namespace $1 whose eth0 already exists: addresses $2 (v4/len) $3 (v6/len), gateways
# $4 (v4) $5 (v6).
setup_host() {
    local ns=$1 a4=$2 a6=$3 gw4=$4 gw6=$5
    ip -n "$ns" link set eth0 multicast on up
    ip -n "$ns" addr add "$a4" dev eth0
    ip -n "$ns" -6 addr add "$a6" dev eth0 nodad
    ip -n "$ns" route add default via "$gw4" dev eth0
    ip -n "$ns" -6 route add default via "$gw6" dev eth0
}

# IPv6 defaults for a fresh namespace: no DAD (addresses and link-local usable at once), no
# router solicitations or autoconfiguration.
v6_defaults() {
    local ns=$1 k
    for k in all default; do
        nsysctl "$ns" "net.ipv6.conf.$k.accept_dad=0" "net.ipv6.conf.$k.dad_transmits=0" \
            "net.ipv6.conf.$k.accept_ra=0" "net.ipv6.conf.$k.router_solicitations=0" \
            "net.ipv6.conf.$k.autoconf=0"
    done
}

# Whether $1 is a live (not zombie) multicast router of lan.sh: smcrouted, or mroute.py where
# the kernel has no multicast routing.
is_router() {
    local stat comm cmdline
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] && [[ $comm == smcrouted || $cmdline == *mroute.py* ]]
}

# The PID of LAN $1's router, if it runs.
router_pid() {
    local pidfile pid
    for pidfile in "$STATE_ROOT/$1/smcrouted.pid" "$STATE_ROOT/$1/mroute.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(<"$pidfile")
        is_router "$pid" && echo "$pid" && return 0
    done
    return 1
}

# Whether this kernel routes multicast (CONFIG_IP_MROUTE and CONFIG_IPV6_MROUTE): then
# smcrouted programs it; otherwise mroute.py forwards in user space.
kernel_mroute() {
    [[ -e /proc/net/ip_mr_vif && -e /proc/net/ip6_mr_vif ]]
}

lan_down() {
    local p=$1 pid i n
    if pid=$(router_pid "$p"); then
        # SIGKILL: smcrouted takes ~2 s to exit on SIGTERM, and there is nothing to tidy up
        # (closing its mroute socket drops the kernel's VIFs and routes, and the namespace
        # goes next anyway).
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            is_router "$pid" || break
            sleep 0.01
        done
    fi
    # Deleting a namespace removes its veths, and with them their peers.
    for n in h1 h2 h3 h4 r sw; do
        if ns_exists "$p-$n"; then
            ip netns del "$p-$n" 2>/dev/null || true
        fi
    done
    rm -rf "${STATE_ROOT:?}/$p"
}

# The router of LAN $1 (state in $2) where the kernel routes multicast: an smcrouted with
# (*,G) routes both ways for every group range. Returns once it is ready.
start_smcrouted() {
    local p=$1 state=$2 r=$1-r i
    local conf=$state/smcroute.conf g
    {
        echo "# generated by lan.sh for $p"
        echo "phyint eth0 enable"
        echo "phyint eth1 enable"
        for g in $DEFAULT_GROUPS ${LAN_GROUPS:-}; do
            echo "mroute from eth0 group $g to eth1"
            echo "mroute from eth1 group $g to eth0"
        done
    } >"$conf"
    # setsid + redirections: the daemon must not hold the caller's stdout/stderr pipes open.
    setsid ip netns exec "$r" smcrouted -n -N -i "mcchat-$p" -f "$conf" \
        -P "$state/smcrouted.pid" -u "$state/smcroute.sock" -l notice \
        </dev/null >"$state/smcrouted.log" 2>&1 &
    # Ready once smcrouted answers on its socket with every (*,G) rule of the config and the
    # kernel has both VIFs (IPv4 and IPv6): a bounded poll, not a fixed sleep.
    local want_routes got vifs vifs6
    want_routes=$(($(wc -w <<<"$DEFAULT_GROUPS ${LAN_GROUPS:-}") * 2))
    for ((i = 0; i < 500; i++)); do
        got=$(ip netns exec "$r" smcroutectl -u "$state/smcroute.sock" -p -t show routes \
            2>/dev/null | grep -c '^(' || true)
        vifs=$(ip netns exec "$r" awk 'NR > 1 && ($2 == "eth0" || $2 == "eth1")' \
            /proc/net/ip_mr_vif | wc -l)
        vifs6=$(ip netns exec "$r" awk 'NR > 1 && ($2 == "eth0" || $2 == "eth1")' \
            /proc/net/ip6_mr_vif | wc -l)
        ((got >= want_routes && vifs == 2 && vifs6 == 2)) && [[ -s $state/smcrouted.pid ]] && break
        sleep 0.01
    done
    if ((i == 500)); then
        echo "lan.sh: smcrouted in $r did not become ready ($got/$want_routes routes," \
            "$vifs/2 IPv4 and $vifs6/2 IPv6 VIFs); its log:" >&2
        sed 's/^/  /' "$state/smcrouted.log" >&2 || true
        exit 1
    fi
}

# The router of LAN $1 (state in $2) on a kernel without multicast routing: mroute.py, the
# same forwarding (both ways, TTL threshold 1, TTL decremented, source kept) in user space.
# Returns once it has bound both interfaces (it writes its PID file then).
start_mroute() {
    local state=$2 r=$1-r i groups
    read -ra groups <<<"$DEFAULT_GROUPS ${LAN_GROUPS:-}"
    setsid ip netns exec "$r" python3 "$(dirname "${BASH_SOURCE[0]}")/mroute.py" eth0 eth1 \
        "$state/mroute.pid" "${groups[@]}" </dev/null >"$state/mroute.log" 2>&1 &
    local child=$!
    for ((i = 0; i < 1000; i++)); do
        [[ -s $state/mroute.pid ]] && break
        kill -0 "$child" 2>/dev/null || break
        sleep 0.01
    done
    if [[ ! -s $state/mroute.pid ]]; then
        echo "lan.sh: mroute.py in $r did not become ready; its log:" >&2
        sed 's/^/  /' "$state/mroute.log" >&2 || true
        exit 1
    fi
}

lan_up() {
    local p=$1
    if kernel_mroute; then
        need ip smcrouted smcroutectl
    else
        need ip python3
    fi
    [[ -d /run/netns || ! -e /run/netns ]] || die "/run/netns is not a directory"
    local n
    for n in sw h1 h2 h3 h4 r; do
        ns_exists "$p-$n" && die "namespace $p-$n already exists (run: $0 down $p)"
    done
    local state=$STATE_ROOT/$p
    mkdir -p "$state"
    # From here on, a failure tears down whatever was built.
    LAN_BUILDING=$p
    trap 'rc=$?; if ((rc != 0)); then lan_down "$LAN_BUILDING"; fi' EXIT

    local sw=$p-sw r=$p-r
    for n in sw h1 h2 h3 h4 r; do
        add_ns "$p-$n"
        v6_defaults "$p-$n"
    done
    nsysctl "$sw" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1

    # Segment A: the switch.
    ip -n "$sw" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
    ip -n "$sw" link set br0 up
    local i
    for i in 1 2 3; do
        ip -n "$p-h$i" link add eth0 type veth peer name "h$i" netns "$sw"
    done
    ip -n "$r" link add eth0 type veth peer name r netns "$sw"
    for n in h1 h2 h3 r; do
        ip -n "$sw" link set "$n" master br0
        ip -n "$sw" link set "$n" up
    done
    # Segment B: a direct link router <-> h4.
    ip -n "$r" link add eth1 type veth peer name eth0 netns "$p-h4"

    for i in 1 2 3; do
        setup_host "$p-h$i" "198.51.100.$i/24" "2001:db8:a::$i/64" 198.51.100.254 2001:db8:a::254
    done
    setup_host "$p-h4" 203.0.113.4/24 2001:db8:b::4/64 203.0.113.254 2001:db8:b::254

    # The router.
    nsysctl "$r" net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    ip -n "$r" link set eth0 multicast on up
    ip -n "$r" link set eth1 multicast on up
    ip -n "$r" addr add 198.51.100.254/24 dev eth0
    ip -n "$r" addr add 203.0.113.254/24 dev eth1
    ip -n "$r" -6 addr add 2001:db8:a::254/64 dev eth0 nodad
    ip -n "$r" -6 addr add 2001:db8:b::254/64 dev eth1 nodad

    if kernel_mroute; then
        start_smcrouted "$p" "$state"
    else
        start_mroute "$p" "$state"
    fi
    trap - EXIT
}

lan_status() {
    local p=$1 n
    for n in sw h1 h2 h3 h4 r; do
        if ns_exists "$p-$n"; then
            echo "== $p-$n"
            ip -n "$p-$n" -br addr
        else
            echo "== $p-$n (missing)"
        fi
    done
    if ! kernel_mroute && router_pid "$p" >/dev/null; then
        echo "== mroute.py in $p-r (pid $(router_pid "$p")): user-space forwarding"
    elif router_pid "$p" >/dev/null; then
        echo "== smcrouted in $p-r (pid $(router_pid "$p"))"
        ip netns exec "$p-r" smcroutectl -u "$STATE_ROOT/$p/smcroute.sock" -p show routes || true
        echo "-- /proc/net/ip_mr_vif"
        ip netns exec "$p-r" cat /proc/net/ip_mr_vif
        echo "-- /proc/net/ip_mr_cache"
        ip netns exec "$p-r" cat /proc/net/ip_mr_cache
    else
        echo "== smcrouted in $p-r: not running"
    fi
}

# Adds addresses $3... (ADDR/LEN, IPv4 or IPv6) to eth0 of host $2 of LAN $1; returns once
# every one is on the interface and none is tentative.
lan_addr() {
    local p=$1 host=$2 a
    shift 2
    [[ $host =~ ^(h[1-4]|r)$ ]] || die "HOST must be h1, h2, h3, h4 or r, got '$host'"
    local ns=$p-$host
    ns_exists "$ns" || die "namespace $ns does not exist (run: $0 up $p)"
    for a in "$@"; do
        [[ $a == */* ]] || die "address '$a' needs a prefix length (ADDR/LEN)"
        if [[ $a == *:* ]]; then
            ip -n "$ns" -6 addr add "$a" dev eth0 nodad
        else
            ip -n "$ns" addr add "$a" dev eth0
        fi
    done
    # With nodad an address is never tentative: a check, not a wait.
    if ip -n "$ns" -6 -o addr show dev eth0 tentative | grep -q .; then
        die "$ns eth0 has tentative IPv6 addresses: $(ip -n "$ns" -6 -o addr show dev eth0 tentative)"
    fi
}

(($# >= 1)) || usage
cmd=$1
case $cmd in
up | down | status)
    (($# == 2)) || usage
    check_prefix "$2"
    "lan_$cmd" "$2"
    ;;
down-all)
    (($# == 1)) || usage
    if [[ -d $STATE_ROOT ]]; then
        for d in "$STATE_ROOT"/*/; do
            [[ -d $d ]] || continue
            p=$(basename "$d")
            [[ $p =~ ^[A-Za-z0-9]{1,16}$ ]] && lan_down "$p"
        done
    fi
    ;;
addr)
    (($# >= 4)) || usage
    check_prefix "$2"
    lan_addr "$2" "$3" "${@:4}"
    ;;
*) usage ;;
esac
