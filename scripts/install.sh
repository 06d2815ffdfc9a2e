#!/usr/bin/env bash
# install.sh — builds mcchat and mcchatd and installs them with the systemd unit and the rooms
# file. Run as root (or with sudo) from a checkout:
#
#   scripts/install.sh                 build (release) and install under /usr/local
#   scripts/install.sh --no-build      install binaries already in target/release
#   DESTDIR=/tmp/stage scripts/install.sh   stage into a directory (for packaging)
#   BIN_DIR=target/debug scripts/install.sh --no-build   install other builds (tests do)
#
# It never overwrites an existing /etc/mcchat/rooms.toml (the shipped one is installed next to
# it as rooms.toml.dist), and it does not start the service: `systemctl enable --now mcchatd`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
build=1
for arg in "$@"; do
    case $arg in
        --no-build) build=0 ;;
        -h | --help)
            sed -n '2,11p' "$0"
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument '$arg' (see --help)" >&2
            exit 2
            ;;
    esac
done

if ((build)); then
    cargo build --release --locked -p mcchat -p mcchatd
fi
BIN_DIR=${BIN_DIR:-target/release}
for b in mcchat mcchatd; do
    [[ -x $BIN_DIR/$b ]] || {
        echo "install.sh: $BIN_DIR/$b is missing; run without --no-build" >&2
        exit 1
    }
done

bin=$DESTDIR$PREFIX/bin
install -d "$bin" "$DESTDIR/etc/mcchat" "$DESTDIR/etc/systemd/system" \
    "$DESTDIR$PREFIX/share/man/man1" "$DESTDIR$PREFIX/share/doc/mcchat" \
    "$DESTDIR$PREFIX/share/bash-completion/completions"
install -m 0755 "$BIN_DIR/mcchat" "$BIN_DIR/mcchatd" "$bin/"
sed "s#/usr/local/bin/#$PREFIX/bin/#" scripts/mcchatd.service >"$DESTDIR/etc/systemd/system/mcchatd.service"
chmod 0644 "$DESTDIR/etc/systemd/system/mcchatd.service"
if [[ -e $DESTDIR/etc/mcchat/rooms.toml ]]; then
    install -m 0644 rooms.toml "$DESTDIR/etc/mcchat/rooms.toml.dist"
    echo "install.sh: kept the existing /etc/mcchat/rooms.toml (shipped copy: rooms.toml.dist)"
else
    install -m 0644 rooms.toml "$DESTDIR/etc/mcchat/rooms.toml"
fi
"$BIN_DIR/mcchat" man >"$DESTDIR$PREFIX/share/man/man1/mcchat.1"
"$BIN_DIR/mcchat" completions bash >"$DESTDIR$PREFIX/share/bash-completion/completions/mcchat"
install -m 0644 README.md docs/PROTOCOL.md "$DESTDIR$PREFIX/share/doc/mcchat/"
# Check what was installed before anyone starts it.
"$bin/mcchatd" --rooms "$DESTDIR/etc/mcchat/rooms.toml" --check-config >/dev/null

if [[ -z $DESTDIR ]] && command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "installed; start the relay with: systemctl enable --now mcchatd"
else
    echo "installed into ${DESTDIR:-/}"
fi
