"""EENet: a backbone cut into stages, an exit block after each early stage, the loss module.

Training (``model.train()``): every sample goes through every exit; ``model(x)`` returns
``EENetOutput(logits [E, B, K], conf_logits [E-1, B])`` for ``EENetLoss``.

Inference (``model.eval()``): ``model(x)`` returns ``Prediction(logits [B, K], exit [B], cost [B])``;
each sample leaves at the first exit whose confidence reaches the threshold (Algorithm 1).
``predict(x, mode=...)`` picks how the batch is run: ``compact`` (default: exited samples leave the
batch, later stages compute only the rest), ``mask`` (every exit for every sample, no host
synchronisation) or ``sample`` (one sample at a time, as the thesis's code did).
In ``compact`` mode, ``plan_compaction(x)`` measures where removing rows pays on this device;
at the other exits the exited rows ride along, masked, until the next compaction
(``eefast.compaction``). On a GPU, ``use_cuda_graphs()`` replays each segment (a stage and its
exit) from a CUDA graph per batch-size bucket, so small batches stop paying host time per kernel
(``eefast.graphs``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from eefast import ops, reference
from eefast.compaction import CompactionPlan, measure_compaction, record_deferred_exits
from eefast.exits import ExitBlock
from eefast.flops import count_flops, flop_profile
from eefast.graphs import SegmentGraphs
from eefast.placement import exit_costs, exit_flops, place_exits
from eefast.policies import check_policy

INFERENCE_MODES = ("compact", "mask", "sample")


class EENetOutput(NamedTuple):
    """Training output: every exit for every sample."""

    logits: Tensor  # [E, B, K] class logits of exits 0..N (N = final)
    conf_logits: Tensor  # [E-1, B] confidence logits of the early exits


class Prediction(NamedTuple):
    """Inference output: each sample's prediction from the exit it took."""

    logits: Tensor  # [B, K]
    exit: Tensor  # [B] int64, 0..N
    cost: Tensor  # [B] relative cost c_exit


# Temperatures the max_prob / entropy scores may divide logits by: fit_temperatures searches
# 0.05-20; outside this range a score over- or underflows (to NaN in half precision).
TEMPERATURE_RANGE = (1e-2, 1e2)


def _is_real(value) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _threshold_letting_out(scores: Tensor, leave: int) -> float:
    """A threshold in [0, 1] that the ``leave`` highest of ``scores`` [R] reach (``>=``) and the rest
    do not, where the scores allow: a value of their dtype strictly between the last score in and
    the first one out (0 and 1 bound the ends), else the last one in itself (adjacent floats)."""
    h = scores.nan_to_num(nan=-1.0).sort(descending=True).values  # NaN never leaves
    leave = min(leave, h.numel())
    zero, one = h.new_zeros(()), h.new_ones(())
    low = h[leave].clamp(min=0) if leave < h.numel() else zero  # the first one out (NaN: -1; or the lowest threshold)
    high = h[leave - 1] if leave > 0 else one  # the last one in (or the highest threshold)
    if leave == 0 and bool(low >= one):
        return 1.0  # a saturated score: nothing keeps it in
    if leave == h.numel() and bool(high <= zero):
        return 0.0
    middle = ((low.double() + high.double()) / 2).to(h.dtype)
    return float(middle if low < middle <= high else high)


