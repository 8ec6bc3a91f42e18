"""EENets over torchvision and timm networks: ``create_model("torchvision:NAME")`` / ``("timm:NAME")``.

The network is built by its library with random weights and ``num_classes`` outputs, optionally
given weights (``load_weights``: a local state dict or checkpoint, or the library's named weights
where the machine can download them), then cut at its block boundaries (``eefast.backbones``).
A checkpoint records the source name and the EENet's arguments, never the weights' origin: its
own state is the model. Inputs with fewer channels than the network's stem takes (MNIST's one,
for an RGB network) are repeated across them (``RepeatChannels``), which leaves the weights as
they were trained.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from eefast.eenet import EENet

SOURCES = ("torchvision", "timm")


def is_external(name: str) -> bool:
    """Whether a model name names a torchvision or timm network (``SOURCE:NAME``)."""
    return isinstance(name, str) and name.partition(":")[0] in SOURCES and ":" in name


def check_external_name(name: str) -> None:
    """Raises ValueError unless ``name`` is ``torchvision:NAME`` / ``timm:NAME`` of a network that
    library builds (the error names close matches)."""
    source, _, network = name.partition(":")
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # the classification models
    elif source == "timm":
        try:
            import timm
        except ImportError as error:
            raise ValueError(f"create_model: {name!r} needs timm (pip install timm): {error}") from error
        known = timm.list_models() if not timm.is_model(network) else [network]
    else:
        raise ValueError(f"create_model: expected a model source in {SOURCES}, got {source!r} (in {name!r})")
    if network not in known:
        close = difflib.get_close_matches(network, known, n=3)
        raise ValueError(f"create_model: {source} has no classification network {network!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))


class RepeatChannels(nn.Module):
    """[B, 1, H, W] -> [B, C, H, W]: one grey channel for a network whose stem takes C (as when
    a greyscale image is shown as RGB). No FLOPs, and exported as an Expand."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, self.channels, -1, -1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _stem_channels(network: nn.Module) -> int | None:
    conv = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def _looks_like_a_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def build_network(name: str, num_classes: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """The library's network with ``num_classes`` outputs: random weights, or ``weights``."""
    check_external_name(name)
    source, _, network_name = name.partition(":")
    if weights is not None:
        weights = os.fspath(weights)
        if not Path(weights).is_file() and _looks_like_a_path(weights):
            raise FileNotFoundError(f"--weights {weights}: expected a weights file there, found none")
    if source == "timm":
        import timm

        if weights is not None and not Path(weights).is_file():  # timm's named (pretrained) weights
            tag = "" if weights == "pretrained" else f".{weights}"
            try:
                return timm.create_model(network_name + tag, pretrained=True, num_classes=num_classes)
            except Exception as error:  # (offline: huggingface_hub's errors, of many kinds)
                raise OSError(f"--weights {weights}: timm could not load the pretrained weights of {network_name}"
                              f"{tag} ({type(error).__name__}: {error}); give a local file instead") from error
        network = timm.create_model(network_name, pretrained=False, num_classes=num_classes)
    else:
        import torchvision

        network = torchvision.models.get_model(network_name, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(network, _weights_state(name, weights))
    return network


def _weights_state(name: str, weights: str) -> Mapping[str, Tensor]:
    """The state dict a ``--weights`` value names: a local file (a state dict, or a checkpoint that
    holds one under ``state_dict`` / ``model``), or torchvision's named weights."""
    path = Path(weights)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"--weights {weights}: cannot read it as a state dict ({type(error).__name__}: "
                             f"{error})") from error
        if isinstance(state, dict) and "model_name" in state and "model_state" in state:
            raise ValueError(f"--weights {weights}: an eefast checkpoint (its tensors are named by the EENet's stages); "
                             "expected the network's own state dict (eefast eval / --resume read checkpoints)")
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not (isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())):
            raise ValueError(f"--weights {weights}: expected a state dict of tensors (or a checkpoint holding one "
                             f"under 'state_dict' or 'model'), got {type(state).__name__}")
        unwrapped = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())  # DDP's names
        metadata = getattr(state, "_metadata", None)  # modules' versions (MNASNet's loading reads its own)
        if metadata is not None:
            unwrapped._metadata = OrderedDict((k.removeprefix("module."), v) for k, v in metadata.items())
        return unwrapped
    import torchvision

    network = name.partition(":")[2]
    choices = [w.name for w in torchvision.models.get_model_weights(network)]
    if weights not in (*choices, "DEFAULT"):
        raise ValueError(f"--weights {weights}: expected a file, or one of torchvision's weights for {network} "
                         f"{['DEFAULT', *choices]}")
    entry = torchvision.models.get_model_weights(network)[weights]
    try:  # torchvision's builder loads them (its renames of old keys, its hash check), then we take its state
        return torchvision.models.get_model(network, weights=entry, progress=False).state_dict()
    except OSError as error:  # (URLError is one)
        raise OSError(f"--weights {weights}: could not download {entry.url} ({error}); this machine may have no "
                      "internet: give a local file instead") from error


