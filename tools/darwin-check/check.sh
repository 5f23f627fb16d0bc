#!/usr/bin/env bash
# Compile- and link-check vmnet-broker's macOS backend on Linux, for arm64 and x86_64 macOS 26.
# Nothing is run: a Mach-O binary cannot run here.  See README.md beside this file.
#
#   tools/darwin-check/check.sh            the project's sources, the wrong-call cases, the decls
#   tools/darwin-check/check.sh [--src 'a.cpp b.cpp'] [--pymodule 'module.cpp x.cpp'] [-I dir]...
#                               [--no-wrong] [--no-objcxx] [--zig] [--results FILE] [-j N]
#      --src       sources linked as one dylib (or an executable if one defines main)
#                  default: csrc/darwin/*.cpp
#      --pymodule  sources linked as one pybind11 extension bundle
#                  default: csrc/module_darwin.cpp csrc/darwin/*.cpp
#                  (with neither option, -I csrc is added; with either, only what is given)
#      --no-wrong  skip the wrong-call cases in wrong/ (each must be rejected)
#      --no-objcxx skip the Objective-C++ pass (there xpc_object_t is an ObjC type, not void *)
#      --zig       also compile+link --src with zig c++ (libc++ built from source: ~2 min per
#                  arch the first time, cached in ~/.cache/zig)
#      --results   also write one line per check to FILE: ok|FAIL <TAB> id <TAB> message
#      -j N        parallel jobs (default: number of cores)
#
# Environment:
#   PYTHON  an interpreter with ziglang==$ZIGLANG_VERSION and pybind11 (e.g. .venv/bin/python).
#           Unset: the project's .venv/bin/python if it has both, else a venv made in $WORK/venv.
#   WORK    build directory (default /tmp/vmnet-broker-darwin-check): the stand-in SDK and all
#           objects are made anew each run (only a fallback venv is kept).
#   LLVM    directory with clang++, ld64.lld, llvm-nm, llvm-otool, llvm-readobj (default: the
#           newest /usr/lib/llvm-{22,21,20,19}/bin).  Debian: apt-get install clang-19 lld-19 llvm-19
#
# Prints one line per check and ends with "N passed, N failed"; exit 1 if any check failed,
# exit 2 (with a message, before any check) if a tool is missing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/vmnet-broker-darwin-check}
ZIGLANG_VERSION=${ZIGLANG_VERSION:-0.17.1}
DEPLOY=${DEPLOY:-26.0}
ARCHS=${ARCHS:-"arm64 x86_64"}
JOBS=$(nproc 2>/dev/null || echo 2)
src_arg="" pymodule_arg="" given=0 extra_inc=() run_wrong=1 run_zig=0 run_objcxx=1 results=""
while [ $# -gt 0 ]; do
  case $1 in
    --src) src_arg=$2 given=1; shift 2 ;;
    --pymodule) pymodule_arg=$2 given=1; shift 2 ;;
    -I) extra_inc+=(-I "$(cd "$2" && pwd)") || exit 2; shift 2 ;;
    --no-wrong) run_wrong=0; shift ;;
    --no-objcxx) run_objcxx=0; shift ;;
    --zig) run_zig=1; shift ;;
    --results) results=$2; shift 2 ;;
    -j) JOBS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "darwin-check: $*" >&2; exit 2; }

# Expand the source globs (relative to the current directory) into absolute paths; a pattern
# that matches no file goes to $unmatched, and fails the run.
unmatched=()
expand() {  # expand VAR PATTERNS: set array VAR
  local -n into=$1
  local pattern f
  into=()
  for pattern in $2; do
    local found=0
    for f in $pattern; do
      [ -f "$f" ] || continue
      into+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")") found=1
    done
    [ $found = 1 ] || [[ " ${unmatched[*]} " == *" $pattern "* ]] || unmatched+=("$pattern")
  done
}
if [ "$given" = 0 ]; then
  src_arg="$root/csrc/darwin/*.cpp" pymodule_arg="$root/csrc/module_darwin.cpp $root/csrc/darwin/*.cpp"
  extra_inc+=(-I "$root/csrc")
