"""The math of eefast in plain PyTorch: the specification every fast path is tested against.

Imports torch only. Readable first; each function states one definition from
``shared/EENETS.md`` (thesis equation numbers in the docstrings).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def compact_exits(
    x: Tensor,  # [M, ...] features of the samples still running
    logits: Tensor,  # [M, K] this exit's class logits
    confidence: Tensor,  # [M] this exit's confidence h (probability)
    index: Tensor,  # [M] int64, each row's position in the original batch
    threshold: float,
    exit_index: int,
    out_logits: Tensor,  # [B, K] written in place at index of the exiting rows
    out_exit: Tensor,  # [B] int64, written in place with exit_index
) -> tuple[Tensor, Tensor]:
    """One exit point of batched early-exit inference (Algorithm 1, batched).

    Rows with ``confidence >= threshold`` leave: their logits and ``exit_index`` are written
    into the batch outputs at their original positions. A NaN confidence never leaves.
    Returns the surviving rows ``(x[keep], index[keep])`` in their original order.
    """
    exits = confidence >= threshold  # NaN >= T is False
    out_logits[index[exits]] = logits[exits]
    out_exit[index[exits]] = exit_index
    keep = ~exits
    return x[keep], index[keep]


# ---- exit head (Fig. 3.1) -----------------------------------------------------------------

EXIT_KINDS = ("plain", "pool", "bnpool")


class BatchNormArgs(NamedTuple):
    """The state of the batch norm of a ``bnpool`` exit, as ``torch.nn.functional.batch_norm`` takes it."""

    weight: Tensor | None  # [C]
    bias: Tensor | None  # [C]
    running_mean: Tensor | None  # [C], updated in place when training
    running_var: Tensor | None  # [C], updated in place when training
    training: bool = False
    momentum: float = 0.1
    eps: float = 1e-5


def exit_head(
    x: Tensor,  # [B, C, H, W] feature map at the exit point
    kind: str,
    cls_weight: Tensor,  # [K, F], F = C (pool, bnpool) or C*H*W (plain)
    cls_bias: Tensor,  # [K]
    conf_weight: Tensor,  # [1, F]
    conf_bias: Tensor,  # [1]
    bn: BatchNormArgs | None = None,
) -> tuple[Tensor, Tensor]:
    """An early-exit block: returns class logits ``[B, K]`` and confidence logits ``[B]``.

    ``plain`` flattens the feature map; ``pool`` averages it over space; ``bnpool`` applies
    batch norm and ReLU first. softmax(logits) is y_n and sigmoid(confidence logit) is h_n.
    """
    if kind == "bnpool":
        if bn is None:
            raise ValueError("exit_head: kind 'bnpool' needs bn=BatchNormArgs(...), got None")
        x = F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps))
    if kind in ("pool", "bnpool"):
        features = x.mean(dim=tuple(range(2, x.dim())))  # [B, C]
    elif kind == "plain":
        features = x.flatten(1)  # [B, C*H*W]
    else:
        raise ValueError(f"exit_head: expected kind in {EXIT_KINDS}, got {kind!r}")
    return exit_heads(features, cls_weight, cls_bias, conf_weight, conf_bias)


def exit_heads(
    features: Tensor,  # [B, F]
    cls_weight: Tensor,  # [K, F]
    cls_bias: Tensor,  # [K]
    conf_weight: Tensor,  # [1, F]
    conf_bias: Tensor,  # [1]
) -> tuple[Tensor, Tensor]:
    """An exit block's two heads on its features: class logits ``[B, K]``, confidence logits ``[B]``."""
    return F.linear(features, cls_weight, cls_bias), F.linear(features, conf_weight, conf_bias).squeeze(-1)


# ---- training loss (Eqs. 6-11) -----------------------------------------------------------

