"""The macOS backend compiles and links for arm64 and x86_64 macOS 26, checked on Linux.

tools/darwin-check/check.sh runs once for the module (about 30 s on 2 cores); each test
below asserts one part of its results.  It needs clang >= 19 with lld (Debian clang-19
lld-19 llvm-19) and ziglang + pybind11 in this interpreter (the ``darwin-check`` extra): without
them the tests skip, and under CI=true they fail.  No root needed; nothing runs on macOS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import require_darwin_toolchain

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tools" / "darwin-check"
ARCHS = ("arm64", "x86_64")
WRONG = sorted(p.stem for p in (CHECK / "wrong").glob("*.cpp"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def darwin_sources() -> list[Path]:
    """csrc/darwin/*.cpp: linked as one dylib, and into the bundle."""
    return sorted((ROOT / "csrc" / "darwin").glob("*.cpp"))


MODULE = ROOT / "csrc" / "module_darwin.cpp"  # the pybind11 module: only in the bundle


class CheckRun:
    def __init__(self, output: str, returncode: int, results: dict[str, tuple[str, str]], seconds: float):
        self.output, self.returncode, self.results, self.seconds = output, returncode, results, seconds

    def detail(self, check_id: str) -> str:
        """The check's line and its diagnostics as check.sh printed them."""
        status, message = self.results[check_id]
        lines = self.output.splitlines()
        head = f"{'ok  ' if status == 'ok' else 'FAIL'} {message}"
        for i, line in enumerate(lines):
            if line == head:
                block = [line]
                for follow in lines[i + 1 :]:
                    if not follow.startswith("     "):
                        break
                    block.append(follow)
                return "\n".join(block)
        return head

    def assert_passed(self, check_ids: list[str]) -> None:
        """Fail with check.sh's diagnostics for each id that did not pass (or never ran)."""
        failures = []
        for check_id in check_ids:
            if check_id not in self.results:
                failures.append(f"{check_id}: no result; check.sh printed:\n{self.output[-3000:]}")
            elif self.results[check_id][0] != "ok":
                failures.append(self.detail(check_id))
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture(scope="module")
def darwin_check(tmp_path_factory) -> CheckRun:
    require_darwin_toolchain()
    work = Path(os.environ.get("DARWIN_CHECK_WORK") or tmp_path_factory.mktemp("darwin-check"))
    results_file = work / "results.tsv"
    env = dict(os.environ, PYTHON=sys.executable, WORK=str(work))
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(CHECK / "check.sh"), "--results", str(results_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if proc.returncode not in (0, 1) or not results_file.exists():
        pytest.fail(f"darwin-check could not run (exit {proc.returncode}):\n{output[-4000:]}", pytrace=False)
    results = {}
    for line in results_file.read_text().splitlines():
        status, check_id, message = line.split("\t", 2)
        results[check_id] = (status, message)
    sys.stderr.write(f"\ndarwin-check: {output.strip().splitlines()[-1]} in {seconds:.1f} s\n")
    return CheckRun(output, proc.returncode, results, seconds)


def test_every_source_compiles_for_both_archs(darwin_check):
    """Each csrc/darwin/*.cpp and csrc/module_darwin.cpp compiles for arm64 and x86_64 macOS 26
    (Mach-O objects), and passes the Objective-C++ pass in which XPC and dispatch objects are
    ObjC types, so a void * mix-up that plain C++ accepts is an error."""
    sources = darwin_sources()
    assert sources, "no macOS sources: csrc/darwin/*.cpp matches nothing"
    assert MODULE.exists(), f"{rel(MODULE)} is missing"
    ids = [f"{kind} {arch} {rel(src)}" for src in [*sources, MODULE] for arch in ARCHS for kind in ("compile", "objcxx")]
    darwin_check.assert_passed(ids)


def test_darwin_sources_link_as_a_dylib(darwin_check):
    """csrc/darwin/*.cpp link with -undefined error: every symbol resolves in Apple's export
    lists (libSystem) or the vmnet/CoreFoundation stubs; only the C++ runtime is assumed."""
    darwin_check.assert_passed([f"link {arch}" for arch in ARCHS])


def test_pybind11_bundle_links(darwin_check):
    """module_darwin.cpp + csrc/darwin/*.cpp link into one bundle per arch (Python's C API
    resolving against this interpreter's exports) that exports PyInit__native, the init
    function of vmnet_broker._native."""
    darwin_check.assert_passed([f"{what} {arch}" for what in ("bundle", "bundle exports") for arch in ARCHS])
    for arch in ARCHS:
        message = darwin_check.results[f"bundle exports {arch}"][1]
        assert message.endswith(" _PyInit__native"), f"{message}: setup.py builds vmnet_broker._native"


@pytest.mark.parametrize("case", WRONG)
def test_wrong_call_is_rejected(darwin_check, case):
    """tools/darwin-check/wrong/CASE.cpp must fail to compile (or link), with the diagnostic
    its "// expect:" line names: the check would catch that mistake in our code."""
    darwin_check.assert_passed([f"wrong {case}"])


def test_vmnet_decls_only_declare_verified_symbols(darwin_check):
    """tools/darwin-check/decls/vmnet/vmnet.h declares only the symbols verified against the
    macOS 26.0 SDK's vmnet.tbd (verified-vmnet-symbols.tbd)."""
    darwin_check.assert_passed(["symbols"])
