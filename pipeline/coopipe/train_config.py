"""The training protocol's data: :class:`TrainConfig` (CoOp's and CoCoOp's reference settings), the per-epoch and
resume records, and the per-epoch random draws (views, batches) every run makes from its own generator.

Why a module of its own: the training loop (:mod:`coopipe.loop`, :mod:`coopipe.stacked`, :mod:`coopipe.train`),
checkpoints and the sweep all read these types; keeping them apart from the loop keeps each file one job.

The protocol follows CoOp's reference configs (Dassl trainer): SGD (lr 0.002, momentum 0.9, weight decay 5e-4,
batch 32, the last incomplete batch dropped when there are at least 32 images), the first epoch at a constant
lr of 1e-5, then cosine decay per epoch. The schedule is a pure function of the epoch (:meth:`TrainConfig.lr_at`)
reproducing Dassl's ``ConstantWarmupScheduler`` wrapped around ``CosineAnnealingLR(T_max=max_epoch)`` stepped
once per epoch, so resuming needs no scheduler object, only the epoch number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coopipe.errors import DatasetError, ParamsError, ProvenanceMismatchError, StoreError
from coopipe.methods import MethodSpec, Optimization, get_method, method_names
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "VIEW_POLICIES",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "batch_slices",
    "check_features",
    "derive_seed",
    "draw_views",
    "train_option_names",
]

VIEW_POLICIES = ("augmented", "center", "all")
MEMORY_OPTIONS = ("class_chunk", "checkpoint_chunks")  # change memory, never a number: a resume may change them
# options added after runs were recorded, whose default is what every run recorded before them did: a record
# without them is read with the default (a run from before model selection kept its last epoch)
ADDED_OPTIONS = ("select_every",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (defaults: CoOp's protocol for 16 shots, M = 16).

    ``method`` is the method and its options (:class:`coopipe.methods.MethodSpec`); :meth:`for_method` fills in
    its paper setting (epochs by shots, batch size). ``views``: ``augmented`` draws one of the cached augmented
    views (1..V-1) per image per epoch (the centre view when the store has none), ``center`` always uses view 0,
    ``all`` draws among every view. Text-path options (``cut``, ``share_prefix``, ``class_chunk``, ``checkpoint_chunks``, ``autocast_bf16`` and,
    for CoCoOp, ``image_chunk``: images per text-tower chunk) only change speed and memory, never the result
    beyond float rounding (bf16 excepted). ``select_every``: 0 keeps the last epoch (the papers' protocol); N
    scores the learner on the few-shot validation split every N epochs (and after the last) and keeps the epoch
    of best validation accuracy (:mod:`coopipe.selection`); it needs a validation split, never the test split.
    """

    max_epoch: int = 200
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    drop_last: bool = True
    warmup_epoch: int = 1
    warmup_lr: float = 1e-5
    method: MethodSpec = MethodSpec()
    seed: int = 1
    views: str = "augmented"
    cut: bool = True
    share_prefix: bool = True
    class_chunk: int | None = None
    checkpoint_chunks: bool = False
    autocast_bf16: bool = False
    image_chunk: int | None = 32
    select_every: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.method, MethodSpec):
            problems.append(f"method must be a MethodSpec (got {self.method!r})")
        if self.image_chunk is not None and self.image_chunk < 1:
            problems.append(f"image_chunk must be >= 1 or None (got {self.image_chunk})")
        trains = not isinstance(self.method, MethodSpec) or self.method.definition.trains
        if trains and self.max_epoch < 1:
            problems.append(f"max_epoch must be >= 1 (got {self.max_epoch})")
        if not trains and (self.max_epoch != 0 or self.warmup_epoch != 0):
            problems.append(f"{self.method.method} trains nothing (its fit is computed once from the few-shot data): "
                            f"max_epoch and warmup_epoch must be 0 (got {self.max_epoch}, {self.warmup_epoch})")
        if self.lr <= 0 or self.warmup_lr < 0:
            problems.append(f"lr must be > 0 and warmup_lr >= 0 (got {self.lr}, {self.warmup_lr})")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            problems.append(
                f"momentum must lie in [0, 1) and weight_decay be >= 0 (got {self.momentum}, {self.weight_decay})"
            )
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not 0 <= self.warmup_epoch <= self.max_epoch:
            problems.append(f"warmup_epoch must lie in [0, max_epoch] (got {self.warmup_epoch})")
        if self.views not in VIEW_POLICIES:
            problems.append(f"views must be one of {VIEW_POLICIES} (got {self.views!r})")
        if self.class_chunk is not None and self.class_chunk < 1:
            problems.append(f"class_chunk must be >= 1 or None (got {self.class_chunk})")
        if isinstance(self.select_every, bool) or not isinstance(self.select_every, int) or self.select_every < 0:
            problems.append(f"select_every must be 0 (keep the last epoch) or a number of epochs >= 1 "
                            f"(got {self.select_every!r})")
        elif self.select_every and not trains:
            problems.append(f"{self.method.method} trains nothing, so there is no epoch to select: select_every "
                            f"must be 0 (got {self.select_every})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer (got {self.seed!r})")
        if problems:
            raise ParamsError("invalid training config: " + "; ".join(problems))

    @classmethod
    def for_method(
        cls, method: str | MethodSpec, shots: int, dataset: str | None = None, **overrides: Any
    ) -> TrainConfig:
        """The paper's setting of ``method`` (a spec, or a label such as ``rank_b5``) for ``shots``: its epochs,
        batch size and other departures from CoOp's protocol (:meth:`coopipe.methods.Method.train_setting`).
        ``overrides`` are training options and method options (``n_ctx``, ``csc``, ...: they change the method's);
        ``None`` values keep the setting. A method option the method lacks is an error."""
        spec = MethodSpec.parse(method) if isinstance(method, str) else method
        given = {k: v for k, v in overrides.items() if v is not None}
        own = {f.name for f in dataclasses.fields(cls)}
        spec = spec.with_options(**{k: v for k, v in given.items() if k not in own})
        defaults = get_method(spec.method).train_setting(shots, dataset)
        unknown = sorted(set(defaults) - own)
        if unknown:
            raise ParamsError(f"method {spec.method} sets unknown training option(s) {', '.join(unknown)}")
        return cls(**{**defaults, **{k: v for k, v in given.items() if k in own}, "method": spec})

    def optimization(self) -> Optimization:
        return Optimization(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "method": self.method.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamsError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        if "method" in values:
            values["method"] = MethodSpec.from_dict(values["method"])
        return cls(**values)

    def result_differences(self, other: TrainConfig) -> list[str]:
        """The options that change a run's result and differ between the two configs: a resume refuses those
        (the memory-only ``class_chunk`` and ``checkpoint_chunks`` may change)."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in MEMORY_OPTIONS and getattr(self, f.name) != getattr(other, f.name)]

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) ``epoch``: ``warmup_lr`` for the warm-up epochs, then cosine from ``lr``.

        Equals Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=max_epoch)) stepped once per epoch: the
        cosine restarts its count after the warm-up, so the last epoch's lr is slightly above 0, as in CoOp.
        """
        if epoch < self.warmup_epoch:
            return self.warmup_lr
        t = epoch - self.warmup_epoch
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * t / max(self.max_epoch, 1)))  # 0 epochs: trains nothing

    def text_encoder(self, clip: LoadedClip) -> PromptTextEncoder:
        """The text encoder with this config's text-path options."""
        return PromptTextEncoder(
            clip,
            cut=self.cut,
            share_prefix=self.share_prefix,
            class_chunk=self.class_chunk,
            checkpoint_chunks=self.checkpoint_chunks,
            autocast_bf16=self.autocast_bf16,
        )



