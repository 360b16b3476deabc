"""Model selection on the few-shot validation split: keep the epoch of best validation accuracy, not the last one.

Why an option, off by default: CoOp and CoCoOp report the model of the last epoch (their Dassl trainer evaluates
the final model), which is this project's default (``TrainConfig.select_every = 0``). OrdinalCLIP instead keeps the
checkpoint of best validation MAE, validating every epoch (xk-huang/OrdinalCLIP: ``configs/default.yaml``,
``trainer_cfg.check_val_every_n_epoch: 1``; ``ordinalclip/runner/utils.py``, ``save_checkpoint(is_best=...)``
writing ``model-best.pth.tar``), and on MORPH its validation list is its test list. Here selection scores only
the few-shot validation split the run already validates on: the training loop is never given the test split
(:class:`coopipe.learners.FitData`), so the test split cannot take part in the choice.

Rules: with ``select_every`` N, the epochs N, 2N, ... and the last one are candidates; a candidate replaces the
kept one only when its validation accuracy is strictly higher, so among equal accuracies the earliest epoch is
kept. The kept epoch's learned tensors become the run's result (checkpoint, classifier, evaluation, predict,
export all read them); the training itself, its resume state and its history are unchanged.

Resume: the loop (:mod:`coopipe.loop`) reports each new best to ``on_best`` (the run folder writes it durably,
:mod:`coopipe.selection_store`) before the epoch's checkpoint is saved, and a resumed run starts from the stored
best. A stored best newer than the checkpoint (a kill between the two writes) is still the right start: training
is deterministic, so the re-run epochs reproduce the same accuracies and none of them beats it strictly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from coopipe.errors import CheckpointError, ParamsError
from coopipe.learners import Learner
from coopipe.train_config import EpochRecord, TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["SELECTED_ON", "BestEpoch", "Selector", "check_kept", "check_selection_record", "selection_phrase", "selection_record"]

SELECTED_ON = "few-shot validation accuracy"  # what the kept epoch was chosen on: never the test split


@dataclass(frozen=True)
class BestEpoch:
    """The epoch kept so far: its number (1 = the first), its validation accuracy and its learned tensors (CPU)."""

    epoch: int
    val_acc: float
    params: dict[str, torch.Tensor]


def selection_record(every: int, best: BestEpoch | None) -> dict[str, Any]:
    """What a run's records say of its model selection: the rule and, when it selected, the epoch kept and on what."""
    if not every:
        return {"rule": "last epoch"}
    return {"rule": "best validation epoch", "on": SELECTED_ON, "every": every,
            "epoch": None if best is None else best.epoch, "val_acc": None if best is None else best.val_acc}


def check_selection_record(record: Mapping[str, Any], max_epoch: int) -> str | None:
    """What is wrong with a checkpoint's selection record (None: nothing): a kept epoch of the run, a fraction."""
    if record.get("rule") == "last epoch":
        return None
    if record.get("rule") != "best validation epoch" or record.get("on") != SELECTED_ON:
        return f"field 'selection' names no known rule ({record.get('rule')!r} on {record.get('on')!r})"
    if not isinstance(record.get("every"), int):
        return f"field 'selection.every' must be a whole number of epochs, got {record.get('every')!r}"
    return check_kept(record.get("epoch"), record.get("val_acc"), max_epoch, field="selection.")


def check_kept(epoch: object, val_acc: object, max_epoch: int, *, field: str = "") -> str | None:
    """What is wrong with a kept epoch's number and validation accuracy as a record holds them (None: nothing):
    one rule for the checkpoint's ``selection`` field and the stored best epoch (:mod:`coopipe.selection_store`)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= max_epoch:
        return f"field '{field}epoch' must be an epoch of the {max_epoch}-epoch run, got {epoch!r}"
    if isinstance(val_acc, bool) or not isinstance(val_acc, int | float) or not 0 <= val_acc <= 1:
        return f"field '{field}val_acc' must be a fraction in [0, 1], got {val_acc!r}"
    return None


def selection_phrase(every: int) -> str:
    """The model-selection departure in words (for :mod:`coopipe.departures`)."""
    step = "every epoch" if every == 1 else f"every {every} epochs"
    return f"model selection: the epoch of best {SELECTED_ON}, checked {step} and after the last"


class Selector:
    """Keeps the best epoch of one run (see the module docstring); the loop calls :meth:`observe` after each
    epoch's validation and :meth:`restore` once the run is finished."""

    def __init__(self, every: int, max_epoch: int, *, best: BestEpoch | None = None,
                 on_best: Callable[[BestEpoch], None] | None = None) -> None:
        self.every, self.max_epoch = every, max_epoch
        self.best, self.on_best = best, on_best

    @classmethod
    def for_run(cls, config: TrainConfig, learner: Learner, *, has_val: bool, best: BestEpoch | None = None,
                on_best: Callable[[BestEpoch], None] | None = None) -> Selector | None:
        """The run's selector (None when the run keeps its last epoch); a stored ``best`` is checked to fit the
        learner. Refuses selection without a validation split: it never falls back to the test split."""
        if not config.select_every:
            return None
        if not has_val:
            raise ParamsError(
                f"model selection (select_every {config.select_every}) scores the few-shot validation split, and "
                f"this run has none; encode the dataset's val split (coopipe encode) or set select_every 0"
            )
        if best is not None:
            _check_fits(best, learner, config.max_epoch)
        return cls(config.select_every, config.max_epoch, best=best, on_best=on_best)

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (1 = the first) is a candidate."""
        return epoch % self.every == 0 or epoch == self.max_epoch

    def observe(self, record: EpochRecord, learner: Learner) -> None:
        """After epoch ``record.epoch``'s validation: keep the learner's tensors when the epoch beats the kept one."""
        if not self.due(record.epoch) or record.val_acc is None:
            return
        if self.best is not None and record.val_acc <= self.best.val_acc:
            return
        params = {name: p.detach().cpu().clone() for name, p in learner.named_parameters()}
        self.best = BestEpoch(epoch=record.epoch, val_acc=float(record.val_acc), params=params)
        logger.debug("model selection: epoch %d is the best so far (validation accuracy %.4f)", record.epoch,
                     record.val_acc)
        if self.on_best is not None:
            self.on_best(self.best)

    def restore(self, learner: Learner) -> None:
        """Load the kept epoch's tensors into the finished ``learner`` (its result becomes the kept epoch's)."""
        if self.best is None:
            return
        logger.info("model selection: keeping epoch %d of %d (%s %.4f)", self.best.epoch, self.max_epoch,
                    SELECTED_ON, self.best.val_acc)
        with torch.no_grad():
            for name, param in learner.named_parameters():
                param.copy_(self.best.params[name].to(param.device, param.dtype))

    def record(self) -> dict[str, Any]:
        return selection_record(self.every, self.best)


def _check_fits(best: BestEpoch, learner: Learner, max_epoch: int) -> None:
    params: Mapping[str, torch.Tensor] = dict(learner.named_parameters())
    if not 1 <= best.epoch <= max_epoch:
        raise CheckpointError(f"the stored best epoch {best.epoch} lies outside this {max_epoch}-epoch run; start a new run")
    if set(best.params) != set(params):
        raise CheckpointError(f"the stored best epoch holds {sorted(best.params)}, this learner has {sorted(params)}; "
                              f"start a new run")
    for name, param in params.items():
        if tuple(best.params[name].shape) != tuple(param.shape):
            raise CheckpointError(f"the stored best epoch's {name} has shape {tuple(best.params[name].shape)}, this "
                                  f"run needs {tuple(param.shape)}; start a new run")
