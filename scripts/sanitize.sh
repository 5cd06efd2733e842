#!/usr/bin/env bash
# make sanitize: build normext._C with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/asan (the in-place build and .venv are left alone) and run the CPU test suite against it.
#
# What the run needs, since python and libtorch are not instrumented:
#   LD_PRELOAD=libasan.so:libstdc++.so.6           ASan's runtime must be the first library loaded
#                                                  (libubsan comes in as the extension's
#                                                  dependency), and libstdc++ must be there when it
#                                                  starts: python does not link it, and ASan's
#                                                  __cxa_throw interceptor would find no real
#                                                  __cxa_throw and abort at the first C++
#                                                  exception (every TORCH_CHECK that fails)
#   ASAN_OPTIONS=detect_leaks=0                    CPython and torch keep allocations alive at exit
#                                                  by design; LeakSanitizer would report them all
#   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#                                                  (the build also has -fno-sanitize-recover=all:
#                                                  the first report aborts the run)
#   PYTHONPATH=build/asan/lib                      the instrumented normext ahead of the editable one
#
# Usage: scripts/sanitize.sh [pytest args]   (default: the whole tests/ directory except
# test_cmake.py, which builds and loads an uninstrumented copy of the library in a subprocess).
# SANITIZE_SKIP_BUILD=1 reuses build/asan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=build/asan
mkdir -p build

if [[ "${SANITIZE_SKIP_BUILD:-0}" != 1 ]]; then
  echo "== building normext._C with -fsanitize=address,undefined into $OUT"
  NORMEXT_SANITIZE=1 NORMEXT_CUDA=0 "$PY" setup.py -q \
    build_py --build-lib "$OUT/lib" \
    build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" >"$OUT.log" 2>&1 ||
    { tail -40 "$OUT.log"; echo "sanitize: build failed (full log: $OUT.log)"; exit 1; }
fi

LIBASAN=$(${CXX:-c++} -print-file-name=libasan.so)
if [[ ! -e "$LIBASAN" ]]; then
  echo "sanitize: libasan.so not found next to ${CXX:-c++} (Debian: apt-get install libasan8)" >&2
  exit 1
fi
LIBASAN=$(readlink -f "$LIBASAN")
LIBSTDCXX=$(readlink -f "$(${CXX:-c++} -print-file-name=libstdc++.so.6)")

export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$OUT/lib${PYTHONPATH:+:$PYTHONPATH}"
# No CPU output cache (csrc/cpu/output_cache.h): every output block goes back to malloc when its
# tensor dies, so ASan sees a use after free instead of a quietly reused block.
export NORMEXT_CPU_CACHE_MB=0

# The run must use the instrumented library, linked against the sanitizer runtimes.
"$PY" -P - <<'EOF'
import os, normext
so = normext._C.__file__
assert os.path.realpath(so).startswith(os.path.realpath("build/asan")), f"not the ASan build: {so}"
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes are not loaded"
print(f"sanitize: using {so}")
EOF

if [[ $# -eq 0 ]]; then
  set -- tests --ignore=tests/test_cmake.py
fi
echo "== pytest $* (LD_PRELOAD=$LD_PRELOAD ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)"
exec "$PY" -P -m pytest -q -p no:cacheprovider "$@"
