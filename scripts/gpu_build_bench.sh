#!/bin/bash
# A device call (scripts/gpu_build_bench.sh, see DEVELOPERS.md): build in place, the CUDA
# benchmark, the BatchNorm kernel profile, the CUDA test files; files land in $OUT.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages
T0=$(date +%s)
NORMEXT_CUDA=1 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "build done $(( $(date +%s) - T0 )) s"
python3 benchmarks/run_all.py --device cuda > $OUT/bench.log 2>&1; tail -8 $OUT/bench.log
cp $(ls -t benchmarks/results/*.csv | head -1) $(ls -t benchmarks/results/*.png | head -1) benchmarks/results/summary.md $OUT/
timeout 60 python3 scripts/cuda_bn_profile.py > $OUT/prof.txt 2>&1
echo "prof done $(( $(date +%s) - T0 )) s"
timeout $(( 580 - ($(date +%s) - T0) )) python3 -m pytest -n 15 -q -rs -p no:cacheprovider tests/test_cuda_batch_norm.py tests/test_cuda_layer_norm.py > $OUT/testsA.log 2>&1
echo "tests rc $? at $(( $(date +%s) - T0 )) s"; tail -6 $OUT/testsA.log
