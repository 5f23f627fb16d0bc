"""Build the C++ mechanism module ``vmnet_broker._native`` with pybind11."""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

if sys.platform == "darwin":
    sources = ["csrc/module.cpp", "csrc/darwin/listener.cpp", "csrc/darwin/vmnet.cpp"]
    extra = {"extra_compile_args": ["-fblocks"], "extra_link_args": ["-framework", "vmnet"]}
else:
    sources = [
        "csrc/module.cpp",
        "csrc/linux/listener.cpp",
        "csrc/linux/netlink.cpp",
        "csrc/linux/tap.cpp",
        "csrc/linux/pump.cpp",
    ]
    extra = {"extra_compile_args": ["-Wall", "-Wextra"]}

setup(
    ext_modules=[
        Pybind11Extension(
            "vmnet_broker._native",
            sorted(sources),
            include_dirs=["csrc"],
            cxx_std=17,
            **extra,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
