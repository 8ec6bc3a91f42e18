"""The Triton kernels compile for real GPUs (sm_80, sm_90) down to cubin, with no GPU here.

The interpreter runs the kernels' Python, which accepts code the GPU compiler may not; this
test compiles every kernel variant eefast launches ahead of time with Triton's own toolchain.
It runs in a fresh process without TRITON_INTERPRET (under it the kernels are interpreted
functions).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eefast import ops

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason=f"Triton unavailable: {ops.TRITON_ERROR}")

SCRIPT = r'''
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from eefast.kernels import ee_loss, exit_head

def compile_kernel(fn, pointers, ints, constexprs, arch):
    signature = {**{name: dtype for name, dtype in pointers.items()}, **{name: "i32" for name in ints},
                 **{name: "constexpr" for name in constexprs}}
    names = list(fn.arg_names)
    signature = {name: signature[name] for name in names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], fn.__name__

count = 0
for arch in (80, 90):
    for data, compute, compute_tl in (("fp32", "fp32", tl.float32), ("bf16", "fp32", tl.float32),
                                      ("fp16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)):
        for exits in (1, 3):
            blocks = {"E": exits, "BLOCK_E": triton.next_power_of_2(exits), "BLOCK_B": 16, "BLOCK_K": 16,
                      "COMPUTE": compute_tl}
            weights = {"cost_weight_hi": "fp32", "cost_weight_lo": "fp32"}
            # the parts (every exit), then the per-sample loss of each version
            for reduce, (ce_mode, cost_mode) in [(False, (2, 2)), *((True, m[:2]) for m in ee_loss.VERSION_MODES.values())]:
                modes = {"CE_MODE": ce_mode, "COST_MODE": cost_mode}
                compile_kernel(ee_loss._ee_loss_forward_kernel,
                               {"logits_ptr": f"*{data}", "conf_ptr": f"*{data}", "target_ptr": "*i64",
                                "costs_ptr": "*fp32", "ce_ptr": f"*{compute}", "cost_ptr": f"*{compute}",
                                "lse_ptr": f"*{compute}", "loss_ptr": f"*{compute}", **weights},
                               ["B", "K", "stride_e", "stride_b"], {**blocks, **modes, "REDUCE": reduce}, arch)
                compile_kernel(ee_loss._ee_loss_backward_kernel,
                               {"grad_ce_ptr": f"*{compute}", "grad_cost_ptr": f"*{compute}",
                                "logits_ptr": f"*{data}", "conf_ptr": f"*{data}", "target_ptr": "*i64",
                                "costs_ptr": "*fp32", "lse_ptr": f"*{compute}", "grad_logits_ptr": f"*{data}",
                                "grad_conf_ptr": f"*{data}", **weights},
                               ["B", "K", "stride_e", "stride_b", "gce_stride_e", "gce_stride_b", "gcost_stride_e",
                                "gcost_stride_b"], {**blocks, **modes}, arch)
                count += 2
        # the exit head: without batch norm (NCHW), with it (channels_last); forward, then the backward's
        # launches (batch_stats, write_grad_x, write_partials): without batch norm dL/dx; with running
        # statistics dL/dx and the per-sample sums; with batch statistics the sums, then dL/dx
        for split in (False, True):  # the batch statistics, whole or split (then merged)
            compile_kernel(exit_head._batch_stats_kernel,
                           {"x_ptr": f"*{data}", "stats_ptr": f"*{compute}", "partials_ptr": f"*{compute}"},
                           ["B", "C", "HW", "stride_b", "stride_c", "stride_hw", "rows_per_split"],
                           {"SPLIT": split, "BLOCK_B": 32, "BLOCK_HW": 64, "COMPUTE": compute_tl}, arch)
            count += 1
        compile_kernel(exit_head._batch_stats_merge_kernel,
                       {"x_ptr": f"*{data}", "partials_ptr": f"*{compute}", "stats_ptr": f"*{compute}"},
                       ["C", "S", "stride_c"], {"BLOCK_C": 64, "COMPUTE": compute_tl}, arch)
        count += 1
        for bn, hw_contiguous in ((False, True), (True, False)):
            bn_dtype = data if bn else compute
            bn_pointers = {"bn_weight_ptr": f"*{bn_dtype}", "bn_bias_ptr": f"*{bn_dtype}", "mean_ptr": f"*{bn_dtype}",
                           "var_ptr": f"*{bn_dtype}"}
            flags = {"BN": bn, "RELU": bn, "BLOCK_C": 32, "BLOCK_HW": 64, "COMPUTE": compute_tl}
            compile_kernel(exit_head._exit_head_forward_kernel,
                           {"x_ptr": f"*{data}", "cls_weight_ptr": f"*{data}", "cls_bias_ptr": f"*{data}",
                            "conf_weight_ptr": f"*{data}", "conf_bias_ptr": f"*{data}", **bn_pointers,
                            "logits_ptr": f"*{data}", "conf_ptr": f"*{data}", "pooled_ptr": f"*{compute}", "eps": "fp32"},
                           ["C", "HW", "K", "stride_b", "stride_c", "stride_hw"],
                           {**flags, "HW_CONTIGUOUS": hw_contiguous, "BLOCK_K": 16}, arch)
            count += 1
            launches = ((False, True, True), (True, False, True), (True, True, False)) if bn else ((False, True, False),)
            for heads_in_kernel in (False, True):
                for batch_stats, write_grad_x, write_partials in launches:
                    compile_kernel(exit_head._exit_head_backward_kernel,
                                   {"grad_pooled_ptr": f"*{compute}", "grad_logits_ptr": f"*{data}",
                                    "grad_conf_ptr": f"*{data}", "cls_weight_ptr": f"*{data}",
                                    "conf_weight_ptr": f"*{data}", "x_ptr": f"*{data}", **bn_pointers,
                                    "totals_ptr": f"*{compute}", "grad_x_ptr": f"*{data}",
                                    "partials_ptr": f"*{compute}", "eps": "fp32"},
                                   ["B", "C", "HW", "K", "stride_b", "stride_c", "stride_hw", "gl_stride_b",
                                    "gl_stride_k", "gc_stride"],
                                   {**flags, "BATCH_STATS": batch_stats, "HEADS_IN_KERNEL": heads_in_kernel,
                                    "WRITE_GRAD_X": write_grad_x, "WRITE_PARTIALS": write_partials, "BLOCK_K": 16},
                                   arch)
                    count += 1
            compile_kernel(exit_head._exit_head_reduce_kernel,
                           {"grad_logits_ptr": f"*{data}", "grad_conf_ptr": f"*{data}", "pooled_ptr": f"*{compute}",
                            "partials_ptr": f"*{compute}", "grad_weight_ptr": f"*{data}", "grad_bias_ptr": f"*{data}",
                            "totals_ptr": f"*{compute}"},
                           ["B", "C", "K", "gl_stride_b", "gl_stride_k", "gc_stride"],
                           {"BN": bn, "BLOCK_B": 64, "BLOCK_C": 8, "BLOCK_K": 16, "COMPUTE": compute_tl}, arch)
            count += 1
print(count)
'''


def test_every_kernel_compiles_to_cubin_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # archs x dtypes x (loss: 2 exit counts x 5 variants x forward and backward; head: 2 statistics
    # and a merge, 2 forward, 2 x (1 + 3) backward, 2 reduce)
    assert result.stdout.strip() == str(2 * 4 * (2 * 5 * 2 + 3 + 2 + 2 * 4 + 2))
