#!/bin/bash
# Every GPU check of eefast (about 12 minutes on an H200: split STEPS over two calls of a 10-minute
# device tool): builds the extension for the GPU here, runs the Triton kernels' tests first (their
# correctness on a GPU before their speed), profiles the exit head, benchmarks the kernels, runs
# the `cuda` tests, and benchmarks end-to-end inference (eager and with CUDA graphs). Each step has
# its own time limit and the later steps run even if an earlier one fails, so a run always leaves
# what it measured.
#
#     benchmarks/gpu.sh OUT_DIR
#
# writes OUT_DIR/{build.log, cuda-tests.log, kernel-tests.log, exit-head-profile.txt, exit-head-variants.txt, kernels.json,
# inference.json} and prints the inference table (python -m eefast.bench). Without a GPU every step
# skips. STEPS picks steps (default: "kernel-tests profile variants kernels cuda-tests inference", which run
# in that order whatever the order in STEPS; the build always runs); KERNEL_CASES narrows the kernel
# benchmarks (a pytest -k expression, e.g. "exit_block" for the exit head's training steps and
# inference), KERNELS_S and KERNEL_TESTS_S set their time limits; EEFAST_BENCH_CUDNN_BENCHMARK=1
# passes on to the benchmarks (benchmarks/conftest.py).
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
want() { [[ " ${STEPS:-kernel-tests profile variants kernels cuda-tests inference} " == *" $1 "* ]]; }

arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')")
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
[ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
MAX_JOBS=${MAX_JOBS:-16} $python -m pip install -q --no-deps --no-build-isolation -e . > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
step "built for ${arch:-no GPU}"

if want kernel-tests && [ -n "$arch" ]; then  # the Triton kernels' tests, compiled for this GPU
    timeout ${KERNEL_TESTS_S:-240} $python -m pytest -q -p no:cacheprovider tests/test_ee_loss_kernel.py tests/test_exit_head_kernel.py \
        > "$out/kernel-tests.log" 2>&1
    grep -E "^(FAILED|ERROR)" "$out/kernel-tests.log" | head -20; tail -1 "$out/kernel-tests.log"
    step "kernel tests on the GPU"
fi

if want profile && [ -n "$arch" ]; then
    timeout 180 $python -m benchmarks.profile_exit_head > "$out/exit-head-profile.txt" 2>&1
    cat "$out/exit-head-profile.txt"
    step "exit head profile"
fi

if want variants && [ -n "$arch" ]; then  # what each device-side variant of the exit head pays (issue 18)
    timeout 240 $python -m benchmarks.exit_head_variants > "$out/exit-head-variants.txt" 2>&1
    cat "$out/exit-head-variants.txt"
    step "exit head variants"
fi

if want kernels; then  # (pytest-benchmark writes its JSON at the end: a run cut short by the timeout leaves none)
    timeout ${KERNELS_S:-450} $python -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py --benchmark-only \
        -k "${KERNEL_CASES:-exit_head or exit_block or ee_loss}" \
        --benchmark-max-time=0.2 --benchmark-json "$out/kernels.json" > "$out/kernels.log" 2>&1
    tail -1 "$out/kernels.log"
    [ -s "$out/kernels.json" ] && $python -m benchmarks.kernels_table "$out/kernels.json"
    step "kernel benchmarks"
fi

if want cuda-tests; then
    timeout 300 $python -m pytest -q -p no:cacheprovider -m cuda tests/ > "$out/cuda-tests.log" 2>&1
    tail -3 "$out/cuda-tests.log"
    step "cuda tests"
fi

if want inference; then
    timeout 400 $python -m pytest -q -p no:cacheprovider benchmarks/test_bench_inference.py --benchmark-only \
        -k "cuda and ${INFERENCE_CASES:-(256 or 1024)} and (eenet110 or eenet20) and not sample" \
        --benchmark-json "$out/inference.json" > "$out/inference.log" 2>&1
    tail -1 "$out/inference.log"
    [ -s "$out/inference.json" ] && $python -m eefast.bench "$out/inference.json"
fi
step "done"
