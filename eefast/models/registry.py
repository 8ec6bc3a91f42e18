"""The model registry: ``@register_model`` entry points, ``create_model`` and ``list_models``.

``create_model`` checks its arguments before building anything (``check_model_args``): each
one's type and range, against limits that hold every model a 2-core machine or one GPU can train.
Arguments from a file (a checkpoint) are also bounded by what the model would allocate
(``eefast.checkpoint``), since a few small numbers can ask for terabytes.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ARGS: dict[str, tuple[str, ...]] = {}  # the arguments each model takes

MAX_CLASSES = 100_000
MAX_CHANNELS = 64  # of the input image
MAX_SIDE = 4096  # input height and width
MAX_FILTERS = 1024  # eenet8 / resnet8's base width
MAX_WIDTH = 16.0  # multiplier of the 6n+2 ResNets' widths
MAX_EXITS = 64


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_in(low: int, high: int) -> Callable[[str, object], None]:
    def check(name: str, value) -> None:
        if not (_is_int(value) and low <= value <= high):
            raise ValueError(f"create_model: expected {name} an integer in [{low}, {high}], got {value!r}")
    return check


def _input_shape(name: str, value) -> None:
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3
            and all(_is_int(v) for v in value)
            and 1 <= value[0] <= MAX_CHANNELS and all(1 <= v <= MAX_SIDE for v in value[1:])):
        raise ValueError(f"create_model: expected {name} [C, H, W] of integers with 1 <= C <= {MAX_CHANNELS} and "
                         f"1 <= H, W <= {MAX_SIDE}, got {value!r}")


def _width(name: str, value) -> None:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= MAX_WIDTH):
        raise ValueError(f"create_model: expected {name} a number in (0, {MAX_WIDTH}], got {value!r}")


def _text(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"create_model: expected {name} a string, got {value!r}")


def _weights(name: str, value) -> None:
    if not (value is None or isinstance(value, (str, os.PathLike))):
        raise ValueError(f"create_model: expected {name} a file path or a named weight (a string), got {value!r}")


def _thresholds(name: str, value) -> None:
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) > MAX_EXITS or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
        raise ValueError(f"create_model: expected {name} a number in [0, 1] or at most {MAX_EXITS} of them, "
                         f"got {value!r}")


def _positions(name: str, value) -> None:
    if value is None:
        return
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) <= MAX_EXITS
            and all(_is_int(v) and 0 <= v < 10_000 for v in value)):
        raise ValueError(f"create_model: expected {name} at most {MAX_EXITS} block numbers, got {value!r}")


# Every argument a registered model takes, and its check (the model then checks the values against
# one another: exit positions against its blocks, a distribution's name, the exit type).
MODEL_ARGS: dict[str, Callable[[str, object], None]] = {
    "num_classes": _int_in(1, MAX_CLASSES),
    "input_shape": _input_shape,
    "filters": _int_in(1, MAX_FILTERS),
    "width": _width,
    "num_exits": _int_in(0, MAX_EXITS),
    "distribution": _text,
    "exit_type": _text,
    "threshold": _thresholds,
    "exit_positions": _positions,
    "policy": _text,
    "weights": _weights,
}
COMMON_ARGS = ("num_classes", "input_shape", "num_exits", "distribution", "exit_type", "threshold", "exit_positions",
               "policy")


def register_model(fn: Callable[..., nn.Module] | None = None, *, args: Sequence[str] = ()):
    """Registers a model factory under its function name; ``args`` names the arguments it takes
    besides every EENet's (``COMMON_ARGS``). ``@register_model`` or ``@register_model(args=(...))``."""

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _MODELS:
            raise ValueError(f"register_model: a model named {fn.__name__!r} is registered already")
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"register_model: arguments {unknown} have no check; expected some of {sorted(MODEL_ARGS)}")
        _MODELS[fn.__name__] = fn
        _ARGS[fn.__name__] = (*COMMON_ARGS, *args)
        return fn

    return register if fn is None else register(fn)


def _external(name: str) -> bool:
    from eefast.models.external import is_external

    return is_external(name)


def check_model_args(name: str, kwargs: dict) -> None:
    """Raises ValueError unless ``name`` is registered (or names a torchvision / timm network:
    ``eefast.models.external``) and every argument is one a model takes, of the right type and
    within its limit; builds nothing."""
    if _external(name):
        from eefast.models.external import check_external_name

        check_external_name(name)
        takes = (*COMMON_ARGS, "weights")
    elif name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; expected one of {list_models()}, or "
                         "torchvision:NAME / timm:NAME")
    else:
        takes = _ARGS[name]
    for key, value in kwargs.items():
        if key not in takes:
            raise ValueError(f"create_model: unexpected argument {key!r} for {name!r}; expected some of "
                             f"{sorted(takes)}")
        MODEL_ARGS[key](key, value)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the registered model ``name``, or the EENet over a library's network
    (``"torchvision:mobilenet_v3_small"``, ``"timm:resnet18"``; ``weights=`` a file or the
    library's named weights); ``kwargs`` override its defaults (``num_classes``,
    ``input_shape``, ``num_exits``, ``distribution``, ``exit_type``, ``threshold``, ...)."""
    check_model_args(name, kwargs)
    if _external(name):
        from eefast.models.external import external_eenet

        return external_eenet(name, **kwargs)
    return _MODELS[name](**kwargs)
