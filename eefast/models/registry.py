"""The model registry: ``@register_model`` entry points, ``create_model`` and ``list_models``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a model factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"register_model: a model named {fn.__name__!r} is registered already")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the registered model ``name``; ``kwargs`` override its defaults (``num_classes``,
    ``input_shape``, ``num_exits``, ``distribution``, ``exit_type``, ``threshold``, ...)."""
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; expected one of {list_models()}")
    return _MODELS[name](**kwargs)
