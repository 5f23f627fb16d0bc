"""Choices the broker remembers across restarts, per network name.

Guests hate being renumbered: a network gets the same IPv4 subnet and IPv6
prefix after a broker restart unless they now collide.  One small JSON file
in the state directory, rewritten atomically.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def random_ula_prefix() -> ipaddress.IPv6Network:
    """A /64 in a random RFC 4193 ULA /48 (``fd`` + 40 random bits), subnet 0."""
    global_id = int.from_bytes(os.urandom(5), "big")
    return ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 64))


class RememberedChoices:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "networks.json"

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def subnet(self, name: str) -> ipaddress.IPv4Network | None:
        try:
            return ipaddress.IPv4Network(self._load()[name]["subnet"])
        except (KeyError, ValueError, TypeError):
            return None

    def ipv6_prefix(self, name: str) -> ipaddress.IPv6Network | None:
        try:
            return ipaddress.IPv6Network(self._load()[name]["ipv6_prefix"])
        except (KeyError, ValueError, TypeError):
            return None

    def remember(self, name: str, **choices: object) -> None:
        data = self._load()
        entry = {k: str(v) for k, v in choices.items() if v is not None}
        if data.get(name) == entry:
            return
        data[name] = entry
        write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
