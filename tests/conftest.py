"""Fixtures for end-to-end tests: a real broker in its own namespace, real guests.

Network tests need root, ``ip`` and ``/dev/net/tun``.  Without them they skip
on a developer's machine, and fail under ``CI=true``: a CI run that skipped
its network tests has tested nothing that matters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmnet_broker.sandbox import BrokerProcess, Namespace

CI = os.environ.get("CI") == "true"
# Every namespace the tests make starts with one of these (sandbox.unique_name).
OUR_NETNS_PREFIXES = ("vmbt", "vmbg", "vmbb", "vmbo")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    try:
        from vmnet_broker import _native  # noqa: F401
    except ImportError as e:
        return f"native module not built: {e}"
    return None


def require_network() -> None:
    missing = _missing()
    if missing:
        if CI:
            pytest.fail(f"network test cannot run under CI: {missing}", pytrace=False)
        pytest.skip(missing)


def require_root() -> None:
    """Tests that chown or open root's paths; same CI rule as the others."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("needs root under CI", pytrace=False)
        pytest.skip("needs root")


def free_id(first: int = 61000, count: int = 1000) -> int:
    """A uid and gid no account or group has (a test's throwaway user)."""
    import grp
    import pwd

    for candidate in range(first, first + count):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
            continue
        except KeyError:
            return candidate
    raise RuntimeError(f"no free uid in {first}-{first + count - 1}")


# A uid and gid that own nothing of ours: "someone else" in file-safety tests.
NOBODY = 65534


@pytest.fixture
def precious_file(tmp_path):
    """A file outside the directory under attack, with content that must survive."""
    path = tmp_path / "outside" / "precious"
    path.parent.mkdir()
    path.write_text("precious\n")
    path.chmod(0o600)
    return path


def require_tools(*tools: str) -> None:
    """require_network() plus these programs on PATH (same CI rule)."""
    require_network()
    for tool in tools:
        if shutil.which(tool) is None:
            if CI:
                pytest.fail(f"network test cannot run under CI: needs {tool}", pytrace=False)
            pytest.skip(f"needs {tool}")


def require_services() -> None:
    """The network services' daemons and the guests' DHCP client."""
    require_tools("nft", "dnsmasq", "busybox")


ZIGLANG_VERSION = "0.17.1"  # the Apple headers tools/darwin-check uses; pinned in pyproject.toml too


def _darwin_toolchain_missing() -> str | None:
    """What tools/darwin-check/check.sh lacks here: LLVM >= 19 with lld, and ziglang + pybind11."""
    import importlib.metadata
    import importlib.util

    llvm = os.environ.get("LLVM")
    dirs = [Path(llvm)] if llvm else [Path(f"/usr/lib/llvm-{v}/bin") for v in (22, 21, 20, 19)]
    llvm_bin = next((d for d in dirs if (d / "clang++").exists() and (d / "ld64.lld").exists()), None)
    if llvm_bin is None:
        return "needs clang >= 19 and lld (apt-get install clang-19 lld-19 llvm-19)"
    for tool in ("llvm-nm", "llvm-otool", "llvm-readobj"):
        if not (llvm_bin / tool).exists():
            return f"needs {llvm_bin / tool} (apt-get install llvm-19)"
    for module in ("ziglang", "pybind11"):
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} package in this interpreter (pip install -e '.[test,darwin-check]')"
    if importlib.metadata.version("ziglang") != ZIGLANG_VERSION:
        return f"needs ziglang=={ZIGLANG_VERSION}, not {importlib.metadata.version('ziglang')}"
    return None


def require_darwin_toolchain() -> None:
    """The macOS compile-and-link check's tools: skip without them, fail under CI=true."""
    missing = _darwin_toolchain_missing()
    if missing:
        if CI:
            pytest.fail(f"macOS build check cannot run under CI: {missing}", pytrace=False)
        pytest.skip(missing)


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level pytest.skip() never reaches logreport.
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if CI and _skipped and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if CI and _skipped:
        terminalreporter.write_line(f"CI=true: {len(_skipped)} test(s) skipped, failing the run", red=True)


def our_namespaces() -> set[str]:
    """Namespaces this test process made (sandbox.unique_name tags them with our pid)."""
    tag = f"{os.getpid() % 100000}-"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = (line.split()[0] for line in out.splitlines())
    return {n for n in names if n.startswith(OUR_NETNS_PREFIXES) and n[4:].startswith(tag)}


def broker_locks() -> set[str]:
    directory = Path("/run/vmnet-broker")
    return {p.name for p in directory.glob("netns-*.lock")} if directory.is_dir() else set()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    return {link["ifname"] for link in json.loads(out or "[]")}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole suite: no namespace of ours, no new link in the root ns."""
    if _missing():
        yield
        return
    before_ns, before_links, before_locks = our_namespaces(), root_links(), broker_locks()
    yield
    assert our_namespaces() - before_ns == set(), "tests left network namespaces behind"
    tag = f"{os.getpid() % 100000}-"
    etc = [p.name for p in Path("/etc/netns").glob(f"vmb*{tag}*")] if Path("/etc/netns").is_dir() else []
    assert etc == [], f"tests left /etc/netns entries behind: {etc}"
    assert root_links() - before_links == set(), "tests left links in the root namespace"
    assert broker_locks() - before_locks == set(), "a broker was killed and never restarted: its lock file is left"


@pytest.fixture
def network():
    require_network()


def links_in(ns: Namespace) -> list[dict]:
    out = ns.ip("-j", "-d", "link", "show").stdout
    return json.loads(out or "[]")


def broker_links(ns: Namespace) -> list[str]:
    return [link["ifname"] for link in links_in(ns) if link["ifname"].startswith("vmb-")]


@pytest.fixture
def start_broker(network, tmp_path):
    """Start brokers in fresh namespaces; each is stopped with SIGTERM and checked clean."""
    brokers: list[BrokerProcess] = []

    def start(*, idle_timeout: float = 60, config: dict | None = None, workdir=None, **kwargs) -> BrokerProcess:
        workdir = Path(workdir or tmp_path / f"broker{len(brokers)}")
        config_dir = None
        if config is not None:
            config_dir = workdir / "config.d"
            config_dir.mkdir(parents=True, exist_ok=True)
            for name, obj in config.items():
                text = obj if isinstance(obj, str) else json.dumps(obj)
                (config_dir / f"{name}.json").write_text(text)
        broker = BrokerProcess(workdir, idle_timeout=idle_timeout, config_dir=config_dir, **kwargs)
        brokers.append(broker)
        return broker.start()

    yield start

    problems = []
    try:
        for broker in brokers:
            if broker.process is not None and broker.process.poll() is None:
                code = broker.stop()
                if code != 0:
                    problems.append(f"broker exited {code} on SIGTERM:\n{broker.log()[-3000:]}")
                if broker.namespace.created:
                    left = broker_links(broker.namespace)
                    if left:
                        problems.append(f"broker left links after SIGTERM: {left}")
    finally:
        # Only now: brokers may share a namespace, and closing one kills all inside.
        for broker in brokers:
            broker.namespace.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
def broker(start_broker):
    return start_broker()


@pytest.fixture
def guests():
    """Collects Guest objects and closes them (and their fds) at teardown."""
    made = []
    yield made
    for guest in made:
        guest.close()
        guest.interface.close()


GOLDEN = Path(__file__).resolve().parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """Compare generated text with tests/golden/NAME; UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 to accept)"


def wait_for(predicate, timeout: float, interval: float = 0.02):
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    return predicate()
