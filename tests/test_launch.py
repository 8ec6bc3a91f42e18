"""FastLauncher (eefast.kernels.launch): compiles through kernel[grid] once per key, then calls the
binary's launcher with every argument in signature order.

Off the GPU a stand-in kernel records what it is asked; the ``cuda`` test launches the real
exit-head kernel directly and compares with the reference.
"""

from __future__ import annotations

import types

import pytest
import torch

from eefast import ops

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason=f"Triton unavailable: {ops.TRITON_ERROR}")


class StandInKernel:
    """Records compilations (kernel[grid](...)) and direct launches (binary.run(...))."""

    arg_names = ["x_ptr", "n", "BLOCK", "RELU"]

    def __init__(self):
        self.compiled, self.launched = [], []

    def __getitem__(self, grid):
        def compile_and_launch(*args, **constexprs):
            self.compiled.append((grid, args, constexprs))
            return types.SimpleNamespace(run=lambda *a: self.launched.append(a), function="fn", packed_metadata="meta")

        return compile_and_launch


@pytest.fixture
def launch_module(monkeypatch):
    from eefast.kernels import launch

    hooks = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "_knobs", types.SimpleNamespace(runtime=hooks))
    monkeypatch.setattr(launch, "_driver", types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 1234)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return launch


def test_compiles_once_per_key_then_launches_directly(launch_module):
    kernel = StandInKernel()
    launcher = launch_module.FastLauncher(kernel)
    assert launcher.enabled
    x = torch.zeros(4)
    launcher(("f32", 16), (3,), (x, 7), dict(RELU=True, BLOCK=16))
    assert len(kernel.compiled) == 1 and kernel.launched == []
    launcher(("f32", 16), (5,), (x, 9), dict(RELU=True, BLOCK=16))
    # grid padded to 3-D, the stream, the binary, no launch metadata or hooks, then every argument
    # in signature order: the runtime ones, then the constants (BLOCK before RELU)
    assert kernel.launched == [(5, 1, 1, 1234, "fn", "meta", None, None, None, x, 9, 16, True)]
    launcher(("f32", 32), (5,), (x, 9), dict(RELU=True, BLOCK=32))  # another key compiles
    launcher(("f32", 16), (5,), (x, 2**31), dict(RELU=True, BLOCK=16))  # a 64-bit integer compiles
    assert len(kernel.compiled) == 3 and launcher.launches == 1


def test_launch_hooks_and_the_switch_take_the_compiling_path(launch_module, monkeypatch):
    kernel = StandInKernel()
    launcher = launch_module.FastLauncher(kernel)
    for _ in range(2):
        launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    empty_chain = types.SimpleNamespace(calls=[])  # newer Triton keeps hooks in a (here empty) HookChain
    launch_module._knobs.runtime.launch_enter_hook = launch_module._knobs.runtime.launch_exit_hook = empty_chain
    launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    assert len(kernel.compiled) == 1 and len(kernel.launched) == 2
    empty_chain.calls.append(print)  # a profiler watching launches
    launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    launch_module._knobs.runtime.launch_enter_hook = print  # an older Triton's plain hook
    launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    assert len(kernel.compiled) == 3 and len(kernel.launched) == 2
    monkeypatch.setenv("EEFAST_TRITON_FAST_LAUNCH", "0")
    assert not launch_module.FastLauncher(kernel).enabled


def test_interpreter_never_launches_directly():
    from eefast.kernels import exit_head, launch

    if not launch.fast_launch_available():
        assert not exit_head._launch_forward.enabled
    else:
        pytest.skip("compiled Triton here")


@pytest.mark.cuda
def test_cuda_exit_head_launches_directly_and_matches_the_reference():
    from eefast.kernels import exit_head

    block = __import__("eefast").ExitBlock(37, 10, "bnpool", impl="triton").cuda().eval()
    x = torch.randn(5, 37, 3, 7, device="cuda")
    with torch.no_grad():
        block(x)
        before = exit_head._launch_forward.launches
        for _ in range(3):
            logits, conf = block(x)
        assert exit_head._launch_forward.launches == before + 3
        block.impl = "reference"
        want_logits, want_conf = block(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)


def test_a_launcher_with_another_signature_falls_back_once(launch_module):
    kernel = StandInKernel()
    launcher = launch_module.FastLauncher(kernel)
    launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    (full_key, (_, function, metadata, constants)), = launcher.binaries.items()

    def older_launcher(*args):  # takes fewer leading arguments
        raise TypeError("function takes 12 positional arguments but 13 were given")

    launcher.binaries[full_key] = (older_launcher, function, metadata, constants)
    with pytest.warns(UserWarning, match="launching Triton binaries directly failed"):
        launcher(("k",), (1,), (torch.zeros(1), 1), dict(BLOCK=1, RELU=False))
    assert not launcher.enabled and len(kernel.compiled) == 2