class EENet(nn.Module):
    """An early-exit network (EENet) over a backbone given as a list of blocks.

    Args:
        blocks: the backbone's blocks in order (any modules); the boundaries between them are
            the candidate exit positions.
        classifier: the backbone's own head on the last block's output (the final exit).
        num_classes: K.
        num_exits: N early exits (0 gives the plain backbone, one exit).
        distribution: exit placement rule (``eefast.placement.DISTRIBUTIONS``).
        exit_type: ``plain``, ``pool`` or ``bnpool``.
        input_shape: [C, H, W] of one input; FLOPs and costs are measured on it.
        threshold: threshold T on the exit score, one for all exits or one per early exit.
        exit_positions: the blocks after which exits sit, overriding ``distribution``.
        policy: what a sample exits on (``eefast.policies``): ``confidence`` (the learned h_n,
            the thesis's rule and the default here), ``max_prob`` (SDN / MSDNet) or ``entropy``
            (BranchyNet); the last two divide the exit's logits by ``exit_temperature[n]``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        classifier: nn.Module,
        num_classes: int,
        num_exits: int = 2,
        distribution: str = "pareto",
        exit_type: str = "pool",
        input_shape: Sequence[int] = (3, 32, 32),
        threshold: float | Sequence[float] = 0.5,
        exit_positions: Sequence[int] | None = None,
        policy: str = "confidence",
    ):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("EENet: expected at least one backbone block, got none")
        if len(input_shape) != 3:
            raise ValueError(f"EENet: expected input_shape [C, H, W], got {list(input_shape)}")
        self.num_classes = num_classes
        self.input_shape = tuple(int(s) for s in input_shape)
        self.exit_type = exit_type
        self.distribution = distribution

        profile = flop_profile(blocks, classifier, self.input_shape)
        if exit_positions is None:
            positions = place_exits(profile, num_exits, distribution)
        else:
            positions = [int(p) for p in exit_positions]
            if len(positions) != num_exits or positions != sorted(set(positions)) or not all(
                0 <= p < len(blocks) - 1 for p in positions
            ):
                raise ValueError(
                    f"EENet: expected {num_exits} distinct increasing exit_positions in [0, {len(blocks) - 1}), "
                    f"got {positions}"
                )
        self.profile = profile
        self.exit_positions = positions

        bounds = [-1, *positions, len(blocks) - 1]
        self.stages = nn.ModuleList(nn.Sequential(*blocks[a + 1 : b + 1]) for a, b in zip(bounds, bounds[1:]))
        exits = []
        for p in positions:
            channels, *spatial = profile.boundary_shapes[p]
            exits.append(ExitBlock(channels, num_classes, exit_type, spatial=spatial if exit_type == "plain" else None))
        self.exits = nn.ModuleList(exits)
        self.classifier = classifier

        head_flops = [count_flops(e, profile.boundary_shapes[p]) for e, p in zip(self.exits, positions)]
        self.head_flops = head_flops
        self.flops = exit_flops(profile, positions, head_flops)  # FLOPs paid to leave at each exit
        self.register_buffer("costs", torch.tensor(exit_costs(profile, positions, head_flops)), persistent=False)
        # per early exit, the softmax temperature of the max_prob / entropy policies (fitted on
        # validation data by eefast.policies.fit_temperatures). Not in state_dict (older state
        # dicts load as they are): eefast's checkpoints carry it, with the policy, beside the state.
        self.register_buffer("exit_temperature", torch.ones(len(positions)), persistent=False)
        self.threshold = threshold
        self.inference_mode = "compact"
        self.compaction_plan: CompactionPlan | None = None  # None: compact at every exit
        self.segment_graphs: SegmentGraphs | None = None  # set by use_cuda_graphs
        self.policy = policy

    # ---- construction from a torchvision ResNet ---------------------------------------------

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_exits: int = 3, **kwargs) -> EENet:
        """An EENet over a classification network cut at its natural block boundaries
        (``eefast.backbones.cut_backbone``: torchvision's ResNet, RegNet, ShuffleNetV2, MNASNet,
        MobileNet, EfficientNet, ConvNeXt, VGG and DenseNet families, or an nn.Sequential).

        The EENet shares the backbone's modules (and weights). ``kwargs`` go to ``EENet``;
        ``num_classes`` defaults to the classifier's outputs and ``input_shape`` to (3, 224, 224).
        """
        from eefast.backbones import cut_backbone

        blocks, classifier, num_classes = cut_backbone(backbone)
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        if "num_classes" not in kwargs:
            raise ValueError(f"EENet.from_backbone: the classifier of {type(backbone).__name__} has no nn.Linear to "
                             "read the number of classes from; give num_classes=")
        kwargs.setdefault("input_shape", (3, 224, 224))
        return cls(blocks, classifier, num_exits=num_exits, **kwargs)

    # ---- thresholds -----------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        """E: the early exits and the final one."""
        return len(self.exits) + 1

    @property
    def threshold(self) -> list[float]:
        """T_n of each early exit."""
        return list(self._threshold)

    @threshold.setter
    def threshold(self, value: float | Sequence[float]) -> None:
        early = len(self.exits)
        if hasattr(value, "tolist"):  # tensors and numpy arrays, 0-d or 1-d
            value = value.tolist()
        elif isinstance(value, Sequence) and not isinstance(value, str):
            value = [v.item() if hasattr(v, "item") else v for v in value]  # [tensor(0.5), ...]
        if _is_real(value):
            values = [float(value)] * early
        elif isinstance(value, (Sequence, Tensor)) and not isinstance(value, str) and all(_is_real(v) for v in value):
            values = [float(v) for v in value]
        else:
            raise TypeError(f"EENet: expected a threshold (a number) or one per early exit, got {value!r}")
        if len(values) != early:
            raise ValueError(f"EENet: expected one threshold or {early} (one per early exit), got {len(values)}")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"EENet: expected thresholds in [0, 1], got {values}")
        self._threshold = values
        self._threshold_tensors: dict[torch.device, Tensor] = {}  # the values on each device mask mode ran on

    @property
    def policy(self) -> str:
        """The exit rule: ``confidence``, ``max_prob`` or ``entropy`` (``eefast.policies``)."""
        return self._policy

    @policy.setter
    def policy(self, value: str) -> None:
        check_policy(value)
        if getattr(self, "_policy", value) != value:
            # captured graphs and a measured compaction plan describe the old rule's exits
            self.compaction_plan = None
            if self.segment_graphs is not None:
                self.segment_graphs = SegmentGraphs(eager=self.segment_graphs.eager)
        self._policy = value

    def set_exit_temperature(self, values: Sequence[float] | Tensor) -> None:
        """Sets the per-exit softmax temperatures in place (CUDA graphs see the new values; a measured
        compaction plan, which holds the old exit mix, is dropped)."""
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        low, high = TEMPERATURE_RANGE
        stored = values.to(self.exit_temperature.dtype)  # what the scores will divide by
        if values.numel() != len(self.exits) or not bool(((stored >= low) & (stored <= high)).all()):
            raise ValueError(f"EENet: expected {len(self.exits)} temperatures in [{low}, {high}] (in the model's "
                             f"{self.exit_temperature.dtype}), got {values.tolist()}")
        if not torch.equal(values, self.exit_temperature.cpu()):
            self.compaction_plan = None
        self.exit_temperature.copy_(values)

    def exit_scores(self, output: EENetOutput) -> Tensor:
        """Every early exit's score under the model's policy, ``[E-1, B]``, from a training-style
        output (``forward_all``): what the thresholds are compared with."""
        return reference.exit_scores(output.logits[:-1], output.conf_logits, self._policy,
                                     self.exit_temperature.view(-1, 1))

    # ---- forward ----------------------------------------------------------------------------

    def check_input(self, x: Tensor) -> None:
        """Raises ValueError / TypeError naming the expected input when ``x`` does not fit."""
        channels, *spatial = self.input_shape
        fixed_size = self.exit_type == "plain"
        if (
            x.dim() != 4
            or x.shape[1] != channels
            or (fixed_size and list(x.shape[2:]) != spatial)
        ):
            size = f"{spatial[0]}, {spatial[1]}" if fixed_size else "H, W"
            raise ValueError(
                f"EENet: expected input of shape [B, {channels}, {size}] (input_shape={self.input_shape}), "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"EENet: expected a floating-point input, got {x.dtype}")
        device = self.costs.device
        if x.device != device:
            raise ValueError(f"EENet: expected the input on {device} (the model's device), got it on {x.device}")
        dtype = self.costs.dtype  # the model's floating-point dtype (.to(dtype) converts the buffer too)
        allowed = {dtype}
        if torch.is_autocast_enabled(x.device.type):  # autocast casts these to its dtype
            allowed |= {torch.get_autocast_dtype(x.device.type), torch.float32}
        if x.dtype not in allowed:
            raise TypeError(f"EENet: expected input of dtype {' or '.join(sorted(str(d) for d in allowed))} (the "
                            f"model's{', or autocast' if len(allowed) > 1 else '; or run under torch.autocast'}), "
                            f"got {x.dtype}")

    def forward(self, x: Tensor) -> EENetOutput | Prediction:
        if self.training:
            return self.forward_all(x)
        return self.predict(x, mode=self.inference_mode)

    def forward_all(self, x: Tensor) -> EENetOutput:
        """Every exit for every sample (training, and the ``mask`` mode)."""
        self.check_input(x)
        logits, conf_logits = [], []
        h = x
        for stage, exit_block in zip(self.stages, self.exits):
            h = stage(h)
            exit_logits, exit_conf = exit_block(h)
            logits.append(exit_logits)
            conf_logits.append(exit_conf)
        logits.append(self.classifier(self.stages[-1](h)))
        return EENetOutput(*_stack_exits(logits, conf_logits))

    def segment(self, n: int, h: Tensor) -> tuple[Tensor, ...]:
        """Segment ``n`` of inference on the running rows ``h``: stage n, then exit n:
        ``(h', score [M], logits [M, K])`` (the policy's score: for ``confidence``, the sigmoid of
        the confidence logit); for the last segment, the last stage and the final classifier:
        ``(logits [M, K],)``."""
        h = self.stages[n](h)
        if n == len(self.exits):
            return (self.classifier(h),)
        logits, conf_logits = self.exits[n](h)
        return h, reference.exit_scores(logits, conf_logits, self._policy, self.exit_temperature[n]), logits

    def run_segment(self, n: int, h: Tensor) -> tuple[Tensor, ...]:
        """``segment(n, h)`` as inference runs it: replayed from a CUDA graph when ``use_cuda_graphs``
        is on (results are then views valid until that graph runs again)."""
        graphs = self.segment_graphs
        if graphs is not None and not self.training and h.shape[0] > 0 and (h.is_cuda or graphs.eager):
            return graphs.run(self, n, h)
        return self.segment(n, h)

    def use_cuda_graphs(self, enabled: bool = True) -> EENet:
        """Runs ``predict`` on CUDA inputs from CUDA graphs, one per segment and batch-size bucket,
        captured on first use (``eefast.graphs``); ``False`` drops them. Moving or casting the model
        drops the captured graphs (they are captured again); in-place parameter updates are seen."""
        if enabled and not torch.cuda.is_available():
            raise RuntimeError("EENet.use_cuda_graphs: CUDA graphs need a CUDA device, and torch sees none")
        self.segment_graphs = SegmentGraphs() if enabled else None
        return self

    def _apply(self, fn, recurse=True):
        if self.segment_graphs is not None:  # the graphs hold the old tensors' addresses
            self.segment_graphs = SegmentGraphs(eager=self.segment_graphs.eager)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def predict(self, x: Tensor, mode: str = "compact", compact_at: Sequence[bool] | None = None) -> Prediction:
        """Early-exit inference (Algorithm 1); every mode gives the same exits and logits. Runs in
        eval mode whatever the model's (batch norm on its running statistics, which stay as they are).

        ``compact_at`` (``compact`` mode only): for each early exit, whether the exited rows leave
        the batch there; by default ``compaction_plan.decide(len(x))``, or every exit without a plan.
        """
        if mode not in INFERENCE_MODES:
            raise ValueError(f"EENet.predict: expected mode in {INFERENCE_MODES}, got {mode!r}")
        self.check_input(x)
        if compact_at is not None:
            if mode != "compact":
                raise ValueError(f"EENet.predict: compact_at applies to mode='compact', got mode={mode!r}")
            compact_at = [bool(c) for c in compact_at]
            if len(compact_at) != len(self.exits):
                raise ValueError(
                    f"EENet.predict: expected compact_at with {len(self.exits)} entries (one per early exit), "
                    f"got {len(compact_at)}"
                )
        if mode == "compact":
            plan = self.compaction_plan
            if compact_at is None and plan is not None:
                stale = plan.mismatch(x.device, self._threshold)
                if stale is None:
                    compact_at = plan.decide(x.shape[0])
                else:
                    warnings.warn(f"EENet: the compaction plan {stale}; compacting at every exit until "
                                  f"plan_compaction is called again", stacklevel=2)
        # Inference always runs in eval mode: in training mode batch norm would normalise each
        # batch (or sample) by its own statistics, update the running ones, and the modes disagree.
        modes = {module: module.training for module in self.modules()} if self.training else None
        if modes:
            self.eval()
        try:
            if mode == "compact":
                logits, exit_index = self._predict_compact(x, compact_at)
            elif mode == "mask":
                logits, exit_index = self._predict_mask(x)
            else:
                logits, exit_index = self._predict_samples(x)
        finally:
            for module, training in (modes or {}).items():  # each module as it was (frozen parts stay frozen)
                module.training = training
        return Prediction(logits, exit_index, self.costs[exit_index])

    def plan_compaction(self, x: Tensor, repeats: int = 3) -> CompactionPlan:
        """Measures this model on the batch ``x`` (its device, dtype, thresholds) and sets
        ``compaction_plan``: ``compact`` mode then compacts only at the exits where it pays.
        A plan measured with other thresholds or on another device warns and is not used (plan again);
        ``compaction_plan = None`` resets."""
        was_training = self.training
        self.eval()
        try:
            self.compaction_plan = measure_compaction(self, x, repeats)
        finally:
            self.train(was_training)
        return self.compaction_plan

    def _predict_compact(self, x: Tensor, compact_at: Sequence[bool] | None) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        # Outputs have one scratch row, ``batch``: rows that exit at a deferring exit take it as
        # their index and ride along until a compaction removes them (writing only the scratch row).
        discard = batch
        index = torch.arange(batch, device=x.device)  # original positions of the running rows
        out_logits = out_exit = None
        riding = False  # rows that exited at a deferring exit are in the batch
        h = x
        for n in range(len(self.exits)):
            h, confidence, logits = self.run_segment(n, h)
            if out_logits is None:
                out_logits = logits.new_empty(batch + 1, self.num_classes)
                out_exit = torch.full((batch + 1,), -1, dtype=torch.int64, device=x.device)
            if compact_at is not None and not compact_at[n]:
                index = record_deferred_exits(logits, confidence, index, self._threshold[n], n, out_logits, out_exit)
                riding = True
                continue
            if riding:  # the rows that left earlier leave the batch now (confidence 1 >= any threshold)
                confidence = confidence.masked_fill(index == discard, 1.0)
                riding = False
            h, index = ops.compact_exits(
                h, logits.to(out_logits.dtype), confidence, index, self._threshold[n], n, out_logits, out_exit,
            )
            if h.shape[0] == 0:  # everyone has left
                return out_logits[:batch], out_exit[:batch]
        (logits,) = self.run_segment(len(self.exits), h)
        if out_logits is None:  # no early exits: the plain backbone
            return logits, torch.full((batch,), 0, dtype=torch.int64, device=x.device)
        out_logits.index_copy_(0, index, logits.to(out_logits.dtype))  # riding rows write the scratch row
        out_exit.index_fill_(0, index, len(self.exits))
        return out_logits[:batch], out_exit[:batch]

    def _predict_mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, confidence, logits = x, [], []
        for n in range(len(self.exits)):
            h, exit_confidence, exit_logits = self.run_segment(n, h)
            confidence.append(exit_confidence)
            logits.append(exit_logits)
        logits.append(self.run_segment(len(self.exits), h)[0])
        logits, confidence = _stack_exits(logits, confidence)
        thresholds = self._threshold_tensors.get(x.device)
        if thresholds is None:  # copied once per device and setting, not on every call (a host sync on GPUs)
            thresholds = self._threshold_tensors[x.device] = torch.tensor(self._threshold, device=x.device)
        exit_index = reference.first_confident_exit(confidence, thresholds)
        return logits[exit_index, torch.arange(x.shape[0], device=x.device)], exit_index

    def _predict_samples(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs, exits = [], []
        for i in range(x.shape[0]):
            h = x[i : i + 1]
            for n in range(len(self.exits)):
                h, score, logits = self.segment(n, h)
                if bool(score[0] >= self._threshold[n]):
                    break
            else:
                n, (logits,) = len(self.exits), self.segment(len(self.exits), h)
            outputs.append(logits)
            exits.append(n)
        dtype = outputs[-1].dtype if outputs else x.dtype
        logits = torch.cat([o.to(dtype) for o in outputs]) if outputs else x.new_empty(0, self.num_classes)
        return logits, torch.tensor(exits, dtype=torch.int64, device=x.device)

    # ---- threshold calibration ---------------------------------------------------------------

    @torch.no_grad()
    def thresholds_for_fractions(self, x: Tensor, fractions: Sequence[float]) -> list[float]:
        """Per-exit thresholds under which the given fractions of ``x`` leave at exits 0..N-1.

        Each threshold lies between two scores of the batch (midway where their dtype has a value
        there), so float rounding cannot flip a decision; the rest leaves at the final exit. Where
        scores tie, are NaN or saturate at 1.0, no threshold gives the fraction: a warning says how
        many leave. Used to set a controlled exit mix in tests and benchmarks.
        """
        if len(fractions) != len(self.exits) or not all(_is_real(f) and 0 <= f <= 1 for f in fractions) \
                or sum(fractions) > 1 + 1e-9:
            raise ValueError(
                f"EENet: expected {len(self.exits)} fractions >= 0 summing to at most 1, got {list(fractions)}"
            )
        was_training = self.training
        self.eval()
        try:
            scores = self.exit_scores(self.forward_all(x))  # [N, B] in the model's dtype
        finally:
            self.train(was_training)
        batch = x.shape[0]
        remaining = torch.ones(batch, dtype=torch.bool, device=x.device)
        thresholds = []
        for n, fraction in enumerate(fractions):
            threshold = _threshold_letting_out(scores[n][remaining], round(fraction * batch))
            leaving = remaining & (scores[n] >= threshold)  # as inference compares: in the scores' dtype
            if int(leaving.sum()) != min(round(fraction * batch), int(remaining.sum())):
                warnings.warn(f"thresholds_for_fractions: exit {n}: {round(fraction * batch)} of {batch} samples asked "
                              f"to leave, {int(leaving.sum())} do (their scores tie, are NaN, or saturate at 1)",
                              stacklevel=3)  # the caller, past torch.no_grad's wrapper
            thresholds.append(threshold)
            remaining &= ~leaving
        return thresholds

    def extra_repr(self) -> str:
        costs = ", ".join(f"{c:.3f}" for c in self.costs.tolist())
        return (
            f"exits after blocks {self.exit_positions}, exit_type={self.exit_type!r}, costs=[{costs}], "
            f"threshold={self._threshold}, policy={self._policy!r}"
        )


def _stack_exits(logits: list[Tensor], scores: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(logits [E, B, K] in the final exit's dtype, scores [E-1, B]) from the per-exit lists (the
    scores: confidences or confidence logits of the early exits, [0, B] without any)."""
    final = logits[-1]
    stacked = torch.stack([t.to(final.dtype) for t in logits])
    return stacked, torch.stack(scores) if scores else final.new_empty((0, final.shape[0]))


