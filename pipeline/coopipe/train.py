"""Prompt training against cached image features (CoOp, CoCoOp): only the prompt moves, through the frozen text tower.

Why it can work from a cache: the image encoder is frozen, so each image's feature for a given view is a
constant. Training therefore reads ``(N, V, D)`` stored features (view 0 = centre crop, views 1.. = cached
random-resized-crop + flip views) and, every epoch, draws one augmented view per image, which keeps the
reference's augmentation as far as the cache allows (a centre-only cache trains on the centre view).

The protocol follows CoOp's reference configs (Dassl trainer): SGD (lr 0.002, momentum 0.9, weight decay 5e-4,
batch 32, the last incomplete batch dropped when there are at least 32 images), the first epoch at a constant
lr of 1e-5, then cosine decay per epoch. The schedule is a pure function of the epoch (:meth:`TrainConfig.lr_at`)
reproducing Dassl's ``ConstantWarmupScheduler`` wrapped around ``CosineAnnealingLR(T_max=max_epoch)`` stepped
once per epoch, so resuming needs no scheduler object, only the epoch number.

One loop trains every method (:func:`train_prompt`; ``train_coop`` is the same function): the learner comes from
:func:`coopipe.learners.build_learner` for :meth:`TrainConfig.method_spec` and the optimiser moves all its
parameters. Image-independent learners (CoOp) run one text pass per step that serves the whole batch;
image-conditional ones (CoCoOp) run the batched B x K text path of :mod:`coopipe.cocoop_text` on each step's
images, the Meta-Net seeing the feature of the view drawn for that image this epoch. CoCoOp's reference setting
(:meth:`TrainConfig.for_method`): M = 4 from "a photo of a", 10 epochs, batch 1, the same SGD and schedule; a
batch above 1 is a departure from the paper (fewer, averaged steps), offered for speed.

Determinism: all randomness comes from two explicit ``torch.Generator`` objects derived from ``config.seed``
(one initialises the context, one draws views and batch order), so the same seed gives the identical context on
the CPU. Resuming from a :class:`TrainState` (context and the learner's other parameters, every momentum buffer,
generator state, epoch) gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coopipe.errors import CheckpointError, DatasetError, ParamsError, ProvenanceMismatchError, StoreError
from coopipe.learners import Learner, build_learner, is_image_conditional, predict_logits
from coopipe.method import METHODS, MethodSpec
from coopipe.models import LoadedClip
from coopipe.prompt import CLASS_TOKEN_POSITIONS
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.text_tower import resolve_text_tower

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
    "text_features_for",
    "train_coop",
    "train_prompt",
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


def _momentum_buffer(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    buf = optimizer.state.get(param, {}).get("momentum_buffer")
    return None if buf is None else buf.detach().cpu().clone()


def _other_params(learner: Learner) -> dict[str, nn.Parameter]:
    """The learner's trainable parameters other than ``ctx``, by name (CoCoOp: the Meta-Net's; CoOp: none)."""
    return {name: p for name, p in learner.named_parameters() if name != "ctx"}


def _snapshot(
    epoch: int,
    learner: Learner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[EpochRecord],
) -> TrainState:
    others = _other_params(learner)
    momentum = {name: _momentum_buffer(optimizer, p) for name, p in others.items()}
    return TrainState(
        epoch=epoch,
        ctx=learner.ctx.detach().cpu().clone(),
        momentum_buffer=_momentum_buffer(optimizer, learner.ctx),
        generator_state=generator.get_state().clone(),
        history=list(history),
        variant=_variant(learner),
        params={name: p.detach().cpu().clone() for name, p in others.items()},
        momentum={name: buf for name, buf in momentum.items() if buf is not None},
    )


def _variant(learner: Learner) -> dict[str, Any]:
    return {k: v for k, v in learner.config().items() if k != "classnames"}


def _restore(
    state: TrainState,
    learner: Learner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    max_epoch: int,
) -> None:
    variant = _variant(learner)
    if state.variant and state.variant != variant:
        raise CheckpointError(
            f"cannot resume: the saved state is for prompt variant {state.variant}, this run builds {variant}; "
            f"resume with the checkpoint's method/n_ctx/ctx_init/csc/class_token_position or start a new run"
        )
    if tuple(state.ctx.shape) != tuple(learner.ctx.shape):
        raise CheckpointError(
            f"cannot resume: saved context has shape {tuple(state.ctx.shape)}, this run needs "
            f"{tuple(learner.ctx.shape)} (another class list or variant); start a new run"
        )
    others = _other_params(learner)
    if set(state.params) != set(others):
        raise CheckpointError(
            f"cannot resume: the saved state holds parameters {sorted(state.params)}, this learner has "
            f"{sorted(others)}; resume with the checkpoint's method or start a new run"
        )
    for name, param in others.items():
        if tuple(state.params[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"cannot resume: saved {name} has shape {tuple(state.params[name].shape)}, this run needs "
                f"{tuple(param.shape)} (another model); start a new run"
            )
    if not 0 <= state.epoch <= max_epoch:
        raise CheckpointError(f"cannot resume: saved state is at epoch {state.epoch} of a {max_epoch}-epoch run")
    with torch.no_grad():
        learner.ctx.copy_(state.ctx.to(learner.ctx.device, learner.ctx.dtype))
        for name, param in others.items():
            param.copy_(state.params[name].to(param.device, param.dtype))
    buffers = {"ctx": state.momentum_buffer, **state.momentum}
    for name, param in {"ctx": learner.ctx, **others}.items():
        buffer = buffers.get(name)
        if buffer is not None:
            optimizer.state[param]["momentum_buffer"] = buffer.to(param.device, param.dtype).clone()
    generator.set_state(state.generator_state.clone())


def train_prompt(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    clip: LoadedClip,
    classnames: Sequence[str],
    config: TrainConfig = TrainConfig(),
    *,
    val_feats: torch.Tensor | np.ndarray | None = None,
    val_labels: torch.Tensor | np.ndarray | None = None,
    on_epoch: Callable[[EpochRecord, TrainState], None] | None = None,
    resume_state: TrainState | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Learn the prompt of ``config.method`` (CoOp context; CoCoOp context and Meta-Net) from cached features.

    ``train_feats``: raw (un-normalised) features (N, V, D) (or (N, D) = one view); ``train_labels``: (N,).
    ``val_feats``/``val_labels``: optional (M, D) or (M, V, D) (view 0 is used) for a per-epoch validation
    accuracy; the result is always the last epoch's prompt, as in CoOp and CoCoOp. ``on_epoch(record, state)`` is
    called after every epoch (progress bars, logging, checkpointing ``state``). ``resume_state`` continues a run;
    ``stop_after`` stops once that many epochs are complete (the schedule still spans ``config.max_epoch``).
    Computation runs on the device of ``clip``'s weights.
    """
    started = time.perf_counter()
    learner_device = resolve_text_tower(clip.model).device
    names = list(classnames)
    feats, labels = check_features(train_feats, train_labels, n_classes=len(names), dim=clip.embed_dim, what="training")
    if feats.ndim == 2:
        feats = feats.unsqueeze(1)  # (N, 1, D)
    feats, labels = feats.to(learner_device), labels.to(learner_device)
    n_images, n_views, _ = feats.shape
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    if (val_feats is None) != (val_labels is None):
        raise ParamsError("give both val_feats and val_labels, or neither")
    if val_feats is not None and val_labels is not None:
        vf, vy = check_features(val_feats, val_labels, n_classes=len(names), dim=clip.embed_dim, what="validation")
        val = ((vf[:, 0] if vf.ndim == 3 else vf).to(learner_device), vy.to(learner_device))  # (M, D), (M,)
    if config.views == "augmented" and n_views == 1:
        logger.info("training features hold only the centre view: training without cached augmentation")

    init_gen = torch.Generator().manual_seed(derive_seed(config.seed, "ctx-init"))
    data_gen = torch.Generator().manual_seed(derive_seed(config.seed, "data"))
    learner = build_learner(config.method_spec(), clip, names, generator=init_gen)  # on the tower's device
    conditional = is_image_conditional(learner)
    encoder = config.text_encoder(clip)
    logit_scale = clip.model.logit_scale.detach()  # scalar, log scale
    optimizer = torch.optim.SGD(
        [learner.ctx, *_other_params(learner).values()],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        dampening=0.0,
        nesterov=False,
    )
    history: list[EpochRecord] = []
    start_epoch = 0
    if resume_state is not None:
        _restore(resume_state, learner, optimizer, data_gen, config.max_epoch)
        start_epoch = resume_state.epoch
        history = list(resume_state.history)
        logger.info("resuming at epoch %d of %d", start_epoch, config.max_epoch)
    end_epoch = config.max_epoch if stop_after is None else max(start_epoch, min(stop_after, config.max_epoch))
    batches = batch_slices(n_images, config.batch_size, config.drop_last)
    logger.info(
        "%s: %d images x %d views, %d classes, %d batches/epoch, epochs %d..%d of %d",
        config.method_spec().label(), n_images, n_views, len(names), len(batches), start_epoch + 1, end_epoch,
        config.max_epoch,
    )

    # An epoch's record (with its validation accuracy) is completed by the next text forward: the context
    # does not change between the end of epoch e and the first forward of epoch e+1, so that forward (or the
    # final one) gives exactly the classifier validation needs, and validation costs no extra text pass.
    # Image-conditional learners have no such classifier: their epoch is completed at its end, validation
    # scoring every validation image through the batched text path.
    pending: dict[str, Any] | None = None

    def complete(text: torch.Tensor | None) -> None:
        nonlocal pending
        if pending is None:
            return
        val_acc = None
        if val is not None:
            with torch.no_grad():
                if text is None:
                    logits = predict_logits(learner, encoder, val[0], logit_scale, image_chunk=config.image_chunk)
                    pred = logits.argmax(dim=-1).to(learner_device)  # (M,)
                else:
                    pred = coop_logits(val[0], text.detach(), logit_scale).argmax(dim=-1)  # (M,)
                val_acc = float((pred == val[1]).float().mean())
        record = EpochRecord(val_acc=val_acc, **pending)
        pending = None
        history.append(record)
        logger.debug("epoch %d/%d: %s", record.epoch, config.max_epoch, record)
        if on_epoch is not None:
            on_epoch(record, _snapshot(record.epoch, learner, optimizer, data_gen, history))

    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        text: torch.Tensor | None = None
        if not conditional:
            text = learner.class_text_features(encoder)  # (n_cls, D): the first step's text pass, also completes
            t1 = time.perf_counter()  # the last epoch
            complete(text)
            t0 += time.perf_counter() - t1  # the last epoch's validation and checkpoint are not this epoch's time
        lr = config.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = draw_views(n_images, n_views, config.views, data_gen).to(learner_device)  # (N,)
        order = torch.randperm(n_images, generator=data_gen).to(learner_device)  # (N,)
        loss_sum = torch.zeros((), device=learner_device)  # accumulated on the device: no sync per step
        correct = torch.zeros((), dtype=torch.long, device=learner_device)
        seen = 0
        for step, part in enumerate(batches):
            idx = order[part]  # (B,)
            image = feats[idx, views[idx]]  # (B, D)
            target = labels[idx]  # (B,)
            if conditional:
                logits = learner.logits(encoder, image, logit_scale, image_chunk=config.image_chunk)  # (B, n_cls)
            else:
                if step > 0:
                    text = learner.class_text_features(encoder)  # (n_cls, D): one text pass serves the batch
                logits = coop_logits(image, text, logit_scale)  # type: ignore[arg-type]  # (B, n_cls)
            # a learner may bring its own loss (rank prompts: cross-entropy + OrdinalCLIP's KL term)
            loss = learner.loss(logits.float(), target) if hasattr(learner, "loss") else F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(dim=-1) == target).sum()
            seen += len(idx)
        del text
        pending = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": float(loss_sum) / max(seen, 1),
            "train_acc": int(correct) / max(seen, 1),
            "seconds": time.perf_counter() - t0,
        }
        if conditional:
            complete(None)

    text_features = None
    if conditional:
        complete(None)
    else:
        with torch.no_grad():
            final_text = learner.class_text_features(encoder)  # (n_cls, D)
        complete(final_text)
        text_features = final_text.float().cpu()
    state = _snapshot(max(end_epoch, start_epoch), learner, optimizer, data_gen, history)
    return TrainResult(
        ctx=state.ctx,
        history=history,
        state=state,
        text_features=text_features,
        logit_scale=float(logit_scale),
        variant=_variant(learner),
        seconds=time.perf_counter() - started,
        params=dict(state.params),
    )