LOSS_VERSIONS = ("v1", "v2", "mc", "cost")


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Half-precision inputs are computed in float32."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _mixtures(
    log_y: Tensor,  # [E, B, ...] log y_n (any trailing shape: all classes, or the target's)
    conf_logits: Tensor,  # [E-1, B]
    costs: Tensor,  # [E]
) -> tuple[Tensor, Tensor]:
    """The recursions of Eqs. 6-9, in log space for Y: ``(log Y [E, B, ...], C [E, B])``."""
    conf = conf_logits.to(log_y.dtype).reshape(*conf_logits.shape, *([1] * (log_y.dim() - 2)))
    log_h, log_not_h = F.logsigmoid(conf), F.logsigmoid(-conf)  # log h_n, log (1 - h_n)
    h = conf_logits.to(log_y.dtype).sigmoid()  # [E-1, B]
    costs = costs.to(log_y.dtype)
    log_mix = [log_y[-1]]  # log Y_N = log y_N
    mix_cost = [costs[-1].expand(log_y.shape[1])]  # C_N = c_N
    for n in range(log_y.shape[0] - 2, -1, -1):
        log_mix.append(torch.logaddexp(log_h[n] + log_y[n], log_not_h[n] + log_mix[-1]))
        mix_cost.append(h[n] * costs[n] + (1 - h[n]) * mix_cost[-1])
    return torch.stack(log_mix[::-1]), torch.stack(mix_cost[::-1])


def cumulative_predictions(
    logits: Tensor,  # [E, B, K] class logits of every exit
    conf_logits: Tensor,  # [E-1, B] confidence logits of the early exits
    costs: Tensor,  # [E] relative cost of leaving at each exit
) -> tuple[Tensor, Tensor]:
    """The mixtures of Eqs. 6-9, for analysis: ``(log Y [E, B, K], C [E, B])``.

        Y_N = y_N,  Y_n = h_n y_n + (1 - h_n) Y_{n+1}
        C_N = c_N,  C_n = h_n c_n + (1 - h_n) C_{n+1}

    Y is returned as a log-probability, computed in log space so it stays finite as h -> 0, 1.
    """
    return _mixtures(logits.to(_compute_dtype(logits)).log_softmax(dim=-1), conf_logits, costs)


def eenet_loss_parts(
    logits: Tensor,  # [E, B, K]
    conf_logits: Tensor,  # [E-1, B]
    target: Tensor,  # [B] int64 class index
    costs: Tensor,  # [E]
) -> tuple[Tensor, Tensor]:
    """Per exit: ``(CE(y, Y_n) [E], mean_batch(C_n) [E])``, reading only the target class.

    CE is the batch mean of -log Y_n[target]; log Y_n[target] follows the same recursion as
    log Y_n, from log y_n[target] (a log-softmax).
    """
    log_y = logits.to(_compute_dtype(logits)).log_softmax(dim=-1)  # [E, B, K]
    log_y_target = log_y.gather(2, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)  # [E, B]
    log_mix, mix_cost = _mixtures(log_y_target, conf_logits, costs)
    return -log_mix.mean(dim=1), mix_cost.mean(dim=1)


def eenet_loss(
    logits: Tensor,  # [E, B, K]
    conf_logits: Tensor,  # [E-1, B]
    target: Tensor,  # [B]
    costs: Tensor,  # [E]
    lam: float = 1.0,
    version: str = "v2",
) -> Tensor:
    """The EENet training loss (Eqs. 10-11 and the two ablations of Table 4.1), a scalar.

        v1   = CE(y, Y_0) + lam * mean(C_0)
        v2   = sum_n [ CE(y, Y_n) + lam * mean(C_n) ]
        mc   = sum_n CE(y, Y_n)
        cost = sum_n mean(C_n)
    """
    return combine_loss_parts(*eenet_loss_parts(logits, conf_logits, target, costs), lam, version)


def exit_cross_entropy(
    logits: Tensor,  # [E, B, K] class logits of every exit
    target: Tensor,  # [B] int64
) -> Tensor:
    """Each exit's own classifier loss (deep supervision): ``CE(y, y_n)`` per exit, ``[E]``.

    Unlike the mixtures Y_n, an early classifier's gradient here does not pass through its
    confidence h_n, so it keeps learning while h_n is near 0.
    """
    log_y = logits.to(_compute_dtype(logits)).log_softmax(dim=-1)  # [E, B, K]
    return -log_y.gather(2, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2).mean(dim=1)


