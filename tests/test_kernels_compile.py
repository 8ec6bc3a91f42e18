"""The Triton kernels compile for real GPUs (sm_80, sm_90) down to cubin, with no GPU here.

The interpreter runs the kernels' Python, which accepts code the GPU compiler may not; this
test compiles every kernel variant eefast launches ahead of time with Triton's own toolchain.
It runs in a fresh process without TRITON_INTERPRET (under it the kernels are interpreted
functions).
"""

from __future__ import annotations

import json
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
from eefast.kernels import ee_loss
from eefast.kernels.exit_head import backward, forward, statistics

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
    for data, compute, compute_tl, vec in (("fp32", "fp32", tl.float32, 4), ("bf16", "fp32", tl.float32, 8),
                                           ("fp16", "fp32", tl.float32, 8), ("fp64", "fp64", tl.float64, 2)):
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
        # the exit head: without batch norm (NCHW, 16-byte vectors), with it (channels_last, scalar); the forward (with batch
        # norm: for inference, and writing the backward's per-sample sums), the backward's per-sample
        # kernel (heads in the kernel or by torch; with batch norm: running or batch statistics) and
        # reduce kernel (with batch norm: heads in the kernel or by torch)
        # the batch statistics: whole (updating the running statistics) or split (then merged and updated)
        running = {"running_mean_ptr": f"*{data}", "running_var_ptr": f"*{data}", "momentum_hi": "fp32",
                   "momentum_lo": "fp32"}
        for split, layout, stats_vec in ((False, 1, vec), (True, 0, 1)):
            compile_kernel(statistics._batch_stats_kernel,
                           {"x_ptr": f"*{data}", "stats_ptr": f"*{compute}", "partials_ptr": f"*{compute}", **running},
                           ["B", "C", "HW", "stride_b", "stride_c", "stride_hw", "rows_per_split"],
                           {"SPLIT": split, "UPDATE": not split, "LAYOUT": layout, "VEC": stats_vec, "BLOCK_B": 32,
                            "BLOCK_HW": 64, "COMPUTE": compute_tl}, arch)
            count += 1
        for split, stats_vec in ((False, vec), (True, 1)):  # channels_last: whole or split
            compile_kernel(statistics._batch_stats_channels_kernel,
                           {"x_ptr": f"*{data}", "stats_ptr": f"*{compute}", "partials_ptr": f"*{compute}", **running},
                           ["C", "HW", "N", "stride_b", "stride_hw", "positions_per_split"],
                           {"SPLIT": split, "UPDATE": not split, "VEC": stats_vec, "BLOCK_N": 32, "BLOCK_C": 64,
                            "COMPUTE": compute_tl}, arch)
            count += 1
        compile_kernel(statistics._batch_stats_merge_kernel,
                       {"x_ptr": f"*{data}", "partials_ptr": f"*{compute}", "stats_ptr": f"*{compute}", **running},
                       ["C", "S", "stride_c"], {"UPDATE": True, "BLOCK_S": 128, "BLOCK_C": 16, "COMPUTE": compute_tl},
                       arch)
        count += 1
        head_pointers = {"grad_logits_ptr": f"*{data}", "grad_conf_ptr": f"*{data}", "cls_weight_ptr": f"*{data}",
                         "conf_weight_ptr": f"*{data}"}
        for bn, layout, layout_vec in ((False, 1, vec), (True, 2, 1)):
            bn_dtype = data if bn else compute
            bn_pointers = {"bn_weight_ptr": f"*{bn_dtype}", "bn_bias_ptr": f"*{bn_dtype}", "mean_ptr": f"*{bn_dtype}",
                           "var_ptr": f"*{bn_dtype}"}
            flags = {"BN": bn, "RELU": bn, "LAYOUT": layout, "VEC": layout_vec, "BLOCK_C": 32, "BLOCK_HW": 64,
                     "COMPUTE": compute_tl}
            # (inference; training, the batch statistics given or merged from partials by the forward;
            # the pooled features alone, the heads left to torch: the op without heads)
            for bn_sums, merge, heads in (((False, False, True), (True, False, True), (True, True, True),
                                           (True, False, False)) if bn
                                          else ((False, False, True), (False, False, False))):
                compile_kernel(forward._exit_head_forward_kernel,
                               {"x_ptr": f"*{data}", "cls_weight_ptr": f"*{data}", "cls_bias_ptr": f"*{data}",
                                "conf_weight_ptr": f"*{data}", "conf_bias_ptr": f"*{data}", **bn_pointers,
                                "partials_ptr": f"*{compute}", "stats_ptr": f"*{compute}", **running,
                                "logits_ptr": f"*{data}", "conf_ptr": f"*{data}", "per_sample_ptr": f"*{compute}",
                                "eps": "fp32"},
                               ["C", "HW", "K", "S", "stride_b", "stride_c", "stride_hw"],
                               {**flags, "BN_SUMS": bn_sums, "MERGE": merge, "UPDATE": merge,
                                "HEADS": heads, "BLOCK_K": 16, "BLOCK_S": 4}, arch)
                count += 1
            for heads_in_kernel in (False, True):
                for batch_stats in ((False, True) if bn else (False,)):
                    # (the reduce programs in the same launch wherever there are sums and dL/dx needs none)
                    # (dL/d pooled from the heads in the kernel, or given in x's dtype: the op without heads)
                    grad_pooled = f"*{compute}" if heads_in_kernel else f"*{data}"
                    compile_kernel(backward._exit_head_backward_kernel,
                                   {"grad_pooled_ptr": grad_pooled, **head_pointers, "x_ptr": f"*{data}",
                                    **bn_pointers, "per_sample_ptr": f"*{compute}", "grad_weight_ptr": f"*{data}",
                                    "grad_bias_ptr": f"*{data}", "totals_ptr": f"*{compute}",
                                    "grad_x_ptr": f"*{data}", "eps": "fp32"},
                                   ["B", "C", "HW", "K", "stride_b", "stride_c", "stride_hw", "gl_stride_b",
                                    "gl_stride_k", "gc_stride"],
                                   {**flags, "BATCH_STATS": batch_stats, "HEADS": heads_in_kernel,
                                    "BLOCK_K": 16, "REDUCE": (heads_in_kernel or bn) and not batch_stats,
                                    "REDUCE_B": 64, "REDUCE_C": 8, "REDUCE_K": 16}, arch)
                    count += 1
                if bn or heads_in_kernel:
                    compile_kernel(backward._exit_head_reduce_kernel,
                                   {"grad_pooled_ptr": f"*{compute}" if heads_in_kernel else f"*{data}",
                                    **head_pointers,
                                    "per_sample_ptr": f"*{compute}", "grad_weight_ptr": f"*{data}",
                                    "grad_bias_ptr": f"*{data}", "totals_ptr": f"*{compute}"},
                                   ["B", "C", "HW", "K", "gl_stride_b", "gl_stride_k", "gc_stride"],
                                   {"BN": bn, "HEADS": heads_in_kernel, "BLOCK_B": 64, "BLOCK_C": 8,
                                    "BLOCK_K": 16, "COMPUTE": compute_tl}, arch)
                    count += 1