train_coop = train_prompt  # the name CoOp's callers know; one loop for every method

def text_features_for(
    ctx: torch.Tensor, clip: LoadedClip, classnames: Sequence[str], config: TrainConfig
) -> torch.Tensor:
    """L2-normalised class text features (K, D), CPU float32, of a learned context for ``classnames``.

    Image-independent methods only: CoCoOp has no single classifier (use :func:`coopipe.learners.predict_logits`).
    """
    if config.method == "cocoop":
        raise ParamsError(
            "CoCoOp prompts depend on the image: there are no class text features to export; evaluate with "
            "coopipe.learners.predict_logits on a learner from coopipe.learners.restore_learner"
        )
    learner = config.prompt_learner(clip, classnames, generator=torch.Generator())  # its draw is overwritten
    if tuple(ctx.shape) != tuple(learner.ctx.shape):
        raise CheckpointError(
            f"context of shape {tuple(ctx.shape)} does not fit a {config.n_ctx}-token prompt learner for "
            f"{len(classnames)} classes (needs {tuple(learner.ctx.shape)})"
        )
    device = learner.ctx.device
    with torch.no_grad():
        learner.ctx.copy_(ctx.to(device, learner.ctx.dtype))
        return learner.class_text_features(config.text_encoder(clip)).float().cpu()
