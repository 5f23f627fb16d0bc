#!/usr/bin/env python3
"""Write a .tbd stub exporting the Python C API that a libpython (any platform's
shared library, e.g. this Linux interpreter's libpython3.X.so, or its static
libpython3.X.a) defines, Mach-O spelled (leading underscore).  Linking a macOS extension bundle against it with
-undefined error checks its Python C-API references at link time; on a Mac the
real bundle is linked with -undefined dynamic_lookup instead.

usage: gen_python_stub.py LLVM_NM LIBPYTHON.so OUT.tbd"""
import re
import subprocess
import sys

nm, lib, out = sys.argv[1:4]
dynamic = [] if lib.endswith(".a") else ["-D"]
res = subprocess.run([nm, *dynamic, "-g", "--defined-only", "-j", lib], check=True, capture_output=True, text=True)
syms = sorted({"_" + s.split("@")[0] for s in res.stdout.split() if re.match(r"^_?Py", s)})
targets = "[ x86_64-macos, arm64-macos, arm64e-macos ]"
with open(out, "w") as f:
    f.write("--- !tapi-tbd\ntbd-version:     4\n")
    f.write(f"targets:         {targets}\n")
    f.write("install-name:    '@rpath/libpython-for-link-check.dylib'\n")
    f.write("exports:\n")
    f.write(f"  - targets:         {targets}\n")
    f.write("    symbols:         [ " + ", ".join(f"'{s}'" for s in syms) + " ]\n...\n")
print(f"{out}: {len(syms)} Python C-API symbols from {lib}", file=sys.stderr)
