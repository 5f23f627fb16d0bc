"""Build the C++ mechanism module ``vmnet_broker._native`` with pybind11."""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

if sys.platform != "linux":
    # The macOS backend (XPC listener, vmnet networks) is not written yet.
    sys.exit(f"vmnet-broker: building on {sys.platform} is not supported yet; Linux only")

sources = [
    "csrc/module.cpp",
    "csrc/linux/listener.cpp",
    "csrc/linux/netlink.cpp",
    "csrc/linux/tap.cpp",
    "csrc/linux/pump.cpp",
]

setup(
    ext_modules=[
        Pybind11Extension(
            "vmnet_broker._native",
            sorted(sources),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-Wall", "-Wextra"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