def distillation_loss(
    logits: Tensor,  # [E, B, K] class logits of every exit
    temperature: float = 3.0,
) -> Tensor:
    """The final exit distilled into the early ones, per early exit ``[E-1]``:

        T^2 * mean_batch KL( softmax(z_N / T) || softmax(z_n / T) )

    with the final exit's logits z_N as a fixed (detached) teacher (Hinton et al. 2015).
    """
    z = logits.to(_compute_dtype(logits)) / temperature
    teacher = z[-1].detach().log_softmax(dim=-1)  # [B, K]
    student = z[:-1].log_softmax(dim=-1)  # [E-1, B, K]
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # [E-1, B]
    return temperature**2 * kl.mean(dim=1)


def combine_loss_parts(ce: Tensor, cost: Tensor, lam: float, version: str) -> Tensor:
    """A loss version from the per-exit parts ``ce [E]`` and ``cost [E]`` of eenet_loss_parts."""
    if version == "v1":
        return ce[0] + lam * cost[0]
    if version == "v2":
        return ce.sum() + lam * cost.sum()
    if version == "mc":
        return ce.sum()
    if version == "cost":
        return cost.sum()
    raise ValueError(f"eenet_loss: expected version in {LOSS_VERSIONS}, got {version!r}")


# ---- exit policies (beyond the thesis) ------------------------------------------------------

EXIT_POLICIES = ("confidence", "max_prob", "entropy")


def exit_scores(
    logits: Tensor,  # [..., K] class logits of an exit
    conf_logits: Tensor,  # [...] its confidence logits
    policy: str = "confidence",
    temperature: Tensor | float = 1.0,  # broadcasts against [...]: the exit's softmax temperature
) -> Tensor:
    """The score s in [0, 1] a sample leaves on (higher = more confident), ``[...]``:

        confidence: s = h_n = sigmoid(conf_logit)               (EENets)
        max_prob:   s = max_k softmax(z / T)_k                  (SDN, MSDNet)
        entropy:    s = 1 - H(softmax(z / T)) / log K           (BranchyNet's entropy rule)

    NaN inputs give a NaN score, which never exits. Computed in float32 for half inputs.
    """
    if policy == "confidence":
        return conf_logits.sigmoid()
    if policy not in EXIT_POLICIES:
        raise ValueError(f"exit_scores: expected policy in {EXIT_POLICIES}, got {policy!r}")
    z = logits.to(_compute_dtype(logits))
    if isinstance(temperature, Tensor):
        temperature = temperature.to(z.dtype).unsqueeze(-1)
    log_p = (z / temperature).log_softmax(dim=-1)
    if policy == "max_prob":
        return log_p.max(dim=-1).values.exp()
    classes = z.shape[-1]
    if classes == 1:  # one class: nothing to be unsure about
        return torch.ones_like(z[..., 0])
    entropy = torch.special.entr(log_p.exp()).sum(dim=-1)  # -p log p, 0 where p = 0, NaN stays NaN
    return 1.0 - entropy / math.log(classes)


# ---- inference (Algorithm 1) ----------------------------------------------------------------

def first_confident_exit(
    confidence: Tensor,  # [E-1, B] h_n of the early exits
    thresholds: Tensor,  # [E-1]
) -> Tensor:
    """The exit each sample takes: the first n with h_n >= T_n, else the final exit E-1. [B] int64.

    A NaN confidence never exits. T is compared in the confidence's dtype, as ``h >= T`` with a
    Python float does.
    """
    thresholds = thresholds.to(confidence.dtype)
    num_early = confidence.shape[0]
    exit_index = torch.full(confidence.shape[1:], num_early, dtype=torch.int64, device=confidence.device)
    for n in range(num_early - 1, -1, -1):
        exit_index = torch.where(confidence[n] >= thresholds[n], n, exit_index)
    return exit_index
