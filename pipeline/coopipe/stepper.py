"""One run's training, step by step: its learner, optimiser, data generator, schedule, history and callbacks.

Why a stepper: the training loop is one implementation whether a run trains alone (:func:`coopipe.train.train_prompt`)
or stacked with others in one text pass (:mod:`coopipe.stacked`). A :class:`RunStepper` owns everything that is the
run's own (its init draw, data generator, batches, number of epochs, lr schedule, optimiser and its state, history,
``on_epoch`` callback, resume state) and the driver (:func:`coopipe.stacked.drive`) only supplies, at every tick,
the run's class text features from the shared text pass and back-propagates the sum of the runs' losses.

A run's ticks: at an epoch's first step, the tick's text features first complete the previous epoch (validation
and ``on_epoch``: the context does not change between the end of epoch e and the first forward of epoch e + 1, so
that forward is exactly the classifier validation needs and costs no extra text pass), then draw this epoch's
views and batch order from the data generator; every step computes its batch's loss; after the last epoch one more
tick (no gradient needed) gives the final classifier and completes the last epoch. Image-conditional learners
(CoCoOp) get no text features: they compute their own logits through the batched B x K path and complete an epoch
at its end, validation scoring every validation image.

Determinism: all randomness comes from two explicit ``torch.Generator`` objects derived from ``config.seed``
(one initialises the context, one draws views and batch order), so the same seed gives the identical context on
the CPU. Resuming from a :class:`TrainState` (every learner parameter and the optimiser's state by name, the
generator state, the epoch) gives the same result as an uninterrupted run, whatever the method and its optimiser.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coopipe.datasets.common import DEFAULT_TEMPLATE
from coopipe.errors import CheckpointError, ParamsError
from coopipe.learners import FitData, Learner, StepInputs, is_image_conditional, predict_logits
from coopipe.methods import Method
from coopipe.models import LoadedClip
from coopipe.selection import BestEpoch, Selector
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.text_tower import resolve_text_tower
from coopipe.train_config import (
    EpochRecord,
    TrainConfig,
    TrainResult,
    TrainState,
    batch_slices,
    check_features,
    derive_seed,
    draw_views,
)

logger = logging.getLogger(__name__)

__all__ = ["RunStepper", "StackedRun"]


@dataclass
class StackedRun:
    """One run's inputs, as :func:`coopipe.train.train_prompt` takes them (see its docstring for each field)."""

    train_feats: torch.Tensor | np.ndarray
    train_labels: torch.Tensor | np.ndarray
    classnames: Sequence[str]
    config: TrainConfig = TrainConfig()
    val_feats: torch.Tensor | np.ndarray | None = None
    val_labels: torch.Tensor | np.ndarray | None = None
    on_epoch: Callable[[EpochRecord, TrainState], None] | None = None
    resume_state: TrainState | None = None
    stop_after: int | None = None
    on_step: Callable[[], None] | None = None  # after every optimiser step (progress inside long epochs)
    template: str = DEFAULT_TEMPLATE  # the dataset's hand-crafted prompt (zero-shot text features a method may need)
    dataset: str | None = None  # the dataset's name (a method's per-dataset setting: Tip-Adapter's search grid)
    best: BestEpoch | None = None  # model selection: the best epoch kept before a resume (coopipe.selection)
    on_best: Callable[[BestEpoch], None] | None = None  # model selection: called with each new best epoch
    ordinal: bool = False  # the classes are ranks (ages), for a method that treats them so (FitData.ordinal)


