"""Test hosts for the network-services tests: an "internet", its servers, peers.

Everything lives in namespaces the tests made; the internet is a namespace
joined to the broker's by a veth pair, with documentation addresses
(203.0.113.0/24, 2001:db8::/64) that route nowhere else.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from vmnet_broker.sandbox import Namespace

UPLINK, INTERNET = "203.0.113.1", "203.0.113.2"
UPLINK6, INTERNET6 = "2001:db8::1", "2001:db8::2"
REPO = Path(__file__).resolve().parent.parent

# TCP and UDP servers that answer with the peer's address, and their clients.
PEER = textwrap.dedent(
    """
    import socket, sys
    mode = sys.argv[1]
    if mode in ("serve", "userve"):
        kind = socket.SOCK_STREAM if mode == "serve" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", int(sys.argv[2])))
        if kind == socket.SOCK_STREAM:
            s.listen()
        print("ready", flush=True)
        while True:
            if kind == socket.SOCK_STREAM:
                c, addr = s.accept()
                c.sendall(addr[0].removeprefix("::ffff:").encode())
                c.close()
            else:
                data, addr = s.recvfrom(100)
                s.sendto(addr[0].removeprefix("::ffff:").encode(), addr)
    host, port, timeout = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    try:
        if mode == "connect":
            c = socket.create_connection((host, port), timeout=timeout)
            print(c.recv(100).decode())
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            c = socket.socket(family, socket.SOCK_DGRAM)
            c.settimeout(timeout)
            c.sendto(b"hello", (host, port))
            print(c.recv(100).decode())
    except OSError as e:
        print("FAIL", e)
    """
)


def python(ns: Namespace, code: str, *args: str, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-c", code, *args]
    if popen:
        return ns.popen(cmd, text=True, **popen)
    return ns.run(*cmd, timeout=30)


def serve(ns: Namespace, port: int, udp: bool = False) -> subprocess.Popen:
    """A TCP (or UDP) server answering with the peer's address; killed with ns."""
    proc = python(ns, PEER, "userve" if udp else "serve", str(port), stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def connect(ns: Namespace, host: str, port: int, timeout: float = 2, udp: bool = False) -> str:
    """The address the server saw us as, or ``FAIL ...``."""
    return python(ns, PEER, "uconnect" if udp else "connect", host, str(port), str(timeout)).stdout.strip()


def make_internet(broker_ns: Namespace, internet_ns: Namespace) -> None:
    """Join the broker's namespace to an "internet" with a default route into it."""
    broker_ns.ip("link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", internet_ns.name)
    for ns, v4, v6 in ((broker_ns, UPLINK, UPLINK6), (internet_ns, INTERNET, INTERNET6)):
        ns.ip("addr", "add", f"{v4}/24", "dev", "up0")
        ns.ip("addr", "add", f"{v6}/64", "dev", "up0", "nodad")
        ns.ip("link", "set", "up0", "up")
    broker_ns.ip("route", "add", "default", "via", INTERNET)
    broker_ns.ip("-6", "route", "add", "default", "via", INTERNET6)


def start_dns(ns: Namespace, address: str, records: dict[str, str]) -> subprocess.Popen:
    """A DNS server of the internet's own: dnsmasq answering ``records`` only."""
    cmd = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={address}", "--pid-file=", "--user=nobody",
    ] + [f"--address=/{name}/{ip}" for name, ip in records.items()]  # fmt: skip
    return ns.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
