"""Choices the broker remembers across restarts, per network name.

Guests hate being renumbered: a network gets the same IPv4 subnet and IPv6
prefix after a broker restart unless they now collide.  One small JSON file
in the state directory, rewritten atomically, never through a symlink.

What the file says is checked like config: a remembered subnet is used only
if it is a private (RFC 1918) /24, as the broker chooses them, and a
remembered IPv6 prefix only if it is a unique local (``fd00::/8``) /64;
anything else is logged and a new one chosen.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Any

from ... import files
from .subnets import is_private_24

log = logging.getLogger(__name__)

FILE = "networks.json"
MAX_FILE = 1024 * 1024  # a few dozen bytes per network
_ULA = ipaddress.IPv6Network("fd00::/8")


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one; no symlink is followed."""
    path = Path(path)
    with files.open_directory(path.parent) as dir_fd:
        files.write_atomically(dir_fd, path.name, text.encode())


def random_ula_prefix() -> ipaddress.IPv6Network:
    """A /64 in a random RFC 4193 ULA /48 (``fd`` + 40 random bits), subnet 0."""
    global_id = int.from_bytes(os.urandom(5), "big")
    return ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 64))


def is_ula_64(prefix: ipaddress.IPv6Network) -> bool:
    return prefix.prefixlen == 64 and prefix.subnet_of(_ULA)


class RememberedChoices:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(files.read_regular(self.path, MAX_FILE))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def _entry(self, name: str, key: str) -> str | None:
        value = self._load().get(name, {}).get(key)
        return value if isinstance(value, str) else None

    def subnet(self, name: str) -> ipaddress.IPv4Network | None:
        """The subnet last used for ``name``, if it is one the broker could have chosen."""
        text = self._entry(name, "subnet")
        if text is None:
            return None
        try:
            subnet = ipaddress.IPv4Network(text)
        except ValueError:
            subnet = None
        if subnet is None or not is_private_24(subnet):
            log.warning("network %r: remembered subnet %r in %s is not a private (RFC 1918) /24; choosing another",
                        name, text, self.path)  # fmt: skip
            return None
        return subnet

    def ipv6_prefix(self, name: str) -> ipaddress.IPv6Network | None:
        """The IPv6 prefix last used for ``name``, if it is a unique local /64."""
        text = self._entry(name, "ipv6_prefix")
        if text is None:
            return None
        try:
            prefix = ipaddress.IPv6Network(text)
        except ValueError:
            prefix = None
        if prefix is None or prefix.network_address.scope_id is not None or not is_ula_64(prefix):
            log.warning("network %r: remembered IPv6 prefix %r in %s is not a unique local /64 (fd00::/8); "
                        "choosing another", name, text, self.path)  # fmt: skip
            return None
        return prefix

    def remember(self, name: str, **choices: object) -> None:
        data = self._load()
        entry = {k: str(v) for k, v in choices.items() if v is not None}
        if data.get(name) == entry:
            return
        data[name] = entry
        write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