def classifier_layer(network: nn.Module) -> str | None:
    """The name of the network's last classification layer: timm's ``get_classifier()`` (a linear
    layer or a 1x1 convolution), else the last nn.Linear."""
    if hasattr(network, "get_classifier"):
        layer = network.get_classifier()
        return next((name for name, m in network.named_modules() if m is layer and name), None)
    return ([name for name, m in network.named_modules() if isinstance(m, nn.Linear)] or [None])[-1]


def load_weights(network: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Loads ``state`` into ``network``. Only the classification layer (``classifier_layer``) may
    differ in shape or be absent: a classifier of another number of classes keeps its random
    weights (with a warning). Batch norm's ``num_batches_tracked`` may be absent, as torch allows."""
    own = network.state_dict()
    last = classifier_layer(network)
    classifier = {k for k in own if last is not None and k.rpartition(".")[0] == last}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) - classifier if not k.endswith(".num_batches_tracked"))
    reshaped = sorted(k for k in set(own) & set(state) - classifier if own[k].shape != state[k].shape)
    if unexpected or missing or reshaped:
        problems = [f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in (
            ("unexpected", unexpected), ("missing", missing), ("of another shape", reshaped)) if keys]
        raise ValueError(f"--weights: expected the state dict of a {type(network).__name__} (its classifier {last!r} "
                         f"may differ), got one with {len(unexpected)} unexpected, {len(missing)} missing and "
                         f"{len(reshaped)} reshaped tensors: {'; '.join(problems)}")
    fresh = sorted(k for k in classifier if k not in state or own[k].shape != state[k].shape)
    if fresh:
        shapes = ", ".join(f"{k} {list(own[k].shape)}" for k in fresh)
        given = {k: list(state[k].shape) for k in fresh if k in state}
        warnings.warn(f"--weights: the classifier {last!r} starts random ({shapes}; the weights' {given or 'none'})",
                      stacklevel=3)
    fits = OrderedDict((k, v) for k, v in state.items() if k not in fresh)
    metadata = getattr(state, "_metadata", None)
    fits._metadata = metadata if metadata is not None else own._metadata  # (versions: MNASNet's loading reads its own)
    network.load_state_dict(fits, strict=False)


def external_eenet(name: str, *, num_classes: int = 10, input_shape=(3, 224, 224), num_exits: int = 3,
                   weights: str | os.PathLike | None = None, **kwargs) -> EENet:
    """The EENet over network ``name`` (``torchvision:NAME`` / ``timm:NAME``). ``kwargs`` go to
    ``EENet`` (distribution, exit_type, exit_positions, threshold, policy)."""
    network = build_network(name, num_classes, weights)
    channels, stem = input_shape[0], _stem_channels(network)
    if stem is not None and channels != stem:
        if channels != 1:
            raise ValueError(f"create_model: {name} takes {stem}-channel images; expected input_shape with {stem} "
                             f"channels (or 1, repeated), got {list(input_shape)}")
        network = _with_repeated_channels(network, stem)
    return EENet.from_backbone(network, num_exits=num_exits, num_classes=num_classes, input_shape=input_shape,
                               **kwargs)


def _with_repeated_channels(network: nn.Module, channels: int) -> nn.Module:
    """``network`` cut into blocks, its first block preceded by RepeatChannels (as an nn.Sequential
    of blocks then classifier, which ``cut_backbone`` takes as it is)."""
    from eefast.backbones import cut_backbone

    blocks, classifier, _ = cut_backbone(network)
    return nn.Sequential(nn.Sequential(RepeatChannels(channels), blocks[0]), *blocks[1:], classifier)
