#!/bin/bash
# Every GPU check of eefast in one run (about 3 minutes on an H200): builds the extension for the
# GPU here, runs the `cuda` tests, profiles the exit head, and benchmarks the kernels and end-to-end
# inference (eager and with CUDA graphs). Each step has its own time limit and the later steps run
# even if an earlier one fails, so a run always leaves what it measured.
#
#     benchmarks/gpu.sh OUT_DIR
#
# writes OUT_DIR/{build.log, cuda-tests.log, exit-head-profile.txt, kernels.json, inference.json}
# and prints the inference table (python -m eefast.bench). Without a GPU every step skips.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')")
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
[ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
MAX_JOBS=${MAX_JOBS:-16} $python -m pip install -q --no-deps --no-build-isolation -e . > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
step "built for ${arch:-no GPU}"

timeout 300 $python -m pytest -q -p no:cacheprovider -m cuda tests/ > "$out/cuda-tests.log" 2>&1
tail -3 "$out/cuda-tests.log"
step "cuda tests"

if [ -n "$arch" ]; then
    timeout 120 $python -m benchmarks.profile_exit_head > "$out/exit-head-profile.txt" 2>&1
    cat "$out/exit-head-profile.txt"
    step "exit head profile"
fi

timeout 200 $python -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py --benchmark-only \
    --benchmark-max-time=0.2 --benchmark-json "$out/kernels.json" > "$out/kernels.log" 2>&1
tail -1 "$out/kernels.log"
step "kernel benchmarks"

timeout 400 $python -m pytest -q -p no:cacheprovider benchmarks/test_bench_inference.py --benchmark-only \
    -k "cuda and (256 or 1024) and (eenet110 or eenet20) and not sample" \
    --benchmark-json "$out/inference.json" > "$out/inference.log" 2>&1
tail -1 "$out/inference.log"
[ -s "$out/inference.json" ] && $python -m eefast.bench "$out/inference.json"
step "done"