@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did; ``epoch`` counts completed epochs (1 = the first). Accuracies are fractions."""

    epoch: int
    lr: float
    loss: float
    train_acc: float
    val_acc: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpochRecord:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class TrainState:
    """Everything needed to continue training after ``epoch`` completed epochs (CPU tensors), whatever the method.

    ``params``: every learner parameter by name (``ctx``, ``meta_net.linear1.weight``, ``rank_embeds``, ...);
    ``optimizer``: the optimiser's per-parameter state as ``<parameter>.<key>`` (SGD: ``ctx.momentum_buffer``;
    Adam: ``.step``, ``.exp_avg``, ``.exp_avg_sq``), empty before the first step; ``variant``: the learner's
    record, so that a state is checked against the learner it is loaded into; ``frozen``: the parameters the
    optimiser does not move (what a method computed from the data, e.g. zero-shot class weights, a feature cache),
    stored with the others but holding no optimiser state.
    """

    epoch: int
    params: dict[str, torch.Tensor]
    generator_state: torch.Tensor  # uint8, torch.Generator.get_state() of the data generator
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    variant: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()

    @property
    def ctx(self) -> torch.Tensor:
        """The learned context (prompt methods)."""
        return self.params["ctx"]

    @property
    def momentum(self) -> dict[str, torch.Tensor]:
        """SGD's momentum buffers by parameter name."""
        suffix = ".momentum_buffer"
        return {k[: -len(suffix)]: v for k, v in self.optimizer.items() if k.endswith(suffix)}

    @property
    def momentum_buffer(self) -> torch.Tensor | None:
        """The context's SGD momentum buffer (None before the first step)."""
        return self.momentum.get("ctx")


