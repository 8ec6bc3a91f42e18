"""The model zoo: ``create_model(name, **kwargs)`` and ``list_models()``."""

from eefast.models import eenet8, resnet  # noqa: F401  (register the models)
from eefast.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
