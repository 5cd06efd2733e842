#!/usr/bin/env bash
# Compile (not run) the CUDA kernels on a machine without a GPU: a second venv with a CUDA build
# of torch, nvcc from $CUDA_HOME, NORMEXT_CUDA=1. The library is built into build/cuda-lib (the
# in-place CPU build used by the tests is left alone), then every kernel named in
# scripts/cuda_kernels.txt must be present in it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: no nvcc at $CUDA_HOME/bin/nvcc; skipping the CUDA compile check"
  exit 0
fi
if [ ! -f "$VENV/.deps-$TORCH_CUDA_VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch=="$TORCH_CUDA_VERSION" numpy ninja setuptools wheel nvidia-cuda-cuobjdump
  touch "$VENV/.deps-$TORCH_CUDA_VERSION"
fi
SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export PATH="$SITE/nvidia/cu13/bin:$SITE/nvidia/cuda_cuobjdump/bin:$PATH"
NORMEXT_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --build-lib build/cuda-lib --build-temp build/cuda-tmp
SO=$(ls build/cuda-lib/normext/_C*.so)
echo "cuda-check: built $SO"
CUOBJDUMP=$(command -v cuobjdump || true)
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP=$(find "$SITE/nvidia" -name cuobjdump -type f | head -n 1)
fi
if [ -n "$CUOBJDUMP" ]; then
  "$CUOBJDUMP" --dump-resource-usage "$SO" > build/cuda-resource-usage.txt
  KERNELS=build/cuda-resource-usage.txt
else
  nm -C "$SO" > build/cuda-symbols.txt
  KERNELS=build/cuda-symbols.txt
fi
missing=0
while read -r name; do
  case "$name" in ""|\#*) continue ;; esac
  if grep -q -- "$name" "$KERNELS"; then
    echo "cuda-check: found kernel $name"
  else
    echo "cuda-check: MISSING kernel $name"; missing=1
  fi
done < scripts/cuda_kernels.txt
if grep -q "spill" "$KERNELS" 2>/dev/null; then grep -i "spill" "$KERNELS" | sort | uniq -c | head -20; fi
exit $missing
