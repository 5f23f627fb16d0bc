#!/usr/bin/env python3
"""Speak Ethernet over a vmnet-broker ``dgram`` attachment, as libkrun/krunkit do.

A ``dgram`` attachment is one end of a ``SOCK_DGRAM`` socketpair: every
datagram is one Ethernet frame (behind a 12-byte virtio_net_hdr if the
attachment has ``vnet_hdr``).  This program is the smallest "VM" on such an
fd: it broadcasts a DHCP DISCOVER, prints the OFFER, then ARPs for the
server and prints its MAC.  Standard library only.

Under ``vmnet-broker run`` (the fd is inherited; the connection too):

    vmnet-broker run --network shared --kind dgram -- \\
        python3 examples/dgram_client.py --fd {fd} --mac {mac}

or on its own, with the client library (it holds the connection itself):

    python3 examples/dgram_client.py --network shared

Prints, for example:

    DHCPOFFER 192.168.105.23 mask 255.255.255.0 from 192.168.105.1 (router 192.168.105.1, dns 192.168.105.1, lease 3600 s) after 4 ms
    ARP 192.168.105.1 is at 6e:0b:3c:b2:f0:42 after 1 ms

Exit status 0 when both answers came, 1 otherwise.  The DHCP exchange stops
at the offer: no address is leased.

Tested with: a broker on Debian 12 (dnsmasq 2.89), both ways above, by
tests/test_e2e_run.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import select
import socket
import struct
import sys
import time

BROADCAST = b"\xff" * 6
ETH_IPV4, ETH_ARP = 0x0800, 0x0806
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_DISCOVER, DHCP_OFFER = 1, 2
VNET_HDR = bytes(12)  # virtio_net_hdr_v1, all zero: no offload asked or given


def mac_bytes(mac: str) -> bytes:
    return bytes(int(octet, 16) for octet in mac.split(":"))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def dhcp_discover(mac: bytes, xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000,
                        bytes(4), bytes(4), bytes(4), bytes(4), mac, b"", b"")  # fmt: skip
    options = DHCP_MAGIC + bytes([53, 1, DHCP_DISCOVER, 55, 4, 1, 3, 6, 51, 255])
    payload = bootp + options
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload  # UDP checksum 0: none
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     bytes(4), b"\xff" * 4)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return BROADCAST + mac + struct.pack("!H", ETH_IPV4) + ip + udp


def parse_offer(frame: bytes, xid: int) -> dict | None:
    """The OFFER for ``xid`` in an Ethernet frame, or None."""
    if len(frame) < 14 + 20 + 8 + 240 or struct.unpack("!H", frame[12:14])[0] != ETH_IPV4:
        return None
    ip = frame[14:]
    header_len = (ip[0] & 0x0F) * 4
    if ip[9] != socket.IPPROTO_UDP:
        return None
    udp = ip[header_len:]
    if struct.unpack("!H", udp[2:4])[0] != 68:
        return None
    bootp = udp[8:]
    if bootp[0] != 2 or struct.unpack("!I", bootp[4:8])[0] != xid or bootp[236:240] != DHCP_MAGIC:
        return None
    offer = {"address": str(ipaddress.IPv4Address(bootp[16:20]))}
    options, i = bootp[240:], 0
    while i < len(options) and options[i] != 255:
        if options[i] == 0:
            i += 1
            continue
        code, length = options[i], options[i + 1]
        value = options[i + 2 : i + 2 + length]
        i += 2 + length
        if code == 53:
            offer["type"] = value[0]
        elif code in (1, 3, 54) and length >= 4:
            offer[{1: "mask", 3: "router", 54: "server"}[code]] = str(ipaddress.IPv4Address(value[:4]))
        elif code == 6 and length >= 4:
            offer["dns"] = str(ipaddress.IPv4Address(value[:4]))
        elif code == 51 and length == 4:
            offer["lease"] = struct.unpack("!I", value)[0]
    return offer if offer.get("type") == DHCP_OFFER else None


def arp_probe(mac: bytes, target: str) -> bytes:
    # Sender address 0.0.0.0 (an ARP probe): asks without claiming any address.
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 1, mac, bytes(4), bytes(6),
                      ipaddress.IPv4Address(target).packed)  # fmt: skip
    return BROADCAST + mac + struct.pack("!H", ETH_ARP) + arp


def parse_arp_reply(frame: bytes, target: str) -> str | None:
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_ARP:
        return None
    op, sender_mac, sender_ip = struct.unpack("!6xH6s4s10x", frame[14:42])
    if op == 2 and sender_ip == ipaddress.IPv4Address(target).packed:
        return mac_text(sender_mac)
    return None


class Link:
    """The dgram fd: one frame per datagram, with or without a vnet header."""

    def __init__(self, fd: int, vnet_hdr: bool) -> None:
        self.sock = socket.socket(fileno=fd)
        if self.sock.type != socket.SOCK_DGRAM:
            raise SystemExit(f"fd {fd} is a {self.sock.type!r}, not a datagram socket: use a --kind dgram attachment")
        self.header = VNET_HDR if vnet_hdr else b""

    def send(self, frame: bytes) -> None:
        self.sock.send(self.header + frame)

    def exchange(self, frame: bytes, parse, timeout: float, retry: float = 1.0):  # noqa: ANN001
        """Send ``frame`` (again every ``retry`` s) until ``parse`` accepts a reply."""
        started = time.monotonic()
        deadline = started + timeout
        next_send = started
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None, now - started
            if now >= next_send:
                self.send(frame)
                next_send = now + retry
            ready, _, _ = select.select([self.sock], [], [], min(deadline, next_send) - now)
            if ready:
                data = self.sock.recv(65536 + len(self.header))
                result = parse(data[len(self.header) :])
                if result is not None:
                    return result, time.monotonic() - started


def talk(link: Link, mac: str, timeout: float) -> int:
    own = mac_bytes(mac)
    xid = int.from_bytes(os.urandom(4), "big")
    offer, took = link.exchange(dhcp_discover(own, xid), lambda f: parse_offer(f, xid), timeout)
    if offer is None:
        print(f"no DHCP offer within {timeout:g} s", file=sys.stderr)
        return 1
    server = offer.get("server", "?")
    print(
        f"DHCPOFFER {offer['address']} mask {offer.get('mask', '?')} from {server} "
        f"(router {offer.get('router', 'none')}, dns {offer.get('dns', 'none')}, "
        f"lease {offer.get('lease', '?')} s) after {took * 1000:.0f} ms",
        flush=True,
    )
    if server == "?":
        return 1
    answer, took = link.exchange(arp_probe(own, server), lambda f: parse_arp_reply(f, server), timeout)
    if answer is None:
        print(f"no ARP reply from {server} within {timeout:g} s", file=sys.stderr)
        return 1
    print(f"ARP {server} is at {answer} after {took * 1000:.0f} ms", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fd", type=int, help="an inherited dgram attachment fd (vmnet-broker run's {fd})")
    source.add_argument("--network", help="attach to this broker network with the client library")
    parser.add_argument("--mac", help="the guest MAC ({mac}); required with --fd")
    parser.add_argument("--vnet-hdr", action="store_true", help="the attachment has vnet_hdr (with --fd)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    args = parser.parse_args()

    if args.fd is not None:
        if not args.mac:
            parser.error("--fd needs --mac (vmnet-broker run's {mac})")
        return talk(Link(args.fd, args.vnet_hdr), args.mac, args.timeout)

    import vmnet_broker

    with vmnet_broker.Client() as client:
        iface = client.attach(args.network, kind="dgram", mac=args.mac)
        print(f"attached {iface.name} on {args.network!r}, mac {iface.mac}", flush=True)
        return talk(Link(iface.fds[0], iface.vnet_hdr), iface.mac, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
