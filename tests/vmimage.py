"""A guest kernel and initramfs for real-VM tests, built from Debian packages only.

``ensure_image()`` returns an ``Image`` (kernel, initrd) from the cache,
building it first if needed:

- the kernel is the package ``linux-image-cloud-amd64`` depends on (resolved
  with ``apt-cache depends``, never hard-coded): LZ4-compressed, fast to boot
  under TCG;
- ``busybox-static`` gives the userland (applet links for every applet);
- ``iperf3`` and the shared libraries it needs (found with ``ldd`` in the
  unpacked ``lib*`` packages it depends on, dynamic loader included);
- the virtio-net modules, in dependency order read from each module's
  ``.modinfo`` (failover, net_failover, virtio_ring, virtio,
  virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, virtio_net);
- ``/init``: mounts proc, sys, devtmpfs, loads the modules, brings up ``lo``
  and ``eth0``, then runs the agent: a non-interactive command loop on the
  first serial port (``ttyS0``; the kernel console is ``ttyS1``).

Packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``: nothing is installed on the host.  The cpio archive is
written here in Python (newc, gzip), so neither root nor ``cpio`` is needed
for it.

The cache directory is ``$VMB_VM_CACHE`` or ``~/.cache/vmnet-broker-vm``;
an image is keyed by the package versions and the guest scripts below, built
in a temporary directory and renamed into place under a file lock, so
concurrent test runs build it once.

Agent protocol (``tests/qemu.py`` speaks it): the agent prints ``@@READY``,
then reads lines ``C <base64 chunk>`` (accumulated script text) and
``X <id> <timeout>`` (run the accumulated script with ``sh`` under
``timeout -s KILL``, stdin ``/dev/null``, stdout and stderr captured) and
answers ``@@B <id>``, the output as base64 lines, ``@@E <id> <status>``.
``P`` powers the guest off.  ``python -m tests.vmimage`` builds and prints
the image.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1  # bump when the layout of the archive changes
KERNEL_META = "linux-image-cloud-amd64"
USERLAND = ("busybox-static", "iperf3")
# The modules whose dependency closure we load, in this order of roots.
MODULE_ROOTS = ("virtio_pci", "virtio_net")
MULTIARCH = "x86_64-linux-gnu"
DOWNLOAD_TIMEOUT = 600
LOCK_TIMEOUT = 900


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    directory: Path
    kernel: Path
    initrd: Path
    manifest: dict

    @property
    def kernel_release(self) -> str:
        return self.manifest["kernel_release"]


def cache_root() -> Path:
    env = os.environ.get("VMB_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmnet-broker-vm"


# -- the guest's scripts ----------------------------------------------------------

INIT = r"""#!/bin/sh
# vmnet-broker test guest: PID 1.  Messages go to /dev/console (ttyS1).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /var/run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "vmb-init: insmod $mod failed"
done < /etc/vmb/modules
ip link set lo up
name=$(sed -n 's/.*vmb\.hostname=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$name" ] && hostname "$name"
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 200 ]; do usleep 50000; n=$((n + 1)); done
ip link set eth0 up || echo "vmb-init: no eth0"
echo "vmb-init: network up at $(cut -d' ' -f1 /proc/uptime) s"
/sbin/vmb-agent
echo "vmb-init: agent exited ($?), powering off"
poweroff -f
"""

AGENT = r"""#!/bin/sh
# Command loop on ttyS0; see tests/vmimage.py for the protocol.
tty=/dev/ttyS0
stty -F "$tty" raw -echo
exec 0<"$tty" 1>"$tty" 2>/dev/console
cd /tmp
buf=/tmp/.vmb-cmd
rm -f "$buf"
echo
echo "@@READY"
while read -r kind arg rest; do
    case "$kind" in
        C) echo "$arg" >> "$buf" ;;
        X)
            id=$arg
            t=${rest:-60}
            base64 -d "$buf" > "/tmp/.vmb-$id.sh" 2>/dev/null
            rm -f "$buf"
            timeout -s KILL "$t" sh "/tmp/.vmb-$id.sh" < /dev/null > "/tmp/.vmb-$id.out" 2>&1
            rc=$?
            echo "@@B $id"
            base64 "/tmp/.vmb-$id.out"
            echo "@@E $id $rc"
            rm -f "/tmp/.vmb-$id.sh" "/tmp/.vmb-$id.out"
            ;;
        P) poweroff -f ;;
        "") ;;
        *) echo "@@? $kind" ;;
    esac