class EENetLoss(nn.Module):
    """The EENet training loss (``v1``, ``v2`` (default), ``mc``, ``cost``) with trade-off ``lam``,
    and the terms of eefast's training recipe on top of it.

    ``loss(output, target, costs)`` with ``output`` from ``model.train(); model(x)`` and
    ``costs = model.costs``:

        loss = thesis(version, lam)                        (Eqs. 10-11; on detached class
                                                            logits if confidence_only)
             + exit_weight * sum_n CE(y, y_n)              (each exit's own classifier)
             + distill * sum_{n<N} KD(y_N -> y_n, T)       (the final exit as teacher)

    With the defaults (``exit_weight=0, distill=0, confidence_only=False``) it is the thesis's
    loss exactly. ``confidence_only`` lets the thesis's terms train the confidence heads alone,
    so the cost term cannot pull the classifiers or the shared features. ``impl`` picks the
    implementation of the thesis's terms (see eefast.ops.choose_impl).
    """

    def __init__(self, lam: float = 1.0, version: str = "v2", impl: str | None = None, *,
                 exit_weight: float = 0.0, distill: float = 0.0, distill_temperature: float = 3.0,
                 confidence_only: bool = False):
        super().__init__()
        if version not in reference.LOSS_VERSIONS:
            raise ValueError(f"EENetLoss: expected version in {reference.LOSS_VERSIONS}, got {version!r}")
        for name, value in (("lam", lam), ("exit_weight", exit_weight), ("distill", distill)):
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"EENetLoss: expected a finite {name} >= 0, got {value}")
        if not (distill_temperature > 0 and distill_temperature < float("inf")):
            raise ValueError(f"EENetLoss: expected a finite distill_temperature > 0, got {distill_temperature}")
        if confidence_only and not (exit_weight or distill):
            raise ValueError("EENetLoss: confidence_only keeps the thesis's terms off the classifiers, and with "
                             f"exit_weight={exit_weight} and distill={distill} no loss term would train the classifiers")
        self.lam = lam
        self.version = version
        self.impl = impl  # None: eefast.ops chooses (Triton on CUDA tensors)
        self.exit_weight = exit_weight
        self.distill = distill
        self.distill_temperature = distill_temperature
        self.confidence_only = confidence_only

    def forward(self, output: EENetOutput, target: Tensor, costs: Tensor) -> Tensor:
        if self._thesis_only:
            return ops.eenet_loss(output.logits, output.conf_logits, target, costs, self.lam, self.version,
                                  impl=self.impl)
        return self.terms(output, target, costs)[0]

    def terms(self, output: EENetOutput, target: Tensor, costs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, accuracy term, cost term)`` from one computation of the per-exit parts; the terms
        (before lam, detached) are CE and mean C of exit 0 for v1, their sums over the exits otherwise."""
        logits = output.logits.detach() if self.confidence_only else output.logits
        ce, cost = ops.eenet_loss_parts(logits, output.conf_logits, target, costs, impl=self.impl)
        loss = reference.combine_loss_parts(ce, cost, self.lam, self.version)
        if self.exit_weight:
            loss = loss + self.exit_weight * reference.exit_cross_entropy(output.logits, target).sum()
        if self.distill and output.logits.shape[0] > 1:
            loss = loss + self.distill * reference.distillation_loss(output.logits, self.distill_temperature).sum()
        ce_term, cost_term = (ce[0], cost[0]) if self.version == "v1" else (ce.sum(), cost.sum())
        return loss, ce_term.detach(), cost_term.detach()

    @property
    def _thesis_only(self) -> bool:
        return not (self.exit_weight or self.distill or self.confidence_only)

    def extra_repr(self) -> str:
        extra = "" if self._thesis_only else (
            f", exit_weight={self.exit_weight}, distill={self.distill}, "
            f"distill_temperature={self.distill_temperature}, confidence_only={self.confidence_only}")
        return f"lam={self.lam}, version={self.version!r}{extra}"
