#!/usr/bin/env bash
# Assemble a stand-in macOS SDK (a sysroot for clang -isysroot and ld64.lld -syslibroot).
# Nothing of Apple's is stored in our tree: it is all linked from the `ziglang` wheel.
#   usr/include            <- the wheel's Darwin libc headers (lib/libc/include/any-darwin-any):
#                             Apple's xpc/, dispatch/, os/ (no log.h), launch.h, Block.h, libc ...
#   usr/include/os/log.h   <- our hand-written decls/os/log.h
#   usr/include/c++/v1     <- the wheel's libc++ and libc++abi headers (lib/libcxx/include,
#                             lib/libcxxabi/include: cxxabi.h for pybind11); they need the
#                             -D flags in libcxx.flags (zig's patched __config has no __config_site)
#   usr/lib/libSystem.tbd  <- the wheel's libSystem.tbd: the SDK's export lists of libSystem and
#                             its re-exports (libxpc, libdispatch, libsystem_trace, _blocks, ...),
#                             target lists adjusted for ld64.lld (fix_tbd_targets.py)
#   System/Library/Frameworks/{vmnet,CoreFoundation}.framework
#                          <- our declaration headers + .tbd stubs generated from them (gen_tbd.py)
# usage: mksdk.sh ZIGLANG_PKG_DIR DECLS_DIR OUT_SDK_DIR
set -euo pipefail
zig_pkg=$(cd "$1" && pwd) decls=$(cd "$2" && pwd) out=$3
here=$(cd "$(dirname "$0")" && pwd)
libc_inc=$zig_pkg/lib/libc/include/any-darwin-any
[ -d "$libc_inc/xpc" ] || { echo "no Darwin headers under $libc_inc" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/usr/include/os" "$out/usr/include/c++" "$out/usr/lib" "$out/System/Library/Frameworks"
for entry in "$libc_inc"/*; do
  [ "$(basename "$entry")" = os ] || ln -s "$entry" "$out/usr/include/"
done
for entry in "$libc_inc"/os/*; do ln -s "$entry" "$out/usr/include/os/"; done
ln -s "$decls/os/log.h" "$out/usr/include/os/log.h"
mkdir -p "$out/usr/include/c++/v1"
for entry in "$zig_pkg/lib/libcxx/include"/* "$zig_pkg/lib/libcxxabi/include"/*; do ln -s "$entry" "$out/usr/include/c++/v1/"; done
"${PYTHON:-python3}" "$here/fix_tbd_targets.py" "$zig_pkg/lib/libc/darwin/libSystem.tbd" "$out/usr/lib/libSystem.tbd"
ln -s libSystem.tbd "$out/usr/lib/libSystem.B.tbd"
for fw in vmnet CoreFoundation; do
  d=$out/System/Library/Frameworks/$fw.framework
  mkdir -p "$d"
  ln -s "$decls/$fw" "$d/Headers"
  "${PYTHON:-python3}" "$here/gen_tbd.py" "$decls/$fw/$fw.h" "/System/Library/Frameworks/$fw.framework/Versions/A/$fw" "$d/$fw.tbd"
done
# libc++ configuration zig passes on its command line (ziglang 0.17.1, macOS target)
cat > "$out/libcxx.flags" <<'FLAGS'
-D_LIBCPP_ABI_NAMESPACE=__1
-D_LIBCPP_ABI_VERSION=1
-D_LIBCPP_HARDENING_MODE=_LIBCPP_HARDENING_MODE_NONE
-D_LIBCPP_ASSERTION_SEMANTIC_DEFAULT=_LIBCPP_ASSERTION_SEMANTIC_IGNORE
-D_LIBCPP_HAS_FILESYSTEM=1
-D_LIBCPP_HAS_LOCALIZATION=1
-D_LIBCPP_HAS_MONOTONIC_CLOCK=1
-D_LIBCPP_HAS_MUSL_LIBC=0
-D_LIBCPP_HAS_RANDOM_DEVICE=1
-D_LIBCPP_HAS_TERMINAL=1
-D_LIBCPP_HAS_THREADS=1
-D_LIBCPP_HAS_THREAD_API_PTHREAD=1
-D_LIBCPP_HAS_UNICODE=1
-D_LIBCPP_HAS_VENDOR_AVAILABILITY_ANNOTATIONS=0
-D_LIBCPP_HAS_WIDE_CHARACTERS=1
-D_LIBCPP_PSTL_BACKEND_SERIAL=1
FLAGS
printf '{"CanonicalName":"macosx26.0","Version":"26.0","MaximumDeploymentTarget":"26.0.99"}\n' > "$out/SDKSettings.json"
echo "stand-in SDK at $out" >&2