def _snapshot(
    epoch: int,
    learner: Learner,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    history: list[EpochRecord],
) -> TrainState:
    """The run's state after ``epoch`` epochs: every parameter and the optimiser's state by name (CPU copies)."""
    params = dict(learner.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        for key, value in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
            state[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return TrainState(
        epoch=epoch,
        params={name: p.detach().cpu().clone() for name, p in params.items()},
        generator_state=generator.get_state().clone(),
        optimizer=state,
        history=list(history),
        variant=_variant(learner),
        frozen=tuple(name for name, p in params.items() if not p.requires_grad),
    )


def _variant(learner: Learner) -> dict[str, Any]:
    return {k: v for k, v in learner.config().items() if k != "classnames"}


def _restore(
    state: TrainState,
    learner: Learner,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    max_epoch: int,
) -> None:
    variant = _variant(learner)
    if state.variant and state.variant != variant:
        raise CheckpointError(
            f"cannot resume: the saved state is for learner variant {state.variant}, this run builds {variant}; "
            f"resume with the checkpoint's method and options or start a new run"
        )
    params = dict(learner.named_parameters())
    if set(state.params) != set(params):
        raise CheckpointError(
            f"cannot resume: the saved state holds parameters {sorted(state.params)}, this learner has "
            f"{sorted(params)}; resume with the checkpoint's method or start a new run"
        )
    for name, param in params.items():
        if tuple(state.params[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"cannot resume: saved {name} has shape {tuple(state.params[name].shape)}, this run needs "
                f"{tuple(param.shape)} (another class list, model or variant); start a new run"
            )
    if not 0 <= state.epoch <= max_epoch:
        raise CheckpointError(f"cannot resume: saved state is at epoch {state.epoch} of a {max_epoch}-epoch run")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state.params[name].to(param.device, param.dtype))
    for key, value in state.optimizer.items():
        name, _, field = key.rpartition(".")
        if name not in params or optimizer is None:
            raise CheckpointError(f"cannot resume: optimiser state {key!r} names no parameter of this learner")
        param = params[name]
        as_param = value.is_floating_point() and value.shape == param.shape
        optimizer.state[param][field] = value.to(param.device, param.dtype).clone() if as_param else value.clone()
    generator.set_state(state.generator_state.clone())


class RunStepper:
    """One run's state and schedule; the driver calls :meth:`step` once per tick and :meth:`after_backward` after
    back-propagating the loss :meth:`step` returned. Computation runs on the device of ``clip``'s text tower."""

    def __init__(self, run: StackedRun, clip: LoadedClip, encoder: PromptTextEncoder) -> None:
        self.started = time.perf_counter()
        config = self.config = run.config
        self.device = device = resolve_text_tower(clip.model).device
        names = list(run.classnames)
        if config.method.definition.fewshot:
            feats, labels = check_features(run.train_feats, run.train_labels, n_classes=len(names),
                                           dim=clip.embed_dim, what="training")
        else:  # a method that reads no training image (zero-shot CLIP): the run gets none
            feats, labels = torch.as_tensor(run.train_feats).float(), torch.as_tensor(run.train_labels).long()
        if feats.ndim == 2:
            feats = feats.unsqueeze(1)  # (N, 1, D)
        self.feats, self.labels = feats.to(device), labels.to(device)  # (N, V, D), (N,)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None
        if (run.val_feats is None) != (run.val_labels is None):
            raise ParamsError("give both val_feats and val_labels, or neither")
        if run.val_feats is not None and run.val_labels is not None:
            vf, vy = check_features(run.val_feats, run.val_labels, n_classes=len(names), dim=clip.embed_dim,
                                    what="validation")
            self.val = ((vf[:, 0] if vf.ndim == 3 else vf).to(device), vy.to(device))  # (M, D), (M,)
        n_images, n_views, _ = self.feats.shape
        if config.views == "augmented" and n_views == 1:
            logger.info("training features hold only the centre view: training without cached augmentation")

        init_gen = torch.Generator().manual_seed(derive_seed(config.seed, "ctx-init"))
        self.data_gen = torch.Generator().manual_seed(derive_seed(config.seed, "data"))
        self.learner: Learner = config.method.build_learner(clip, names, generator=init_gen)
        self.logit_scale = clip.model.logit_scale.detach()  # scalar, log scale
        self.fit_data = FitData(
            train_feats=self.feats, train_labels=self.labels, val_feats=None if self.val is None else self.val[0],
            val_labels=None if self.val is None else self.val[1], classnames=tuple(names), template=run.template,
            clip=clip, logit_scale=self.logit_scale, dataset=run.dataset, ordinal=run.ordinal)
        config.method.definition.prepare(self.learner, self.fit_data)
        self.setup_seconds = time.perf_counter() - self.started  # the method's one-off cost (coopipe.cost)
        self.conditional = is_image_conditional(self.learner)
        self.encoder = encoder
        # a training-free method (Tip-Adapter) runs 0 epochs: no step, so no optimiser; a method may build its
        # optimiser from the prepared learner (LP++'s step sizes)
        self.optimizer: torch.optim.Optimizer | None = (
            config.method.definition.learner_optimizer(self.learner, config.optimization())
            if config.max_epoch > 0 else None)
        self.on_epoch, self.on_step = run.on_epoch, run.on_step
        self.history: list[EpochRecord] = []
        self.epoch = 0  # the epoch in progress (0-based), or the next one at an epoch boundary
        if run.resume_state is not None:
            _restore(run.resume_state, self.learner, self.optimizer, self.data_gen, config.max_epoch)
            self.epoch = run.resume_state.epoch
            self.history = list(run.resume_state.history)
            logger.info("resuming at epoch %d of %d", self.epoch, config.max_epoch)
        # model selection (None: the last epoch is the result)
        self.selector = Selector.for_run(config, self.learner, has_val=self.val is not None, best=run.best,
                                         on_best=run.on_best)
        stop = config.max_epoch if run.stop_after is None else min(run.stop_after, config.max_epoch)
        self.end_epoch = max(self.epoch, stop)
        self.batches = batch_slices(n_images, config.batch_size, config.drop_last)
        self.step_index = 0  # next batch of the epoch in progress
        self.pending: dict[str, Any] | None = None  # the finished epoch's record, waiting for its validation
        self.done = False
        self.text_features: torch.Tensor | None = None
        self.seconds = 0.0
        self.lr, self.epoch_started, self.seen = config.lr_at(self.epoch), 0.0, 0  # set per epoch by _begin_epoch
        self.views = self.order = torch.zeros(0, dtype=torch.long, device=device)  # (N,) each
        self.loss_sum, self.correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        logger.info("%s seed %d: %d images x %d views, %d classes, %d batches/epoch, epochs %d..%d of %d; text GEMMs "
                    "on %s", config.method.label(), config.seed, n_images, n_views, len(names),
                    len(self.batches), self.epoch + 1, self.end_epoch, config.max_epoch, encoder.gemm.describe(device, encoder.autocast_bf16))

    @property
    def finishing(self) -> bool:
        """Whether the next tick is the final one (its text features are the final classifier; no gradient)."""
        return self.epoch >= self.end_epoch

    def step(self, text: torch.Tensor | None, tick_started: float) -> torch.Tensor | None:
        """One tick: ``text`` (K, D) is this run's classifier from the shared text pass (None for image-conditional
        learners). Returns the loss (still to back-propagate when it requires grad; a learner with ``loss_backward``
        back-propagates here, so gradients must be zeroed before), or None when this tick finished the run."""
        if self.finishing:
            definition = self.config.method.definition
            if self.epoch >= self.config.max_epoch and type(definition).finish is not Method.finish:
                definition.finish(self.learner, self.fit_data)  # the run's end (not a stop_after): complete it
                if text is not None:  # the final classifier is the finished learner's
                    with torch.no_grad():
                        text = self.learner.class_text_features(self.encoder)
            self._complete(None if text is None else text.detach())
            if not self.conditional and text is not None:
                self.text_features = text.detach().float().cpu()
            self.done = True
            self.seconds = time.perf_counter() - self.started
            return None
        if self.step_index == 0:
            self._begin_epoch(text, tick_started)
        idx = self.order[self.batches[self.step_index]]  # (B,)
        image = self.feats[idx, self.views[idx]]  # (B, D)
        target = self.labels[idx]  # (B,)
        # the learner's loss (rank prompts: cross-entropy + OrdinalCLIP's KL term); an image-conditional learner
        # computes its loss and back-propagates it chunk by chunk (CoCoOp)
        chunked = getattr(self.learner, "loss_backward", None) if self.conditional else None
        if chunked is not None:  # back-propagated chunk by chunk here (CoCoOp); the driver has zeroed the gradients
            loss, logits = chunked(self.encoder, image, target, self.logit_scale, image_chunk=self.config.image_chunk)
        else:
            if self.conditional:
                logits = self.learner.logits(self.encoder, image, self.logit_scale,
                                             image_chunk=self.config.image_chunk)
            else:
                logits = coop_logits(image, text, self.logit_scale)  # type: ignore[arg-type]  # (B, K)
            loss = self.learner.loss(logits.float(), target, StepInputs(image=image, text=text, logit_scale=self.logit_scale))
        self.loss_sum += loss.detach() * len(idx)
        self.correct += (logits.detach().argmax(dim=-1) == target).sum()
        self.seen += len(idx)
        return loss  # type: ignore[no-any-return]

    def after_backward(self) -> None:
        """The optimiser step after the driver's backward pass, then the epoch's end when it was its last batch."""
        assert self.optimizer is not None  # a run with steps has one
        self.optimizer.step()
        self.step_index += 1
        if self.on_step is not None:
            self.on_step()
        if self.step_index < len(self.batches):
            return
        self.pending = {"epoch": self.epoch + 1, "lr": self.lr, "loss": float(self.loss_sum) / max(self.seen, 1),
                        "train_acc": int(self.correct) / max(self.seen, 1),
                        "seconds": time.perf_counter() - self.epoch_started}
        self.step_index = 0
        self.epoch += 1
        if self.conditional:
            self._complete(None)

    def result(self) -> TrainResult:
        """The finished (or stopped) run."""
        if not self.done:
            raise ParamsError("the run has not finished: drive it to the end first")
        selection = None
        if self.selector is not None and self.epoch >= self.config.max_epoch:  # the kept epoch is the result
            self.selector.restore(self.learner)
            selection = self.selector.record()
            if self.text_features is not None:
                with torch.no_grad():
                    self.text_features = self.learner.class_text_features(self.encoder).detach().float().cpu()
        state = _snapshot(self.epoch, self.learner, self.optimizer, self.data_gen, self.history)
        return TrainResult(history=self.history, state=state, text_features=self.text_features,
                           logit_scale=float(self.logit_scale), variant=_variant(self.learner), seconds=self.seconds,
                           setup_seconds=self.setup_seconds, selection=selection)

    def _begin_epoch(self, text: torch.Tensor | None, tick_started: float) -> None:
        t1 = time.perf_counter()
        if not self.conditional and text is not None:
            self._complete(text.detach())  # the last epoch's validation and checkpoint are not this epoch's time
        self.epoch_started = tick_started + (time.perf_counter() - t1)
        self.lr = self.config.lr_at(self.epoch)
        assert self.optimizer is not None  # a run with epochs has one
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        n_images, n_views, _ = self.feats.shape
        self.views = draw_views(n_images, n_views, self.config.views, self.data_gen).to(self.device)  # (N,)
        self.order = torch.randperm(n_images, generator=self.data_gen).to(self.device)  # (N,)
        self.loss_sum = torch.zeros((), device=self.device)  # accumulated on the device: no sync per step
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.seen = 0

    def _complete(self, text: torch.Tensor | None) -> None:
        """Record the pending epoch with its validation accuracy (``text``: its classifier; None: score through the
        learner) and call ``on_epoch``."""
        if self.pending is None:
            return
        val_acc = None
        if self.val is not None:
            with torch.no_grad():
                if text is None:
                    logits = predict_logits(self.learner, self.encoder, self.val[0], self.logit_scale,
                                            image_chunk=self.config.image_chunk)
                    pred = logits.argmax(dim=-1).to(self.device)  # (M,)
                else:
                    pred = coop_logits(self.val[0], text, self.logit_scale).argmax(dim=-1)  # (M,)
                val_acc = float((pred == self.val[1]).float().mean())
        record = EpochRecord(val_acc=val_acc, **self.pending)
        self.pending = None
        self.history.append(record)
        logger.debug("epoch %d/%d: %s", record.epoch, self.config.max_epoch, record)
        if self.selector is not None:  # before on_epoch's checkpoint: a stored best is never older than it
            self.selector.observe(record, self.learner)
        if self.on_epoch is not None:
            self.on_epoch(record, _snapshot(record.epoch, self.learner, self.optimizer, self.data_gen, self.history))
