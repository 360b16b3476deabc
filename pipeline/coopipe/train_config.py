"""The training protocol's data: :class:`TrainConfig` (CoOp's and CoCoOp's reference settings), the per-epoch and
resume records, and the per-epoch random draws (views, batches) every run makes from its own generator.

Why a module of its own: the training loop (:mod:`coopipe.stepper`, :mod:`coopipe.stacked`, :mod:`coopipe.train`),
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coopipe.errors import DatasetError, ParamsError, ProvenanceMismatchError, StoreError
from coopipe.learners import Learner, build_learner
from coopipe.method import METHODS, MethodSpec
from coopipe.models import LoadedClip
from coopipe.prompt import CLASS_TOKEN_POSITIONS
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "COCOOP_BATCH_SIZE",
    "COCOOP_EPOCHS",
    "EPOCHS_BY_SHOTS",
    "IMAGENET_EPOCHS",
    "VIEW_POLICIES",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "batch_slices",
    "check_features",
    "derive_seed",
    "draw_views",
    "epochs_for",
]

EPOCHS_BY_SHOTS: dict[int, int] = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp's configs
IMAGENET_EPOCHS = 50  # CoOp trains ImageNet for 50 epochs at every number of shots
VIEW_POLICIES = ("augmented", "center", "all")
COCOOP_EPOCHS = 10  # CoCoOp's vit_b16_c4_ep10_batch1_ctxv1, at every number of shots
COCOOP_BATCH_SIZE = 1


def epochs_for(shots: int, dataset: str | None = None) -> int:
    """CoOp's number of epochs for ``shots`` images per class: 50 / 100 / 100 / 200 / 200; ImageNet 50.

    Shots between the listed values take the value of the next smaller listed one (e.g. 3 -> 100, 32 -> 200).
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ParamsError(f"shots must be a positive integer (CoOp uses 1, 2, 4, 8, 16), got {shots!r}")
    if dataset is not None and dataset.lower() == "imagenet":
        return IMAGENET_EPOCHS
    return EPOCHS_BY_SHOTS[max(k for k in EPOCHS_BY_SHOTS if k <= shots)]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a CoOp training run (defaults: CoOp's protocol for 16 shots, M = 16).

    ``views``: ``augmented`` draws one of the cached augmented views (1..V-1) per image per epoch (the centre
    view when the store has none), ``center`` always uses view 0, ``all`` draws among every view.
    ``method`` picks the learner (``coop``, ``cocoop``); with the variant fields it forms :meth:`method_spec`.
    Text-path options (``cut``, ``share_prefix``, ``class_chunk``, ``checkpoint_chunks``, ``autocast_bf16`` and,
    for CoCoOp, ``image_chunk``: images per text-tower chunk) only change speed and memory, never the result
    beyond float rounding (bf16 excepted).
    """

    max_epoch: int = 200
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    drop_last: bool = True
    warmup_epoch: int = 1
    warmup_lr: float = 1e-5
    n_ctx: int = 16
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"
    seed: int = 1
    views: str = "augmented"
    cut: bool = True
    share_prefix: bool = True
    class_chunk: int | None = None
    checkpoint_chunks: bool = False
    autocast_bf16: bool = False
    method: str = "coop"
    image_chunk: int | None = 32

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS} (got {self.method!r})")
        elif self.method != "coop" and (self.csc or self.class_token_position != "end"):
            problems.append(f"{self.method} supports only a unified context with the class token at the end")
        if self.image_chunk is not None and self.image_chunk < 1:
            problems.append(f"image_chunk must be >= 1 or None (got {self.image_chunk})")
        if self.max_epoch < 1:
            problems.append(f"max_epoch must be >= 1 (got {self.max_epoch})")
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
        if self.n_ctx < 1:
            problems.append(f"n_ctx must be >= 1 (got {self.n_ctx})")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            problems.append(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS} (got {self.class_token_position!r})"
            )
        if self.views not in VIEW_POLICIES:
            problems.append(f"views must be one of {VIEW_POLICIES} (got {self.views!r})")
        if self.class_chunk is not None and self.class_chunk < 1:
            problems.append(f"class_chunk must be >= 1 or None (got {self.class_chunk})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer (got {self.seed!r})")
        if problems:
            raise ParamsError("invalid training config: " + "; ".join(problems))

    @classmethod
    def for_shots(cls, shots: int, dataset: str | None = None, **overrides: Any) -> TrainConfig:
        """The reference config for ``shots`` (epochs from :func:`epochs_for`), with ``overrides`` applied."""
        overrides.setdefault("max_epoch", epochs_for(shots, dataset))
        return cls(**overrides)

    @classmethod
    def for_method(cls, method: str, shots: int, dataset: str | None = None, **overrides: Any) -> TrainConfig:
        """The reference config of ``method`` for ``shots``: CoOp as :meth:`for_shots`; CoCoOp M = 4 from
        "a photo of a", 10 epochs, batch 1 (``overrides`` win)."""
        if method == "cocoop":
            spec = MethodSpec.default("cocoop")
            epochs_for(shots, dataset)  # validates shots
            defaults = {"max_epoch": COCOOP_EPOCHS, "batch_size": COCOOP_BATCH_SIZE, "n_ctx": spec.n_ctx,
                        "ctx_init": None if "n_ctx" in overrides else spec.ctx_init}  # an explicit M: random init
            return cls(**{**defaults, **overrides, "method": "cocoop"})
        return cls.for_shots(shots, dataset, **{**overrides, "method": method})

    def method_spec(self) -> MethodSpec:
        """The prompt method and variant this config trains."""
        return MethodSpec(
            method=self.method,
            n_ctx=self.n_ctx,
            ctx_init=self.ctx_init,
            csc=self.csc,
            class_token_position=self.class_token_position,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamsError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) ``epoch``: ``warmup_lr`` for the warm-up epochs, then cosine from ``lr``.

        Equals Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=max_epoch)) stepped once per epoch: the
        cosine restarts its count after the warm-up, so the last epoch's lr is slightly above 0, as in CoOp.
        """
        if epoch < self.warmup_epoch:
            return self.warmup_lr
        t = epoch - self.warmup_epoch
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * t / self.max_epoch))

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

    def prompt_learner(
        self, clip: LoadedClip, classnames: Sequence[str], *, generator: torch.Generator | None = None
    ) -> Learner:
        """A fresh learner for this config's method and variant (context drawn with ``generator``)."""
        return build_learner(self.method_spec(), clip, classnames, generator=generator)


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
    """Everything needed to continue training after ``epoch`` completed epochs (CPU tensors).

    ``variant`` is the prompt learner's configuration (n_ctx, ctx_init, csc, class_token_position; ``method``
    for methods other than CoOp) so a state can be checked against the learner it is loaded into. ``params``
    holds the learner's parameters other than ``ctx`` by name (CoCoOp: the Meta-Net's), ``momentum`` their SGD
    momentum buffers (empty for CoOp).
    """

    epoch: int
    ctx: torch.Tensor  # (n_ctx, width) or (n_cls, n_ctx, width)
    momentum_buffer: torch.Tensor | None  # same shape as ctx; None before the first optimiser step
    generator_state: torch.Tensor  # uint8, torch.Generator.get_state() of the data generator
    history: list[EpochRecord] = field(default_factory=list)
    variant: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainResult:
    """A finished (or stopped) run: the learned context, per-epoch history and the final state."""

    ctx: torch.Tensor  # (n_ctx, width) or (n_cls, n_ctx, width), CPU
    history: list[EpochRecord]
    state: TrainState
    text_features: torch.Tensor | None  # (n_cls, embed_dim) final classifier, CPU float32; None for CoCoOp
    logit_scale: float  # CLIP's log scale (logits = exp(logit_scale) * cosine)
    variant: dict[str, Any]
    seconds: float
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # the learner's other parameters (Meta-Net)

    def learner_tensors(self) -> dict[str, torch.Tensor]:
        """``ctx`` and every other trained tensor by name: what :func:`coopipe.learners.restore_learner` loads."""
        return {"ctx": self.ctx, **self.params}

    @property
    def epochs_done(self) -> int:
        return self.state.epoch

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].val_acc if self.history else None


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
