#!/usr/bin/env bash
# deps.sh — installs the system tools the test suite needs, if any is missing, on Debian or
# Ubuntu: iproute2 (ip, namespaces), smcroute (the multicast router in scripts/lan.sh's LAN),
# python3 (that router in user space, scripts/mroute.py, where the kernel cannot route multicast),
# socat and nftables (tools the tests and docs use), chromium and Node.js (the browser test),
# nats-server and openssl (the tests of several sites, run inside the test namespace),
# then the browser test's npm packages (tests/browser, from its package-lock.json). Called by
# scripts/test.sh and .ci/run, so a fresh machine needs no set-up step of its own. Prints
# nothing when everything is there.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

as_root() {
    if (($(id -u) == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        echo "deps.sh: need root to run: $* (install the packages named above by hand)" >&2
        return 1
    fi
}

missing=()
for c in ip:iproute2 unshare:util-linux smcrouted:smcroute smcroutectl:smcroute python3:python3 socat:socat \
    nft:nftables chromium:chromium node:nodejs npm:npm nats-server:nats-server openssl:openssl; do
    command -v "${c%%:*}" >/dev/null 2>&1 || missing+=("${c#*:}")
done

# The browser test's packages (playwright-core, pinned by the lock file), fetched before the
# tests enter their namespace, which has no route out.
npm_packages() {
    local dir
    dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/browser
    if [[ ! -d $dir/node_modules/playwright-core ]]; then
        echo "deps.sh: installing the browser test's npm packages"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
}
if ! ((${#missing[@]})); then
    npm_packages
    exit 0
fi

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "deps.sh: installing ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: no apt-get here; install ${missing[*]} with your package manager" >&2
    exit 1
fi
# No package may start its service (smcroute ships one) on this machine's real network: a
# policy-rc.d that says no, for the duration of the install.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if ((added_policy)); then
        as_root rm -f "$policy"
    fi
}
trap cleanup EXIT
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
# Nor start at the next boot.
if command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now smcroute.service nats-server.service >/dev/null 2>&1 || true
fi
npm_packages
