"""The training loop: every method, one run or R runs stacked in one text pass, trained by :func:`train_runs`.

Read :func:`train_runs` top to bottom as nanoGPT's ``train.py``: at an epoch's first step, the last epoch's
validation and checkpoint, then the schedule (this epoch's lr) and the batches (this epoch's views and order); then
at every step the forward pass, the loss, the backward pass and the optimiser step. The evaluation and checkpoint of
epoch e come at the first step of epoch e + 1 because that step's text pass is exactly the classifier they need (the
learner does not change in between), so they cost no extra text pass; after the last epoch one more step (no
gradient needed) gives the final classifier.

Stacked runs are a property of this loop, not a second one: runs that differ only in seed and/or shots share
each step's text pass (:func:`coopipe.stacked_text.stacked_text_features`) and back-propagate the SUM of their own
losses, so each run's gradient is its solo gradient (``tests/test_stacked.py``). Every run keeps its own state
(:class:`TrainingRun`): init draw, data generator, batches, number of epochs (runs finish at different steps and a
finished run drops out), lr schedule, optimiser and its state, history, callbacks and resume state. Which runs
stack and how many fit in memory is :mod:`coopipe.stacked`.

Image-conditional learners (CoCoOp: "no single K x D classifier") get no shared text pass: they compute their own
logits through the batched B x K path, or back-propagate chunk by chunk inside their loss (``loss_backward``), and
complete an epoch at its end, validation scoring every validation image.

Model selection (``config.select_every``, :mod:`coopipe.selection`): each validated epoch is shown to the run's
selector before its checkpoint, and a finished run's result holds the kept epoch's tensors instead of the last's.

Determinism: all randomness comes from two explicit ``torch.Generator`` objects derived from ``config.seed``
(one initialises the learner, one draws views and batch order), so the same seed gives the identical learner on
the CPU; resuming from a :class:`TrainState` (:mod:`coopipe.resume`) gives the same result as an uninterrupted run.
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
from coopipe.errors import ParamsError
from coopipe.learners import FitData, Learner, StepInputs, is_image_conditional, predict_logits
from coopipe.methods import Method
from coopipe.models import LoadedClip
from coopipe.resume import learner_variant, restore, snapshot
from coopipe.selection import BestEpoch, Selector
from coopipe.stacked_text import check_stackable, stacked_text_features
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

__all__ = ["StackedRun", "TrainingRun", "train_runs"]


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


def train_runs(runs: Sequence[StackedRun], clip: LoadedClip, encoder: PromptTextEncoder) -> list[TrainResult]:
    """Train every run to its end, in one loop; returns each run's result, in order.

    More than one run share each step's text pass: they must share ``encoder`` and be stackable
    (:func:`coopipe.stacked_text.check_stackable`; :func:`coopipe.stacked.train_stacked` groups them)."""
    states = [TrainingRun(run, clip, encoder) for run in runs]
    if len(states) > 1:
        check_stackable([r.learner for r in states])
    while active := [r for r in states if not r.done]:
        step_started = time.perf_counter()
        # forward, text side: one (stacked) text pass gives every image-independent run its classifier (K, D)
        independent = [r for r in active if not r.conditional]
        texts: dict[int, torch.Tensor] = {}
        if independent:
            with torch.set_grad_enabled(not all(r.finishing for r in independent)):  # a final step needs no gradient
                features = stacked_text_features(encoder, [r.learner for r in independent])
            texts = {id(r): t for r, t in zip(independent, features)}
        for run in active:  # before the forward: a CoCoOp loss back-propagates chunk by chunk as it goes
            if run.optimizer is not None:  # None: a training-free run (0 epochs), finished at its first step
                run.optimizer.zero_grad(set_to_none=True)

        stepping: list[TrainingRun] = []
        for run in active:
            text = texts.get(id(run))
            if run.finishing:  # the final classifier; the last epoch's validation and checkpoint
                run.finish(text)
            else:
                if run.step_index == 0:  # the last epoch's validation and checkpoint; schedule; batches
                    run.begin_epoch(text, step_started)
                stepping.append(run)
        if not stepping:
            continue

        losses: list[torch.Tensor] = []
        for run in stepping:
            idx = run.order[run.batches[run.step_index]]  # batch: (B,) image indices
            image, target = run.feats[idx, run.views[idx]], run.labels[idx]  # (B, D): each image's view; (B,)
            text = texts.get(id(run))
            if run.loss_backward is not None:  # CoCoOp: forward, loss and backward chunk by chunk (zeroed above)
                loss, logits = run.loss_backward(run.encoder, image, target, run.logit_scale,
                                                 image_chunk=run.config.image_chunk)
            else:
                if run.conditional:  # forward
                    logits = run.learner.logits(run.encoder, image, run.logit_scale,
                                                image_chunk=run.config.image_chunk)
                else:
                    logits = coop_logits(image, text, run.logit_scale)  # type: ignore[arg-type]  # (B, K)
                # the method's loss (rank prompts: cross-entropy + OrdinalCLIP's KL term)
                loss = run.learner.loss(logits.float(), target,
                                        StepInputs(image=image, text=text, logit_scale=run.logit_scale))
            run.tally(loss, logits, target)
            losses.append(loss)

        if pending := [loss for loss in losses if loss.requires_grad]:
            torch.stack(pending).sum().backward()  # backward: each run's gradient is its own loss's
        for run in stepping:
            assert run.optimizer is not None  # a run with steps has one
            run.optimizer.step()  # optimiser step
            run.end_step()  # progress; after an epoch's last batch, its record (checkpointed at the next epoch's start)
    return [r.result() for r in states]


class TrainingRun:
    """One run in the loop: its data, learner, optimiser, data generator, schedule position, history and callbacks.
    Computation runs on the device of ``clip``'s text tower."""

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
        # an image-conditional learner may compute its loss and back-propagate it chunk by chunk (CoCoOp)
        self.loss_backward = getattr(self.learner, "loss_backward", None) if self.conditional else None
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
            restore(run.resume_state, self.learner, self.optimizer, self.data_gen, config.max_epoch)
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
        self.lr, self.epoch_started, self.seen = config.lr_at(self.epoch), 0.0, 0  # set per epoch by begin_epoch
        self.views = self.order = torch.zeros(0, dtype=torch.long, device=device)  # (N,) each
        self.loss_sum, self.correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        logger.info("%s seed %d: %d images x %d views, %d classes, %d batches/epoch, epochs %d..%d of %d",
                    config.method.label(), config.seed, n_images, n_views, len(names), len(self.batches),
                    self.epoch + 1, self.end_epoch, config.max_epoch)

    @property
    def finishing(self) -> bool:
        """Whether the next step is the final one (its text features are the final classifier; no gradient)."""
        return self.epoch >= self.end_epoch

    def finish(self, text: torch.Tensor | None) -> None:
        """The run's last step: the method's finish (at the schedule's end, not at a ``stop_after``), the final
        classifier (``text``: from the shared text pass; None for image-conditional learners), the last epoch's
        validation and ``on_epoch``."""
        definition = self.config.method.definition
        if self.epoch >= self.config.max_epoch and type(definition).finish is not Method.finish:
            definition.finish(self.learner, self.fit_data)
            if text is not None:  # the final classifier is the finished learner's
                with torch.no_grad():
                    text = self.learner.class_text_features(self.encoder)
        self._complete(None if text is None else text.detach())
        if not self.conditional and text is not None:
            self.text_features = text.detach().float().cpu()
        self.done = True
        self.seconds = time.perf_counter() - self.started

    def begin_epoch(self, text: torch.Tensor | None, step_started: float) -> None:
        """An epoch's first step: the last epoch's validation and ``on_epoch`` with ``text`` (its classifier), then
        this epoch's lr (the schedule) and its views and batch order (the data generator)."""
        t1 = time.perf_counter()
        if not self.conditional and text is not None:
            self._complete(text.detach())  # the last epoch's validation and checkpoint are not this epoch's time
        self.epoch_started = step_started + (time.perf_counter() - t1)
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

    def tally(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a step's loss and correct predictions to the epoch's record."""
        self.loss_sum += loss.detach() * len(target)
        self.correct += (logits.detach().argmax(dim=-1) == target).sum()
        self.seen += len(target)

    def end_step(self) -> None:
        """After the optimiser step: progress, and after the epoch's last batch its record (image-conditional
        learners validate it now; the others at the next step, with its text pass)."""
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
        state = snapshot(self.epoch, self.learner, self.optimizer, self.data_gen, self.history)
        return TrainResult(history=self.history, state=state, text_features=self.text_features,
                           logit_scale=float(self.logit_scale), variant=learner_variant(self.learner),
                           seconds=self.seconds, setup_seconds=self.setup_seconds, selection=selection)

    def _complete(self, text: torch.Tensor | None) -> None:
        """Record the pending epoch with its validation accuracy (``text``: its classifier; None: score through the
        learner) and call ``on_epoch`` (the run folder's checkpoint)."""
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
            self.on_epoch(record, snapshot(record.epoch, self.learner, self.optimizer, self.data_gen, self.history))
