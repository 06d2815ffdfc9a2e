#!/usr/bin/env bash
# bench.sh — measures mcchat side by side with node-relay.js and the kernel's own multicast
# path (and mcchatd's WebSocket gateway beside node-ws-rooms.js), in one run, inside a private network namespace (only lo; nothing leaves the machine).
#
# Usage: scripts/bench.sh [--quick]
#   --quick   a smoke pass of a few seconds (CI runs it so the benchmarks cannot rot)
#   MCBENCH_ONLY=relay|cpu|fanout|websocket|wslatency|sites   one part alone (relay: throughput,
#             latency and CPU of mcchatd, node-relay.js and the kernel path; cpu: the CPU trials
#             alone, 5 s each, with each thread's share; wslatency: the WebSocket trials at
#             1,000 msg/s alone, five of each server), while working on it
#
# Prints one table (each figure for mcchat, node-relay.js and the kernel, with ratios) and
# writes it as JSON to target/bench/results.json. Method and a real run: docs/PERFORMANCE.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
quick=()
for arg in "$@"; do
    case $arg in
        --quick) quick=(--quick) ;;
        --inner) ;;
        *)
            echo "bench.sh: unknown argument '$arg' (see the header of this script)" >&2
            exit 2
            ;;
    esac
done

if [[ ${1:-} == --inner || ${2:-} == --inner ]]; then
    ip link set lo up
    ip link set lo multicast on
    ip route add 224.0.0.0/4 dev lo src 127.0.0.1
    exec target/bench/bin/mcbench "${quick[@]}" \
        --mcchatd target/bench/bin/mcchatd --mcchat target/bench/bin/mcchat \
        --peers "$root/../shared/peers" --criterion target/criterion \
        --out target/bench/results.json
fi

"$root/scripts/deps.sh"
# The binaries measured are copied out of the build's directory at once: criterion's `cargo
# bench` below builds mcchatd again with the bench profile (thin LTO), and cargo puts that
# build in target/release too, over the shipped (release) one.
if ((${#quick[@]})); then
    # A smoke pass measures nothing, so it builds with the dev profile: the test build (CI
    # runs the tests next) shares its dependencies, and no optimised build is linked at all.
    profile=dev
    built=target/debug
    bench_profile=(--profile dev)
    times=(--warm-up-time 0.1 --measurement-time 0.3)
else
    profile=release
    built=target/release
    bench_profile=()
    times=(--warm-up-time 1 --measurement-time 3)
fi
cargo build --profile "$profile" --locked -p mcchat -p mcchatd -p mcchat-bench
mkdir -p target/bench/bin
cp -f "$built/mcchat" "$built/mcchatd" "$built/mcbench" target/bench/bin/
# Criterion micro-benchmarks (no sockets): the codec, the presence flood on one peer engine
# (injected time), and history writes (to a temp dir). The smoke pass builds them with the
# dev profile too.
cargo bench --locked "${bench_profile[@]}" -p mcchat-core --bench codec -- "${times[@]}" >/dev/null
cargo bench --locked "${bench_profile[@]}" -p mcchat-core --bench flood -- "${times[@]}" >/dev/null
cargo bench --locked "${bench_profile[@]}" -p mcchatd --bench history -- "${times[@]}" >/dev/null
if ! command -v node >/dev/null 2>&1; then
    echo "bench.sh: Node.js not found: node-relay.js is left out; mcchat and the kernel are still measured"
elif [[ -f $root/../shared/peers/package-lock.json && ! -d $root/../shared/peers/node_modules/ws ]]; then
    # node-ws-rooms.js's one package, fetched before the namespace (which has no route out).
    (cd "$root/../shared/peers" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) ||
        echo "bench.sh: npm ci failed in shared/peers: node-ws-rooms.js is left out"
fi
mkdir -p target/bench
if (($(id -u) == 0)); then
    ns=(unshare --net)
else
    ns=(unshare --user --map-root-user --net)
fi
"${ns[@]}" bash "$root/scripts/bench.sh" "${quick[@]}" --inner
