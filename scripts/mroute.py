#!/usr/bin/env python3
"""mroute.py: a user-space multicast router between two interfaces, for scripts/lan.sh.

Usage: mroute.py IF_A IF_B PIDFILE GROUP[/LEN]...

lan.sh's router forwards multicast with smcrouted where the kernel has multicast routing
(CONFIG_IP_MROUTE, CONFIG_IPV6_MROUTE). Some kernels are built without it (no
/proc/net/ip_mr_vif), and there this does the same job, with the kernel's rules:

- an IPv4 or IPv6 datagram to a group in one of GROUP[/LEN] that arrives on one interface
  is sent out of the other one, its source address unchanged;
- only if its TTL (hop limit) is above the interfaces' threshold of 1, as a VIF's default
  threshold in the kernel; the copy goes out with it one lower (IPv4: header checksum
  recomputed; IPv6 has none);
- never link-local groups (224.0.0.0/24, ffx2::/16), never what this process sent itself
  (PACKET_OUTGOING), never unicast.

It reads and writes whole IP packets on AF_PACKET sockets (cooked: no Ethernet header), and
asks each interface for all multicast frames (PACKET_MR_ALLMULTI), so no group has to be
joined. It writes its PID to PIDFILE once both sockets are bound: lan.sh's readiness signal.
It runs until killed. Each wake-up drains at most 256 packets per interface, so neither
direction can starve the other.
"""

import ipaddress
import os
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_ALLMULTI = 2
PACKET_MULTICAST = 2
THRESHOLD = 1
BATCH = 256


def open_interface(name):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((name, ETH_P_ALL))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(name), PACKET_MR_ALLMULTI, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    return sock


def parse_groups(args):
    """(version, network as int, mask as int) for each GROUP[/LEN]."""
    groups = []
    for arg in args:
        net = ipaddress.ip_network(arg, strict=False)
        if not net.is_multicast:
            sys.exit(f"mroute.py: {arg} is not a multicast range")
        bits = net.max_prefixlen
        mask = ((1 << net.prefixlen) - 1) << (bits - net.prefixlen)
        groups.append((net.version, int(net.network_address), mask))
    return groups


def checksum(data):
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fix_udp_checksum(out, pseudo, start):
    """Recomputes the checksum of the whole UDP datagram at out[start:].

    A datagram sent on a veth is handed over with its checksum left to "hardware"
    (CHECKSUM_PARTIAL: only the pseudo-header's sum is in the field), and a packet socket
    sees it so; sent on as read, the receiver would drop it as corrupt.
    """
    if len(out) - start < 8:
        return
    out[start + 6 : start + 8] = b"\0\0"
    total = checksum(pseudo + bytes(out[start:])) or 0xFFFF
    out[start + 6 : start + 8] = struct.pack("!H", total)


def forwarded(packet, groups):
    """The copy to send on, with its TTL one lower, or None; and the frame's EtherType."""
    if len(packet) < 20:
        return None, 0
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            return None, 0
        dst = int.from_bytes(packet[16:20], "big")
        ttl = packet[8]
        if dst >> 28 != 0xE or dst >> 8 == 0xE00000 or ttl <= THRESHOLD:
            return None, 0
        if not any(v == 4 and dst & m == n for v, n, m in groups):
            return None, 0
        out = bytearray(packet)
        out[8] = ttl - 1
        out[10:12] = b"\0\0"
        out[10:12] = struct.pack("!H", checksum(bytes(out[:ihl])))
        # A whole UDP datagram (not a fragment: those had their checksum computed whole)
        # that has a checksum (IPv4's may be 0: none).
        whole = int.from_bytes(packet[6:8], "big") & 0x3FFF == 0
        if packet[9] == 17 and whole and packet[ihl + 6 : ihl + 8] != b"\0\0":
            length = len(packet) - ihl
            pseudo = packet[12:20] + bytes([0, 17]) + struct.pack("!H", length)
            fix_udp_checksum(out, pseudo, ihl)
        return bytes(out), ETH_P_IP
    if version == 6 and len(packet) >= 40:
        dst = int.from_bytes(packet[24:40], "big")
        hops = packet[7]
        scope = (dst >> 112) & 0x0F
        if dst >> 120 != 0xFF or scope <= 2 or hops <= THRESHOLD:
            return None, 0
        if not any(v == 6 and dst & m == n for v, n, m in groups):
            return None, 0
        out = bytearray(packet)
        out[7] = hops - 1
        if packet[6] == 17:
            length = len(packet) - 40
            pseudo = packet[8:40] + struct.pack("!I", length) + bytes([0, 0, 0, 17])
            fix_udp_checksum(out, pseudo, 40)
        return bytes(out), ETH_P_IPV6
    return None, 0


def destination_mac(packet, ethertype):
    """The Ethernet group address of the packet's IP group (RFC 1112, RFC 2464)."""
    if ethertype == ETH_P_IP:
        return bytes([0x01, 0x00, 0x5E, packet[17] & 0x7F, packet[18], packet[19]])
    return bytes([0x33, 0x33]) + packet[36:40]


def main():
    if len(sys.argv) < 5:
        sys.exit("usage: mroute.py IF_A IF_B PIDFILE GROUP[/LEN]...")
    names = sys.argv[1:3]
    pidfile = sys.argv[3]
    groups = parse_groups(sys.argv[4:])
    socks = [open_interface(n) for n in names]
    # Atomically, so a reader never sees a half-written PID.
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)
    other = {socks[0].fileno(): (socks[1], names[1]), socks[1].fileno(): (socks[0], names[0])}
    while True:
        ready, _, _ = select.select(socks, [], [])
        for sock in ready:
            out_sock, out_name = other[sock.fileno()]
            for _ in range(BATCH):
                try:
                    packet, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] != PACKET_MULTICAST:
                    continue
                copy, ethertype = forwarded(packet, groups)
                if copy is None:
                    continue
                try:
                    out_sock.sendto(
                        copy, (out_name, ethertype, 0, 0, destination_mac(copy, ethertype))
                    )
                except OSError:
                    # A full transmit queue: dropped, as a router under load drops.
                    pass


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