@dataclass
class TrainResult:
    """A finished (or stopped) run: its final state, per-epoch history and exported classifier."""

    history: list[EpochRecord]
    state: TrainState
    text_features: torch.Tensor | None  # (n_cls, embed_dim) final classifier, CPU float32; None for CoCoOp
    logit_scale: float  # CLIP's log scale (logits = exp(logit_scale) * cosine)
    variant: dict[str, Any]
    seconds: float
    setup_seconds: float = 0.0  # building the learner and the method's prepare (its last start): coopipe.cost
    selection: dict[str, Any] | None = None  # the epoch model selection kept and on what (coopipe.selection)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by name: what :func:`coopipe.learners.restore_learner` loads."""
        return self.state.params

    @property
    def ctx(self) -> torch.Tensor:
        return self.state.ctx

    @property
    def epochs_done(self) -> int:
        return self.state.epoch

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].val_acc if self.history else None


def train_option_names() -> set[str]:
    """Every training option a user may set (params.yaml ``train``, ``--train-args``): TrainConfig's fields and
    every registered method's options."""
    from_methods = {f.name for name in method_names() for f in dataclasses.fields(get_method(name).options)}
    return {f.name for f in dataclasses.fields(TrainConfig)} | from_methods


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one independent random stream (``purpose``) of a run seeded with ``seed``."""
    digest = hashlib.sha256(f"coopipe:{purpose}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_views(n_images: int, n_views: int, policy: str, generator: torch.Generator) -> torch.Tensor:
    """One stored view per image for this epoch: (N,) int64 view indices.

    ``augmented``: uniform over views 1..V-1 (view 0 when V == 1); ``center``: all 0; ``all``: uniform over 0..V-1.
    ``generator`` advances only when there is a choice (V > 1 and not ``center``).
    """
    if policy == "center" or n_views == 1:
        return torch.zeros(n_images, dtype=torch.long)
    if policy == "augmented":
        return 1 + torch.randint(n_views - 1, (n_images,), generator=generator)
    return torch.randint(n_views, (n_images,), generator=generator)


def batch_slices(n_images: int, batch_size: int, drop_last: bool) -> list[slice]:
    """Batches of a shuffled epoch; like Dassl, the incomplete last batch is dropped only if N >= batch_size."""
    stop = n_images - n_images % batch_size if drop_last and n_images >= batch_size else n_images
    return [slice(i, min(i + batch_size, stop)) for i in range(0, stop, batch_size)]


def _as_tensor(x: torch.Tensor | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).to(dtype)


def check_features(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    n_classes: int,
    dim: int,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert features (N, V, D) or (N, D) and labels (N,); raise a coopipe error naming ``what``."""
    feats = _as_tensor(features, torch.float32)
    y = _as_tensor(labels, torch.long).reshape(-1)
    if feats.ndim not in (2, 3):
        raise StoreError(f"{what} features must be (N, D) or (N, V, D), got shape {tuple(feats.shape)}")
    if feats.shape[-1] != dim:
        raise ProvenanceMismatchError(
            f"{what} features have dimension {feats.shape[-1]} but the model's embedding has {dim}: they come "
            f"from another model; use a store encoded with this model"
        )
    if feats.shape[0] != y.shape[0]:
        raise StoreError(f"{what}: {feats.shape[0]} feature rows but {y.shape[0]} labels")
    if feats.shape[0] == 0:
        raise DatasetError(f"{what}: no images")
    if not torch.isfinite(feats).all():
        raise StoreError(f"{what} features hold NaN/inf values; delete the store and re-encode (fp32 precision)")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise DatasetError(
            f"{what} labels must lie in 0..{n_classes - 1} for {n_classes} class names, found "
            f"{int(y.min())}..{int(y.max())}; the class list does not belong to these features"
        )
    return feats, y