print(count)
'''


def test_every_kernel_compiles_to_cubin_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # archs x dtypes x (loss: 2 exit counts x 5 variants x forward and backward; head: 2 + 2 statistics
    # and a merge, 2 + 4 forward, 2 x (1 + 2) backward, 1 + 2 reduce)
    assert result.stdout.strip() == str(2 * 4 * (2 * 5 * 2 + 5 + 6 + 2 * 3 + 3))


SPILL_SCRIPT = r'''
import json, re, subprocess, tempfile
from pathlib import Path
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import torch
from eefast.kernels.exit_head import backward as HB, common as HC, forward as HF, statistics as HS

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

def resources(fn, pointers, constexprs):
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(f.split(":") for f in next(line for line in out.splitlines() if "REG:" in line).split()
                  if ":" in f and f.split(":")[0] in ("REG", "STACK", "LOCAL"))
    usage = {k: int(v) for k, v in fields.items()}
    usage["V4_LOADS"] = len(re.findall(r"ld\.global[^ ]*\.v4", compiled.asm["ptx"]))  # 16-byte loads
    usage["V4_STORES"] = len(re.findall(r"st\.global[^ ]*\.v4", compiled.asm["ptx"]))  # and stores
    return usage

# The benchmark's exit head (B=256, C=64, 8x8, K=10) and the 7x7 map that cannot take 16-byte vectors,
# NCHW, with the blocks and layout the launchers pick; batch norm with batch statistics.
for data, size in (("fp32", 4), ("bf16", 2)):
    for pixels, strides in ((64, (4096, 64, 1)), (49, (3136, 49, 1))):
        x = torch.empty(256, 64, pixels, 1, dtype=torch.float32 if data == "fp32" else torch.bfloat16)
        assert HC.flat_strides(x)[1] == strides
        layout, vec = HC.layout(x, strides)
        block_c, block_hw, block_k = HC.blocks(64, pixels, 11, layout, vec)
        common = {"LAYOUT": layout, "VEC": vec, "BLOCK_C": block_c, "BLOCK_HW": block_hw, "BLOCK_K": block_k,
                  "COMPUTE": tl.float32, "BN": True, "RELU": True}
        pointers = {name: f"*{data}" for name in ("x_ptr", "cls_weight_ptr", "cls_bias_ptr", "conf_weight_ptr",
                    "conf_bias_ptr", "bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr", "logits_ptr", "conf_ptr",
                    "grad_logits_ptr", "grad_conf_ptr", "grad_x_ptr", "grad_weight_ptr", "grad_bias_ptr")}
        pointers.update({name: "*fp32" for name in ("per_sample_ptr", "grad_pooled_ptr", "totals_ptr", "stats_ptr",
                                                    "partials_ptr", "running_mean_ptr", "running_var_ptr")},
                        eps="fp32", momentum_hi="fp32", momentum_lo="fp32")
        block_b, stats_hw = HS.stats_blocks(256, 64, pixels)[:2]
        block_n, stats_c = HS.stats_channels_blocks(256, 64, pixels)[:2]
        reduce_b, reduce_c, reduce_k = HB.reduce_blocks(256, 64, 11)
        splits = HS.stats_blocks(256, 64, pixels)[2]
        channels_last_splits = HS.stats_channels_blocks(256, 64, pixels)[2]
        merge_c = 16  # (statistics.launch_merge's blocks for 64 channels)
        merge_s = HS.merge_block_s(channels_last_splits, merge_c)
        assert HS.merge_in_forward(splits, pixels)  # (both shapes: NCHW statistics split 4 ways, merged by the forward)
        no_reduce = {"REDUCE": False, "REDUCE_B": 1, "REDUCE_C": 1, "REDUCE_K": 1}
        kernels = {
            "forward": (HF._exit_head_forward_kernel, {**common, "BN_SUMS": True, "MERGE": True, "UPDATE": True,
                                                      "HEADS": True,
                                                      "BLOCK_S": HS.merge_block_s(splits, block_c)}),
            "backward": (HB._exit_head_backward_kernel, {**common, "BATCH_STATS": True, "HEADS": True,
                                                        **no_reduce}),
            # the pool exit's backward: dL/dx and the heads' sums in one launch
            "backward pool": (HB._exit_head_backward_kernel, {
                **common, "BN": False, "RELU": False, "BATCH_STATS": False, "HEADS": True, "REDUCE": True,
                "REDUCE_B": reduce_b, "REDUCE_C": reduce_c, "REDUCE_K": reduce_k}),
            "stats": (HS._batch_stats_kernel, {"SPLIT": splits > 1, "UPDATE": splits == 1, "LAYOUT": layout,
                                              "VEC": vec, "BLOCK_B": block_b, "BLOCK_HW": stats_hw,
                                              "COMPUTE": tl.float32}),
            "stats channels_last": (HS._batch_stats_channels_kernel, {
                "SPLIT": channels_last_splits > 1, "UPDATE": channels_last_splits == 1, "VEC": vec, "BLOCK_N": block_n,
                "BLOCK_C": stats_c, "COMPUTE": tl.float32}),
            "merge channels_last": (HS._batch_stats_merge_kernel, {"UPDATE": True, "BLOCK_S": merge_s,
                                                                  "BLOCK_C": merge_c, "COMPUTE": tl.float32}),
            "reduce": (HB._exit_head_reduce_kernel, {"BN": True, "HEADS": True, "BLOCK_B": reduce_b,
                                                    "BLOCK_C": reduce_c, "BLOCK_K": reduce_k, "COMPUTE": tl.float32}),
            # the same map under heads too large for the kernels (the op without heads: pooled features out,
            # dL/d pooled in, in x's dtype)
            "forward without heads": (HF._exit_head_forward_kernel, {
                **common, "BN_SUMS": True, "MERGE": True, "UPDATE": True, "HEADS": False,
                "BLOCK_S": HS.merge_block_s(splits, block_c)}),
            "backward without heads": (HB._exit_head_backward_kernel, {**common, "BATCH_STATS": True,
                                                                      "HEADS": False, **no_reduce}),
        }
        for name, (fn, constexprs) in kernels.items():
            kernel_pointers = {**pointers, "grad_pooled_ptr": f"*{data}"} if name.endswith("without heads") else pointers
            print(json.dumps({"dtype": data, "pixels": pixels, "kernel": name, "vec": vec,
                              **resources(fn, kernel_pointers, constexprs)}))
'''


def test_exit_head_kernels_do_not_spill_registers_on_sm90():
    """The sm_90 binaries at the benchmark's shape (and at a 7x7 map, which takes no 16-byte
    vectors in NCHW), with the blocks the launchers pick, keep everything in registers: no local
    memory; and where the launchers promise 16-byte groups the kernels that read x do read them
    16 bytes at a time. (The channels_last statistics kernel is compiled with the NCHW case's
    vector width.)
    The batch-norm kernels once used 255 registers and 600 bytes of stack at this shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SPILL_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 * 2 * 9, result.stdout
    for line in lines:
        usage = json.loads(line)
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0, line
        if usage["vec"] > 1 and usage["kernel"] not in ("reduce", "merge channels_last", "backward pool"):
            assert usage["V4_LOADS"] > 0, line  # (the others read no x)
        if usage["vec"] > 1 and usage["kernel"].startswith("backward"):
            assert usage["V4_STORES"] > 0, line  # dL/dx
