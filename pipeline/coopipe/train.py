"""Prompt training against cached image features (CoOp, CoCoOp, rank prompts): only the prompt moves, through the
frozen text tower.

Why it can work from a cache: the image encoder is frozen, so each image's feature for a given view is a
constant. Training therefore reads ``(N, V, D)`` stored features (view 0 = centre crop, views 1.. = cached
random-resized-crop + flip views) and, every epoch, draws one augmented view per image, which keeps the
reference's augmentation as far as the cache allows (a centre-only cache trains on the centre view).

The protocol (:class:`TrainConfig`, :mod:`coopipe.train_config`) follows CoOp's reference configs: SGD (lr 0.002,
momentum 0.9, weight decay 5e-4, batch 32), one warm-up epoch at 1e-5, then cosine decay per epoch.

One loop trains every method and every number of runs (:func:`coopipe.loop.train_runs`): :func:`train_prompt` is
the one-run case of :func:`coopipe.stacked.train_stacked`, which trains runs stacked in one text pass.
The learner and the optimiser come from the run's method (:mod:`coopipe.methods`); the optimiser moves every
parameter of the learner, by name. Image-independent learners (CoOp, rank prompts) run one text pass per step that serves
the whole batch; image-conditional ones (CoCoOp) run the batched B x K text path of :mod:`coopipe.cocoop_text` on
each step's images, the Meta-Net seeing the feature of the view drawn for that image this epoch. CoCoOp's reference
setting (:meth:`TrainConfig.for_method`): M = 4 from "a photo of a", 10 epochs, batch 1, the same SGD and schedule;
a batch above 1 is a departure from the paper (fewer, averaged steps), offered for speed.

Determinism and resume: see :mod:`coopipe.loop` (two explicit generators per run; a resumed run equals an
uninterrupted one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from coopipe.datasets.common import DEFAULT_TEMPLATE
from coopipe.loop import StackedRun
from coopipe.models import LoadedClip
from coopipe.selection import BestEpoch
from coopipe.stacked import train_stacked
from coopipe.train_config import EpochRecord, TrainConfig, TrainResult, TrainState

logger = logging.getLogger(__name__)

__all__ = ["train_prompt"]


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
    on_step: Callable[[], None] | None = None,
    template: str = DEFAULT_TEMPLATE,
    dataset: str | None = None,
    best: BestEpoch | None = None,
    on_best: Callable[[BestEpoch], None] | None = None,
    ordinal: bool = False,
) -> TrainResult:
    """Learn the parameters of ``config.method``'s learner (CoOp context; CoCoOp context and Meta-Net; ...) from cached features.

    ``train_feats``: raw (un-normalised) features (N, V, D) (or (N, D) = one view); ``train_labels``: (N,).
    ``val_feats``/``val_labels``: optional (M, D) or (M, V, D) (view 0 is used) for a per-epoch validation
    accuracy; the result is the last epoch's prompt, as in CoOp and CoCoOp, unless ``config.select_every`` asks for
    the epoch of best validation accuracy (:mod:`coopipe.selection`: ``best`` is the one kept before a resume,
    ``on_best(best)`` is called with each new one, to store it). ``on_epoch(record, state)`` is
    called after every epoch (progress bars, logging, checkpointing ``state``). ``resume_state`` continues a run;
    ``stop_after`` stops once that many epochs are complete (the schedule still spans ``config.max_epoch``).
    ``template``: the dataset's hand-crafted prompt, for methods that need zero-shot text features (KgCoOp, ...);
    ``dataset``: its name, for methods whose published setting differs by dataset (Tip-Adapter's search grid);
    ``ordinal``: the classes are ranks (ages), for methods that treat them so (the linear probe's C criterion).
    Computation runs on the device of ``clip``'s weights.
    """
    run = StackedRun(train_feats, train_labels, classnames, config, val_feats=val_feats, val_labels=val_labels,
                     on_epoch=on_epoch, resume_state=resume_state, stop_after=stop_after, on_step=on_step,
                     template=template, dataset=dataset, best=best, on_best=on_best, ordinal=ordinal)
    return train_stacked([run], clip, max_stack=1)[0]

