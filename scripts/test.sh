#!/usr/bin/env bash
# test.sh — builds the workspace, then runs its tests inside a private network namespace.
#
# Usage: scripts/test.sh [ARGS...]   ARGS go to `cargo nextest run` (or `cargo test`), e.g. a
#                                    test name filter.
#
# Every socket a test opens lives in a fresh network namespace that has only `lo`, so no test
# can send a packet onto the machine's real network. Inside it:
#   - lo is up with multicast routes: 224.0.0.0/4 dev lo (IPv4) and `local ff00::/8 dev lo
#     table local` (IPv6: a plain unicast-type ff00::/8 route on lo fails neighbour
#     resolution and the datagram is dropped as Ip6OutNoRoutes; the `local` type delivers it).
#   - /sys is remounted, so /sys/class/net shows this namespace (only lo), not the host's.
#   - /run/netns and /run/mcchat-lan are private tmpfs mounts: the namespaces that
#     scripts/lan.sh builds for integration tests exist only for this run, and parallel runs
#     cannot collide.
#   - a private PID namespace: when the run ends, every process it started (e.g. an
#     smcrouted a test forgot to stop) ends with it.
#   - MCCHAT_TEST_NETNS=1 (the tests open sockets only when it is set and lo is the only
#     interface) and MCCHAT_LAN_SCRIPT=<this repo>/scripts/lan.sh are exported.
# As root it uses `unshare --net --mount --pid`; otherwise it adds `--user --map-root-user`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
self=$root/scripts/test.sh

have_nextest() {
    command -v cargo-nextest >/dev/null 2>&1
}

only_lo() {
    # Netlink's view: the authoritative list of this namespace's interfaces.
    local links
    links=$(ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | sort | tr '\n' ' ')
    [[ $links == "lo " ]]
}

inner() {
    # Refuse to touch anything unless this really is a new network namespace with only lo.
    local netns
    netns=$(stat -L -c %i /proc/self/ns/net)
    if [[ $netns == "${MCCHAT_TEST_OUTER_NETNS:-}" ]] || ! only_lo; then
        echo "test.sh: not in a fresh network namespace with only lo; refusing to run" >&2
        exit 1
    fi

    # A sysfs of this namespace, so /sys/class/net lists only lo.
    mount -t sysfs sysfs /sys
    # Private places for `ip netns` (lan.sh) and lan.sh's state. A non-root user (root only
    # inside its user namespace) cannot create directories in /run: then a tmpfs over all of
    # /run instead.
    if mkdir -p /run/netns /run/mcchat-lan 2>/dev/null &&
        mount -t tmpfs -o mode=0755 netns /run/netns 2>/dev/null &&
        mount -t tmpfs -o mode=0755 mcchat-lan /run/mcchat-lan 2>/dev/null; then
        :
    else
        mount -t tmpfs -o mode=0755 run /run
        mkdir -p /run/netns /run/mcchat-lan
    fi

    ip link set lo up
    ip link set lo multicast on
    ip route add 224.0.0.0/4 dev lo src 127.0.0.1
    sysctl -qw net.ipv6.conf.lo.disable_ipv6=0 >/dev/null
    ip -6 route add local ff00::/8 dev lo table local

    local entries
    entries=$(ls /sys/class/net | tr '\n' ' ')
    if [[ $entries != "lo " ]] || ! only_lo; then
        echo "test.sh: the test namespace has interfaces other than lo ($entries); aborting" >&2
        exit 1
    fi

    export MCCHAT_TEST_NETNS=1
    export MCCHAT_LAN_SCRIPT=$root/scripts/lan.sh
    # Whatever a test's mcchatd writes by default (history) stays out of the user's home.
    XDG_STATE_HOME=$(mktemp -d)
    export XDG_STATE_HOME
    unset STATE_DIRECTORY
    # Tear down any LAN a test left behind (the PID namespace would end its smcrouted anyway).
    trap '"$MCCHAT_LAN_SCRIPT" down-all >/dev/null 2>&1 || true; rm -rf "$XDG_STATE_HOME"' EXIT

    local rc=0
    if have_nextest; then
        # nextest does not run doc tests, so they go first (and nextest's summary stays the
        # last word). With extra ARGS (a filter, nextest options) they are left out, since
        # `cargo test` would not understand nextest's options.
        if (($# == 0)); then
            cargo test --doc --workspace --locked --offline || rc=$?
        else
            echo "test.sh: extra arguments given; doc tests skipped (run scripts/test.sh alone)"
        fi
        cargo nextest run --workspace --locked --offline "$@" || rc=$((rc ? rc : $?))
    else
        cargo test --workspace --locked --offline "$@" || rc=$?
    fi
    return "$rc"
}

if [[ ${1:-} == --inner ]]; then
    shift
    inner "$@"
    exit $?
fi

# System tools (iproute2, smcroute, ...): installed here if missing, so this one command is
# all a fresh machine needs.
"$root/scripts/deps.sh"

# Compile while the network is available: fetching needs it, and compiling opens no sockets.
cargo fetch --locked
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-run

if (($(id -u) == 0)); then
    ns=(unshare --net --mount --pid --fork --mount-proc --propagation private)
else
    ns=(unshare --user --map-root-user --net --mount --pid --fork --mount-proc
        --propagation private)
fi
if ! err=$("${ns[@]}" true 2>&1); then
    echo "test.sh: cannot create a private network namespace ('${ns[*]}' failed: ${err//$'\n'/ }):" \
        "run as root (sudo scripts/test.sh) or allow unprivileged user namespaces" \
        "(sysctl kernel.unprivileged_userns_clone=1 / kernel.apparmor_restrict_unprivileged_userns=0)" >&2
    exit 1
fi
MCCHAT_TEST_OUTER_NETNS=$(stat -L -c %i /proc/self/ns/net)
export MCCHAT_TEST_OUTER_NETNS
exec "${ns[@]}" bash "$self" --inner "$@"
