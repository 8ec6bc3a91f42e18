"""Launching a compiled Triton kernel again without ``JITFunction.run``'s per-call work.

``kernel[grid](*args)`` binds every argument, works out its specialisation, builds a cache key,
looks the binary up and checks the kernel's globals on every call: tens of microseconds of host
time, more than the exit head runs on a GPU. ``FastLauncher`` compiles (and launches) through
``kernel[grid]`` the first time it sees a key, keeps the binary, and afterwards calls the
binary's own launcher directly, as the code torch.compile generates does.

The caller's key must name everything the binary depends on: the tensors' dtypes and every
compile-time constant. The kernels therefore turn Triton's value-based specialisation off
(``do_not_specialize`` for integers, ``do_not_specialize_on_alignment`` for pointers), and the
launcher adds to the key the device and, per integer argument, whether it fits in 32 bits (the
one property Triton still reads from the value).

The direct path needs Triton 3.3 or newer (the launcher takes every argument, constants included,
and the launch hooks live in ``triton.knobs``); with an older Triton, under the interpreter, while a
launch hook is installed (a profiler), or with ``EEFAST_TRITON_FAST_LAUNCH=0``, every call goes
through ``kernel[grid]``.

Imports triton only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # Triton < 3.3
    _knobs = _driver = None

_I32 = (-(2**31), 2**31)


def _no_hook(hook) -> bool:
    """True for an absent launch hook: None, or an empty ``knobs.HookChain`` (newer Triton)."""
    return hook is None or not getattr(hook, "calls", True)


def fast_launch_available() -> bool:
    """Whether FastLauncher may call compiled binaries here (see the module docstring)."""
    return (
        _knobs is not None
        and os.environ.get("TRITON_INTERPRET") != "1"
        and os.environ.get("EEFAST_TRITON_FAST_LAUNCH", "1") != "0"
    )


class FastLauncher:
    """``launcher(key, grid, args, constexprs)`` runs ``kernel[grid](*args, **constexprs)``.

    ``args`` are the kernel's runtime arguments (tensors and ints) in signature order, and
    ``constexprs`` its trailing compile-time constants; ``key`` is hashable and names the dtypes
    and constants (see the module docstring).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.enabled = fast_launch_available()
        self.binaries: dict[tuple, tuple] = {}
        self.launches = 0  # direct launches, for tests

    def __call__(self, key, grid: Sequence[int], args: Sequence, constexprs: dict) -> None:
        if self.enabled and _no_hook(_knobs.runtime.launch_enter_hook) and _no_hook(_knobs.runtime.launch_exit_hook):
            device = _driver.active.get_current_device()
            full_key = (device, key, tuple(_I32[0] <= a < _I32[1] for a in args if type(a) is int))
            entry = self.binaries.get(full_key)
            if entry is not None:
                run, function, metadata, constants = entry
                grid_1 = grid[1] if len(grid) > 1 else 1
                grid_2 = grid[2] if len(grid) > 2 else 1
                try:
                    run(grid[0], grid_1, grid_2, _driver.active.get_current_stream(device), function, metadata,
                        None, None, None, *args, *constants)
                except TypeError as error:  # a launcher that takes other arguments: this Triton is not 3.3-3.8's
                    if self.launches:
                        raise
                    self.enabled = False
                    warnings.warn(f"eefast: launching Triton binaries directly failed ({error}); using kernel[grid]",
                                  stacklevel=2)
                    self.kernel[tuple(grid)](*args, **constexprs)
                    return
                self.launches += 1
                return
            binary = self.kernel[tuple(grid)](*args, **constexprs)
            names = self.kernel.arg_names
            if binary is not None and list(names[len(args):]) == sorted(constexprs, key=names.index):
                self.binaries[full_key] = (binary.run, binary.function, binary.packed_metadata,
                                           tuple(constexprs[name] for name in names[len(args):]))
            return
        self.kernel[tuple(grid)](*args, **constexprs)
