"""Build the C++ mechanism module ``vmnet_broker._native`` with pybind11.

One extension, its sources chosen by platform:
  Linux   csrc/module.cpp + csrc/linux/*.cpp (rtnetlink, TAP, seqpacket listener, frame pump)
  macOS   csrc/module_darwin.cpp + csrc/darwin/*.cpp (XPC listener, vmnet networks), for
          macOS 26 or newer; tools/darwin-check/check.sh compile- and link-checks these on Linux
"""

import os
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

MACOS_MIN = "26.0"  # vmnet_network_* (shared networks across processes) is macOS 26 API


def version_tuple(text):
    return tuple(int(part) for part in text.split("."))


compile_args = ["-Wall", "-Wextra"]
link_args = []
if sys.platform == "linux":
    sources = ["csrc/module.cpp", *glob("csrc/linux/*.cpp")]
elif sys.platform == "darwin":
    # Before the extension is made: pybind11 adds its own -mmacosx-version-min (10.14) when
    # the variable is unset, and setuptools takes the wheel's platform tag from it.
    target = os.environ.get("MACOSX_DEPLOYMENT_TARGET", "")
    if not target or version_tuple(target) < version_tuple(MACOS_MIN):
        target = os.environ["MACOSX_DEPLOYMENT_TARGET"] = MACOS_MIN
    sources = ["csrc/module_darwin.cpp", *glob("csrc/darwin/*.cpp")]
    compile_args += ["-fblocks", f"-mmacosx-version-min={target}"]
    link_args += ["-framework", "vmnet", "-framework", "CoreFoundation", f"-mmacosx-version-min={target}"]
else:
    sys.exit(f"vmnet-broker: cannot build on {sys.platform}: it supports Linux and macOS {MACOS_MIN} or newer")

setup(
    ext_modules=[
        Pybind11Extension(
            "vmnet_broker._native",
            sorted(sources),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
