"""eefast: early-exit convolutional networks (EENets) for PyTorch, made fast.

``import eefast`` works with no GPU, no Triton and no compiled extension: the ops then fall
back to plain PyTorch (``eefast.reference``) and warn once. ``eefast info`` says what is there.
"""

from eefast._version import __version__
from eefast import reference
from eefast._ext import HAS_EXT, build_info
from eefast.ops import compact_exits

__all__ = ["__version__", "HAS_EXT", "build_info", "compact_exits", "reference"]
