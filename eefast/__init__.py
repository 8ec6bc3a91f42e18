"""eefast: early-exit convolutional networks (EENets) for PyTorch, made fast.

``import eefast`` works with no GPU, no Triton and no compiled extension: the ops then fall
back to plain PyTorch (``eefast.reference``) and warn once. ``eefast info`` says what is there.
"""

from eefast._version import __version__
from eefast import reference
from eefast._ext import HAS_EXT, build_info
from eefast.ops import compact_exits, eenet_loss, exit_head
from eefast.exits import ExitBlock
from eefast.flops import FlopProfile, count_flops, flop_profile
from eefast.placement import DISTRIBUTIONS, exit_costs, place_exits
from eefast.eenet import EENet, EENetLoss, EENetOutput, Prediction
from eefast.models import create_model, list_models, register_model

__all__ = [
    "__version__", "HAS_EXT", "build_info", "reference",
    "compact_exits", "eenet_loss", "exit_head",
    "ExitBlock", "EENet", "EENetLoss", "EENetOutput", "Prediction",
    "FlopProfile", "count_flops", "flop_profile", "DISTRIBUTIONS", "place_exits", "exit_costs",
    "create_model", "list_models", "register_model",
]