done
"""

# udhcpc calls this with the lease in its environment (busybox's contract).
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi
        : > /etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf; done
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        echo "lease ip=$ip|subnet=$subnet|mask=$mask|router=$router|dns=$dns|domain=$domain|lease=$lease|mtu=$mtu"
        ;;
esac
"""

ETC = {
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/nsswitch.conf": "hosts: files dns\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/resolv.conf": "",
}


# -- apt ----------------------------------------------------------------------------


def _run(cmd: list[str], *, timeout: float = 60, cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError as e:
        raise ImageError(f"{cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{' '.join(cmd)} took longer than {timeout} s") from e
    if out.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def dependency_graph(packages: list[str]) -> dict[str, list[str]]:
    """Depends/PreDepends (first of each alternative group) of ``packages``, recursively.

    One ``apt-cache`` call: each call loads apt's whole cache (over a second
    where, as in Debian's container images, the binary cache is switched off).
    """
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", *packages])  # fmt: skip
    graph: dict[str, list[str]] = {}
    current: list[str] | None = None
    alternative = False
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = graph.setdefault(line.strip(), [])
            alternative = False
            continue
        m = re.match(r"\s*(\|?)(Pre)?Depends:\s*(\S+)", line)
        if not m or current is None:
            continue
        if not alternative:
            current.append(m.group(3))
        alternative = m.group(1) == "|"
    return graph


def kernel_package(graph: dict[str, list[str]]) -> str:
    for name in graph.get(KERNEL_META, []):
        if name.startswith("linux-image-"):
            return name
    raise ImageError(f"apt-cache depends {KERNEL_META} names no linux-image package")


def library_closure(graph: dict[str, list[str]], package: str, limit: int = 30) -> list[str]:
    """``package`` and the ``lib*`` packages it depends on, recursively."""
    seen, todo = [package], [package]
    while todo:
        if len(seen) > limit:
            raise ImageError(f"library closure of {package} exceeds {limit} packages: {seen}")
        for dep in graph.get(todo.pop(), []):
            if dep.startswith("lib") and dep not in seen:
                seen.append(dep)
                todo.append(dep)
    return seen


def candidate_versions(packages: list[str]) -> dict[str, str]:
    out = _run(["apt-cache", "policy", *packages])
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                versions[current] = version
    missing = [p for p in packages if p not in versions]
    if missing:
        raise ImageError(f"apt has no candidate for {missing} (apt-get update?)")
    return versions


def _apt_fingerprint() -> str:
    """Changes whenever apt's idea of candidates may have: lists, sources, preferences, dpkg status."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for pattern_dir, pattern in (("/var/lib/apt/lists", "*"), ("/etc/apt", "sources.list*"),
                                 ("/etc/apt/sources.list.d", "*"), ("/etc/apt", "preferences*"),
                                 ("/etc/apt/preferences.d", "*"), ("/var/lib/dpkg", "status")):  # fmt: skip
        paths += sorted(Path(pattern_dir).glob(pattern))
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def package_set(root: Path | None = None) -> dict[str, str]:
    """Every package the image is made of, with the version apt would download.

    Remembered in the cache directory per state of apt's lists, so a cached
    image is found without asking apt (two calls, ~2 s) again.
    """
    root = root or cache_root()
    memo = root / f"packages-{_apt_fingerprint()}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    graph = dependency_graph([KERNEL_META, *USERLAND])
    names = [kernel_package(graph), "busybox-static"]
    for name in library_closure(graph, "iperf3"):
        if name not in names:
            names.append(name)
    versions = candidate_versions(names)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("packages-*.json"):
            if old != memo:
                old.unlink(missing_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(versions))
        os.rename(tmp, memo)
    except OSError:
        pass
    return versions


# -- the cache ------------------------------------------------------------------------


def _scripts_digest() -> str:
    h = hashlib.sha256()
    for text in (INIT, AGENT, UDHCPC_SCRIPT, json.dumps(ETC, sort_keys=True), repr(MODULE_ROOTS), str(FORMAT)):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def image_key(packages: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(packages, sort_keys=True).encode())
    h.update(_scripts_digest().encode())
    kernel = next(p for p in packages if p.startswith("linux-image-"))
    return f"{kernel.removeprefix('linux-image-')}-{h.hexdigest()[:16]}"


def _load(directory: Path) -> Image | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = directory / "vmlinuz", directory / "initrd.gz"
    if kernel.is_file() and initrd.is_file():
        return Image(directory, kernel, initrd, manifest)
    return None


def cached_image(root: Path | None = None) -> Image | None:
    """The image for the current package versions, or (apt unusable) the newest cached one."""
    root = root or cache_root()
    try:
        return _load(root / image_key(package_set(root)))
    except ImageError:
        pass
    images = [img for d in root.glob("*") if d.is_dir() and (img := _load(d))] if root.is_dir() else []
    images.sort(key=lambda img: img.manifest.get("built_at", 0))
    return images[-1] if images else None


class _Lock:
    """An exclusive flock with a bounded wait."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise ImageError(f"{self.path} held by another build for {self.timeout} s") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def ensure_image(root: Path | None = None, *, log=None) -> Image:
    """The cached image for the current package versions, building it if needed."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    packages = package_set(root)
    key = image_key(packages)
    image = _load(root / key)
    if image:
        return image
    with _Lock(root / ".lock", LOCK_TIMEOUT):
        image = _load(root / key)  # another process built it while we waited
        if image:
            return image
        for stale in root.glob(".build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            started = time.monotonic()
            out = work / "image"
            out.mkdir()
            manifest = build(packages, work, out, log=log)
            manifest["build_seconds"] = round(time.monotonic() - started, 2)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(out, root / key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = _load(root / key)
    assert image is not None
    return image


# -- building ---------------------------------------------------------------------------


def build(packages: dict[str, str], work: Path, out: Path, *, log=None) -> dict:
    say = log or (lambda msg: None)
    debs, tree = work / "debs", work / "tree"
    debs.mkdir()
    tree.mkdir()
    started = time.monotonic()
    # Exact versions: what the key was computed from is what we get.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
          *(f"{name}={version}" for name, version in packages.items())],
         timeout=DOWNLOAD_TIMEOUT, cwd=debs)  # fmt: skip
    files = sorted(debs.glob("*.deb"))
    if len(files) != len(packages):
        raise ImageError(f"apt-get download gave {[f.name for f in files]} for {sorted(packages)}")
    say(f"downloaded {len(files)} packages in {time.monotonic() - started:.1f} s")
    for deb in files:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=120)

    kernel_pkg = next(p for p in packages if p.startswith("linux-image-"))
    release = kernel_pkg.removeprefix("linux-image-")
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise ImageError(f"{kernel_pkg} has no {vmlinuz.name}")
    shutil.copyfile(vmlinuz, out / "vmlinuz")

    archive = Archive()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64", f"lib/{MULTIARCH}", "lib/modules",
              "etc", "etc/vmb", "proc", "sys", "dev", "tmp", "run", "root", "var", "var/run"):  # fmt: skip
        archive.directory(d)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3)
    archive.device("dev/ttyS0", 4, 64)

    # busybox and a link for every applet, where busybox says it lives.
    busybox = tree / "bin" / "busybox"
    if "not a dynamic executable" not in _ldd(busybox, []):
        raise ImageError("busybox-static's busybox is dynamically linked")
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for path in applets:
        if path != "bin/busybox":
            archive.symlink(path, "/bin/busybox")

    # iperf3 and its libraries, from the unpacked lib* packages.
    iperf3 = tree / "usr" / "bin" / "iperf3"
    archive.file("usr/bin/iperf3", iperf3.read_bytes(), 0o755)
    lib_dirs = [tree / "lib" / MULTIARCH, tree / "usr" / "lib" / MULTIARCH]
    libraries = _needed_libraries(iperf3, lib_dirs)
    for soname, path in libraries.items():
        archive.file(f"lib/{MULTIARCH}/{soname}", path.read_bytes(), 0o755)
    archive.symlink("lib64/ld-linux-x86-64.so.2", f"/lib/{MULTIARCH}/ld-linux-x86-64.so.2")

    # The virtio-net modules, in dependency order.
    module_dir = tree / "lib" / "modules" / release / "kernel"
    order = module_order(module_dir, MODULE_ROOTS)
    for name, path in order:
        archive.file(f"lib/modules/{name}.ko", _module_bytes(path), 0o644)
    archive.file("etc/vmb/modules", "".join(f"{name}\n" for name, _ in order).encode(), 0o644)

    archive.file("init", INIT.encode(), 0o755)
    archive.file("sbin/vmb-agent", AGENT.encode(), 0o755)
    archive.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    for path, text in ETC.items():
        archive.file(path, text.encode(), 0o644)

    raw = archive.finish()
    (out / "initrd.gz").write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    say(f"initramfs {len(raw) / 1e6:.1f} MB, {(out / 'initrd.gz').stat().st_size / 1e6:.1f} MB gzipped")
    return {
        "format": FORMAT,
        "packages": packages,
        "kernel_release": release,
        "modules": [name for name, _ in order],
        "libraries": sorted(libraries),
        "applets": len(applets),
        "initrd_bytes": len(raw),
        "built_at": time.time(),
    }


def _ldd(binary: Path, lib_dirs: list[Path]) -> str:
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in lib_dirs))
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, env=env)
    return out.stdout + out.stderr


def _needed_libraries(binary: Path, lib_dirs: list[Path]) -> dict[str, Path]:
    """soname -> file in the unpacked packages, for every library ``binary`` loads."""
    text = _ldd(binary, lib_dirs)
    sonames = re.findall(r"^\s*(\S+\.so[.\d]*)\s+=>", text, re.M)
    sonames += [Path(p).name for p in re.findall(r"^\s*(/\S*ld-linux\S*)\s", text, re.M)]
    if not sonames:
        raise ImageError(f"ldd found no libraries for {binary}:\n{text}")
    found: dict[str, Path] = {}
    for soname in sonames:
        for d in lib_dirs:
            candidate = d / soname
            if candidate.exists():
                found[soname] = candidate.resolve()
                break
        else:
            raise ImageError(f"{binary.name} needs {soname}, which no downloaded package has:\n{text}")
    return found


# -- kernel modules -------------------------------------------------------------------------


def _elf_section(data: bytes, wanted: str) -> bytes:
    """One section of an ELF64 little-endian file (a kernel module)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    for h in headers:
        name = names[h[0] : names.index(b"\0", h[0])].decode()
        if name == wanted:
            return data[h[4] : h[4] + h[5]]
    raise ImageError(f"no {wanted} section")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        import lzma

        data = lzma.decompress(data)
    return data


def module_depends(path: Path) -> list[str]:
    info = _elf_section(_module_bytes(path), ".modinfo")
    for entry in info.split(b"\0"):
        if entry.startswith(b"depends="):
            value = entry[len(b"depends=") :].decode()
            return [d for d in value.split(",") if d]
    return []


def module_order(module_dir: Path, roots: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The roots and their dependencies, each after what it depends on."""
    index: dict[str, Path] = {}
    for path in module_dir.rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        index[name] = path
    order: list[tuple[str, Path]] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if any(n == name for n, _ in order):
            return
        if name in visiting:
            raise ImageError(f"module dependency cycle at {name}")
        if name not in index:
            raise ImageError(f"module {name} is not in the kernel package (built in?)")
        visiting.add(name)
        for dep in module_depends(index[name]):
            visit(dep)
        visiting.discard(name)
        order.append((name, index[name]))

    for root in roots:
        visit(root)
    return order


# -- newc cpio ------------------------------------------------------------------------------


class Archive:
    """A newc ("070701") cpio archive, written in memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)  # fmt: skip
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


if __name__ == "__main__":
    t0 = time.monotonic()
    img = ensure_image(log=lambda msg: print(msg, file=sys.stderr))
    print(f"{img.directory} ({time.monotonic() - t0:.1f} s)")
    print(json.dumps({k: v for k, v in img.manifest.items() if k != "packages"}, indent=2))
    print(json.dumps(img.manifest["packages"], indent=2))