fi
expand src "$src_arg"
expand pymodule "$pymodule_arg"
# A name for a source in messages and check ids: relative to the project when inside it.
rel() { case $1 in "$root"/*) echo "${1#"$root"/}" ;; *) echo "$1" ;; esac; }
objname() { rel "$1" | sed 's|[/.]|_|g'; }

# --- tools ---------------------------------------------------------------------------------
LLVM=${LLVM:-}
if [ -z "$LLVM" ]; then
  for v in 22 21 20 19; do
    [ -x /usr/lib/llvm-$v/bin/ld64.lld ] && [ -x /usr/lib/llvm-$v/bin/clang++ ] && { LLVM=/usr/lib/llvm-$v/bin; break; }
  done
fi
[ -n "$LLVM" ] || die "need clang >= 19 and lld: apt-get install clang-19 lld-19 llvm-19"
CXX=$LLVM/clang++ LD=$LLVM/ld64.lld NM=$LLVM/llvm-nm OTOOL=$LLVM/llvm-otool READOBJ=$LLVM/llvm-readobj
for t in "$CXX" "$LD" "$NM" "$OTOOL" "$READOBJ"; do [ -x "$t" ] || die "missing $t (apt-get install llvm-19)"; done
clang_major=$("$CXX" -dumpversion | cut -d. -f1)
[ "$clang_major" -ge 19 ] || die "clang $clang_major is too old: its TargetConditionals.h support needs clang >= 19"

has_mods() { "$1" -c 'import importlib.metadata as m, pybind11, ziglang, sys; sys.exit(m.version("ziglang") != sys.argv[1])' "$ZIGLANG_VERSION" 2>/dev/null; }
PY=${PYTHON:-}
if [ -n "$PY" ]; then
  has_mods "$PY" || die "PYTHON=$PY has no ziglang==$ZIGLANG_VERSION and pybind11: $PY -m pip install ziglang==$ZIGLANG_VERSION pybind11"
elif [ -x "$root/.venv/bin/python" ] && has_mods "$root/.venv/bin/python"; then
  PY=$root/.venv/bin/python
else
  mkdir -p "$WORK"
  [ -x "$WORK/venv/bin/python" ] || python3 -m venv "$WORK/venv" || die "cannot create $WORK/venv"
  has_mods "$WORK/venv/bin/python" || "$WORK/venv/bin/pip" install -q "ziglang==$ZIGLANG_VERSION" pybind11 ||
    die "cannot install ziglang==$ZIGLANG_VERSION and pybind11 into $WORK/venv"
  PY=$WORK/venv/bin/python
fi
ZIGPKG=$("$PY" -c 'import ziglang, os; print(os.path.dirname(ziglang.__file__))')
PYBIND_INC=$("$PY" -c 'import pybind11; print(pybind11.get_include())')
# This interpreter's libpython (shared, or else static): the Python C API the bundle may use.
LIBPY=$("$PY" - <<'EOF'
import os, sysconfig
v = sysconfig.get_config_var
for d in filter(None, (v("LIBDIR"), v("LIBPL"))):
    for n in filter(None, (v("LDLIBRARY"), v("INSTSONAME"), v("LIBRARY"))):
        if os.path.isfile(os.path.join(d, n)):
            print(os.path.join(d, n)); raise SystemExit
EOF
)
[ -z "${pymodule[*]}" ] || [ -n "$LIBPY" ] || die "no libpython found for $PY (LIBDIR/LIBPL)"

rm -rf "$WORK/obj" "$WORK/jobs"   # every object and link output is made anew each run
mkdir -p "$WORK/obj" "$WORK/jobs" || die "cannot create $WORK"
SDK=$WORK/MacOSX$DEPLOY.sdk
PYTHON=$PY "$here/tools/mksdk.sh" "$ZIGPKG" "$here/decls" "$SDK" 2>"$WORK/mksdk.log" ||
  die "building the stand-in SDK failed: $(cat "$WORK/mksdk.log")"
PYINC=$("$here/tools/pyinc_overlay.sh" "$PY" "$WORK/pyinc") || die "no usable Python headers for $PY"
echo "using $("$CXX" --version | head -1), $("$LD" --version | head -1), ziglang $ZIGLANG_VERSION and pybind11 $("$PY" -c 'import pybind11; print(pybind11.__version__)') from $PY; work dir $WORK"

CXXFLAGS=(-isysroot "$SDK" "@$SDK/libcxx.flags" -std=c++17 -fblocks -Wall -Wextra -Werror=format
          -Werror=unguarded-availability-new -fvisibility=hidden "${extra_inc[@]}")
[ "$clang_major" -lt 20 ] && CXXFLAGS+=(-Wno-#warnings)   # libc++ 22 headers warn below clang 20
PYFLAGS=(-isystem "$PYBIND_INC" -isystem "$PYINC")
target() { echo "$1-apple-macos$DEPLOY"; }
desc() { "$READOBJ" --file-headers "$1" 2>/dev/null | sed -n 's/^Format: //p; s/^  FileType: \([A-Za-z]*\).*/\1/p' | tr '\n' ' ' | sed 's/ $//'; }

# --- a small job pool: each check writes its lines to its own files, printed in order --------
njob=0 passed=0 failed=0
[ -z "$results" ] || : >"$results"
ok() { printf 'ok   %s\n' "$2"; printf 'ok\t%s\t%s\n' "$1" "$2" >>"$JOB.tsv"; }
bad() {  # bad ID MESSAGE [LOG]
  printf 'FAIL %s\n' "$2"; printf 'FAIL\t%s\t%s\n' "$1" "$2" >>"$JOB.tsv"
  [ -n "${3:-}" ] || return 0
  # the errors with a little context (not the include stack before them), else the log's head
  { grep -E -A3 -m6 'error' "$3" || head -25 "$3"; } | head -30 | sed 's/^/     /'
  echo "     (full log: $3)"
}
next_job() { njob=$((njob + 1)); JOB=$WORK/jobs/$(printf %04d $njob); }
spawn() {
  next_job
  ( "$@" ) >"$JOB.txt" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
}
drain() {  # wait for the phase, print its jobs in order, count
  local f
  wait
  for f in "$WORK"/jobs/*.txt; do
    [ -e "$f" ] || continue
    cat "$f"
    if [ -f "${f%.txt}.tsv" ]; then
      passed=$((passed + $(grep -c '^ok' "${f%.txt}.tsv"))) failed=$((failed + $(grep -c '^FAIL' "${f%.txt}.tsv")))
      [ -z "$results" ] || cat "${f%.txt}.tsv" >>"$results"
    fi
    rm -f "$f" "${f%.txt}.tsv"
  done
}

# --- the checks ---------------------------------------------------------------------------------
check_symbols() {  # decls/vmnet/vmnet.h declares only symbols verified in the SDK's vmnet.tbd
  "$PY" "$here/tools/gen_tbd.py" "$here/decls/vmnet/vmnet.h" x "$WORK/decl-vmnet.tbd" 2>/dev/null
  if "$PY" "$here/tools/check_symbols.py" "$WORK/decl-vmnet.tbd" "$here/verified-vmnet-symbols.tbd" >"$WORK/symbols.log"; then
    ok symbols "decls/vmnet/vmnet.h declares only symbols verified in the macOS 26.0 SDK's vmnet.tbd ($(head -1 "$WORK/symbols.log"))"
  else bad symbols "decls/vmnet/vmnet.h declares unverified symbols" "$WORK/symbols.log"; fi
}

compile() {  # compile ID ARCH SOURCE OBJECT [extra flags]: a Mach-O object
  local id=$1 arch=$2 f=$3 o=$4; shift 4
  if "$CXX" -target "$(target "$arch")" "${CXXFLAGS[@]}" "$@" -c "$f" -o "$o" 2>"$o.log"; then
    local warnings; warnings=$(grep -c ': warning:' "$o.log")
    ok "$id" "$id -> $(desc "$o")$([ "$warnings" = 0 ] || echo " ($warnings warning(s): $o.log)")"
  else rm -f "$o"; bad "$id" "$id:" "$o.log"; fi
}

objcxx() {  # objcxx ARCH SOURCE [extra flags]: the Objective-C++ type pass (XPC types are ObjC objects)
  local arch=$1 f=$2 id="objcxx $1 $(rel "$2")" log=$WORK/obj/$(objname "$2")-$1.objcxx.log; shift 2
  if "$CXX" -x objective-c++ -target "$(target "$arch")" "${CXXFLAGS[@]}" "$@" -fsyntax-only "$f" 2>"$log"; then
    ok "$id" "$id: Objective-C++ type pass"
  else bad "$id" "$id:" "$log"; fi
}

link() {  # link ID ARCH OUT KIND-FLAGS... -- OBJECTS... -- EXTRA-LIBS...
  local id=$1 arch=$2 out=$3; shift 3
  local kind=() objs=() libs=()
  while [ "$1" != -- ]; do kind+=("$1"); shift; done; shift
  while [ "$1" != -- ]; do objs+=("$1"); shift; done; shift
  libs=("$@")
  "$PY" "$here/tools/gen_cxx_stub.py" "$NM" "$out.libc++.tbd" "${objs[@]}" 2>/dev/null
  # -undefined error: every symbol must resolve in libSystem.tbd, a framework stub or the
  # C++-runtime (and Python C-API) stand-ins.
  if "$LD" -arch "$arch" -platform_version macos "$DEPLOY" "$DEPLOY" -syslibroot "$SDK" -undefined error "${kind[@]}" \
       -o "$out" "${objs[@]}" -lSystem -framework vmnet -framework CoreFoundation "$out.libc++.tbd" "${libs[@]}" 2>"$out.log"; then
    local deps
    deps=$("$OTOOL" -L "$out" | tail -n +2 | awk '$1 !~ /^@rpath\/darwin-check/ {print $1}' | xargs -n1 basename | tr '\n' ' ')
    ok "$id" "$id -> $(desc "$out"): ${deps% }"
  else bad "$id" "$id:" "$out.log"; fi
}

wrong_case() {  # a wrong call must be rejected, with the diagnostic in its "// expect:" line
  local f=$1 name expect mode flags log arch=arm64 tgt lang=(-x c++) rc=0
  name=$(basename "$f" .cpp) log=$WORK/obj/wrong-$name.log tgt=$(target arm64)
  expect=$(sed -n 's|^// expect: ||p' "$f") mode=$(sed -n 's|^// mode: ||p' "$f") flags=$(sed -n 's|^// flags: ||p' "$f")
  [ -n "$expect" ] || { bad "wrong $name" "wrong call $name has no '// expect:' line"; return; }
  [ "$mode" = target15 ] && tgt=arm64-apple-macos15.0
  [ "$mode" = objcxx ] && lang=(-x objective-c++)
  case $mode in
    link|link-noframework)
      local o=$WORK/obj/wrong-$name.o fw=(-framework vmnet -framework CoreFoundation)
      [ "$mode" = link-noframework ] && fw=()
      "$CXX" -target "$tgt" "${CXXFLAGS[@]}" $flags -c "$f" -o "$o" >"$log" 2>&1 || rc=1
      if [ $rc = 0 ]; then
        "$PY" "$here/tools/gen_cxx_stub.py" "$NM" "$o.tbd" "$o" 2>/dev/null
        "$LD" -arch $arch -platform_version macos "$DEPLOY" "$DEPLOY" -syslibroot "$SDK" -undefined error -o "$WORK/obj/wrong-$name" \
          "$o" -lSystem "${fw[@]}" "$o.tbd" >>"$log" 2>&1 || rc=2
      fi ;;
    *) "$CXX" "${lang[@]}" -target "$tgt" "${CXXFLAGS[@]}" $flags -fsyntax-only "$f" >"$log" 2>&1 || rc=1 ;;
  esac
  if [ $rc = 0 ]; then bad "wrong $name" "wrong call accepted: $name"
  elif grep -Eq -- "$expect" "$log"; then ok "wrong $name" "wrong call rejected: $name: $(grep -Eo -- "$expect" "$log" | head -1)"
  else bad "wrong $name" "wrong call $name failed for another reason (expected /$expect/):" "$log"; fi
}

zig_link() {
  local arch=$1 zarch=$1 out=$WORK/obj/zig-$1; [ "$arch" = arm64 ] && zarch=aarch64
  if "$PY" -m ziglang c++ -target "$zarch-macos.$DEPLOY" -std=c++17 -fblocks -Wall -Wextra \
       -isystem "$here/decls" -F "$SDK/System/Library/Frameworks" -framework vmnet -framework CoreFoundation \
       "${extra_inc[@]}" "${src[@]}" $( [ "$has_main" = 1 ] || echo -shared ) -o "$out" 2>"$out.log"; then
    ok "zig $arch" "zig c++ link $arch -> $(desc "$out")"
  else bad "zig $arch" "zig c++ link $arch:" "$out.log"; fi
}

# Phase 1: everything that compiles a single file.
JOB=$WORK/jobs/0000
spawn check_symbols
for pattern in "${unmatched[@]}"; do
  JOB=$WORK/jobs/0000; bad sources "no source matches $(rel "$pattern")" >>"$JOB.txt"
done
in_src() { local s; for s in "${src[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
for arch in $ARCHS; do
  for f in "${src[@]}"; do
    spawn compile "compile $arch $(rel "$f")" "$arch" "$f" "$WORK/obj/$(objname "$f")-$arch.o"
    [ "$run_objcxx" = 0 ] || spawn objcxx "$arch" "$f"
  done
  # Bundle sources that are not in --src: compiled with pybind11's and Python's headers.
  # The ones in --src are linked into the bundle from the objects above.
  for f in "${pymodule[@]}"; do
    in_src "$f" && continue
    spawn compile "compile $arch $(rel "$f")" "$arch" "$f" "$WORK/obj/py-$(objname "$f")-$arch.o" "${PYFLAGS[@]}"
    [ "$run_objcxx" = 0 ] || spawn objcxx "$arch" "$f" "${PYFLAGS[@]}"
  done
done
if [ "$run_wrong" = 1 ]; then
  for f in "$here"/wrong/*.cpp; do spawn wrong_case "$f"; done
fi
drain

# Phase 2: links.
if [ ${#pymodule[@]} -gt 0 ]; then "$PY" "$here/tools/gen_python_stub.py" "$NM" "$LIBPY" "$WORK/obj/python.tbd" 2>/dev/null ||
  { JOB=$WORK/jobs/0000; bad "python stub" "cannot list the Python C API of $LIBPY" >"$JOB.txt"; }; fi
has_main=0
for arch in $ARCHS; do
  if [ ${#src[@]} -gt 0 ]; then
    objs=() missing=()
    for f in "${src[@]}"; do
      o=$WORK/obj/$(objname "$f")-$arch.o; [ -f "$o" ] && objs+=("$o") || missing+=("$(rel "$f")")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      next_job; bad "link $arch" "link $arch: not attempted, did not compile: ${missing[*]}" >"$JOB.txt"
    else
      kind=(-dylib -install_name @rpath/darwin-check.dylib) out=$WORK/obj/check-$arch.dylib
      if "$NM" -g --defined-only -j "${objs[@]}" 2>/dev/null | grep -qx _main; then kind=(-execute) out=$WORK/obj/check-$arch has_main=1; fi
      rm -f "$out"; spawn link "link $arch" "$arch" "$out" "${kind[@]}" -- "${objs[@]}" --
    fi
  fi
  if [ ${#pymodule[@]} -gt 0 ]; then
    objs=() missing=()
    for f in "${pymodule[@]}"; do
      if in_src "$f"; then o=$WORK/obj/$(objname "$f")-$arch.o; else o=$WORK/obj/py-$(objname "$f")-$arch.o; fi
      [ -f "$o" ] && objs+=("$o") || missing+=("$(rel "$f")")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      next_job; bad "bundle $arch" "link $arch pybind11 bundle: not attempted, did not compile: ${missing[*]}" >"$JOB.txt"
    else
      # On a Mac the bundle links with -undefined dynamic_lookup; here the Python C API
      # resolves against a stub listing what this interpreter's libpython exports.
      rm -f "$WORK/obj/bundle-$arch.so"
      spawn link "bundle $arch" "$arch" "$WORK/obj/bundle-$arch.so" -bundle -- "${objs[@]}" -- "$WORK/obj/python.tbd"
    fi
  fi
done
drain
# A bundle that links but does not export its module init function would not import.
for arch in $ARCHS; do
  so=$WORK/obj/bundle-$arch.so
  [ -f "$so" ] || continue
  next_job
  init=$("$NM" -g --defined-only -j "$so" | grep -m1 '^_PyInit_')
  if [ -n "$init" ]; then ok "bundle exports $arch" "bundle $arch exports $init" >"$JOB.txt"
  else bad "bundle exports $arch" "bundle $arch exports no PyInit_* function" >"$JOB.txt"; fi
done
drain

if [ "$run_zig" = 1 ] && [ ${#src[@]} -gt 0 ]; then
  for arch in $ARCHS; do spawn zig_link "$arch"; done
  drain
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
