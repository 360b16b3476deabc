"""Stacked runs: runs that differ only in seed and/or shots train together, one text pass per step for all of them.

Why: a CoOp step is one K-class text pass; at K = 10 that pass leaves a GPU idle, so R runs (seeds x shots of one
dataset, model, variant and class list) share it (:mod:`coopipe.stacked_text`). Every run keeps its own init draw,
data generator, batches, number of epochs (shots change the paper's epochs and the steps per epoch, so runs finish
at different ticks and a finished run drops out of the stack), lr schedule, SGD momentum, history, callbacks and
resume state (:class:`coopipe.stepper.RunStepper`). The loss back-propagated is the SUM of the active runs' own
losses, so each run's gradient is its solo gradient, and a stacked run equals the same run trained alone to float
tolerance (``tests/test_stacked.py``).

:func:`drive` is the only training loop: :func:`coopipe.train.train_prompt` is its R = 1 case. Image-conditional
learners (CoCoOp) need a text pass per image, not per step: they train alone (a stack of more than one raises).

Memory: a stacked pass holds R x the activations of one run (about K x L x width x layers x
:data:`ACTIVATION_FLOATS` floats each for the backward pass); :func:`train_stacked` trains a longer list in groups
of at most ``max_stack`` runs (default: what half the free memory holds, :func:`default_max_stack`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.stacked_text import check_stackable, stacked_text_features
from coopipe.stepper import RunStepper, StackedRun
from coopipe.text_tower import resolve_text_tower
from coopipe.train_config import TrainConfig, TrainResult

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATION_FLOATS", "StackedRun", "default_max_stack", "drive", "run_bytes", "stack_key", "train_stacked"]

ACTIVATION_FLOATS = 24  # floats kept per row, width and layer for the backward pass (ln, qkv, attention, 4x MLP...)
TEXT_PATH_OPTIONS = ("cut", "share_prefix", "class_chunk", "checkpoint_chunks", "autocast_bf16")


def stack_key(run: StackedRun) -> tuple[object, ...]:
    """What runs sharing a text pass must share: class list, method and variant, and the text-path options."""
    config = run.config
    return (tuple(run.classnames), config.method, *(getattr(config, name) for name in TEXT_PATH_OPTIONS))


def drive(steppers: Sequence[RunStepper]) -> None:
    """Train every stepper to its end: one text pass per tick for all active runs, one backward of their summed loss
    (image-conditional runs back-propagate inside their own step, chunk by chunk).

    Steppers must share the encoder and be stackable (:func:`coopipe.stacked_text.check_stackable`), or be one.
    """
    if not steppers:
        return
    encoder = steppers[0].encoder
    while active := [s for s in steppers if not s.done]:
        tick_started = time.perf_counter()
        independent = [s for s in active if not s.conditional]
        texts: dict[int, torch.Tensor] = {}
        if independent:
            with torch.set_grad_enabled(not all(s.finishing for s in independent)):  # a final tick needs no gradient
                features = stacked_text_features(encoder, [s.learner for s in independent])
            texts = {id(s): t for s, t in zip(independent, features)}
        for stepper in active:  # before the steps: a CoCoOp step back-propagates chunk by chunk as it goes
            if stepper.optimizer is not None:  # None: a training-free run (0 epochs), finished at its first tick
                stepper.optimizer.zero_grad(set_to_none=True)
        losses = [(s, loss) for s in active if (loss := s.step(texts.get(id(s)), tick_started)) is not None]
        if not losses:
            continue
        if pending := [loss for _, loss in losses if loss.requires_grad]:
            torch.stack(pending).sum().backward()  # each run's gradient is its own loss's
        for stepper, _ in losses:
            stepper.after_backward()


def run_bytes(clip: LoadedClip, n_classes: int, config: TrainConfig = TrainConfig()) -> int:
    """Rough activation memory of one run's text pass with gradients: K x L x width x layers x floats, in bytes.

    L is the context length (an upper bound: the packed path holds only the rows up to each [EOS]).
    """
    tower = resolve_text_tower(clip.model)
    rows = n_classes * tower.context_length
    if config.class_chunk is not None and config.checkpoint_chunks:
        rows = min(n_classes, config.class_chunk) * tower.context_length
    layers = len(list(tower.blocks))
    return int(rows * tower.width * layers * ACTIVATION_FLOATS * tower.token_embedding.weight.element_size())


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_max_stack(clip: LoadedClip, n_classes: int, config: TrainConfig = TrainConfig()) -> int:
    """Runs per group that half the free memory of the text tower's device holds (at least 1)."""
    device = resolve_text_tower(clip.model).device
    return max(1, _free_bytes(device) // 2 // max(run_bytes(clip, n_classes, config), 1))


def train_stacked(runs: Sequence[StackedRun], clip: LoadedClip, *, max_stack: int | None = None) -> list[TrainResult]:
    """Train ``runs`` (same class list, method/variant and text-path options) stacked, in groups of at most
    ``max_stack`` (None: :func:`default_max_stack`); returns each run's result, in order, equal to training it alone.

    Each run's ``on_epoch`` is called after each of its epochs and its ``resume_state`` continues it, as with
    :func:`coopipe.train.train_prompt`. Image-conditional runs (CoCoOp) are trained one at a time (``max_stack`` > 1 is refused).
    """
    runs = list(runs)
    if not runs:
        return []
    if max_stack is not None and max_stack < 1:
        raise ParamsError(f"max_stack must be >= 1 or None, got {max_stack}")
    keys = {stack_key(r) for r in runs}
    if len(keys) > 1:
        raise ParamsError(
            f"stacked runs must share the class list, method/variant and text-path options ({', '.join(TEXT_PATH_OPTIONS)}); "
            f"got {len(keys)} different ones: group the runs by coopipe.stacked.stack_key first"
        )
    if not runs[0].config.method.definition.stackable:
        if max_stack not in (None, 1) and len(runs) > 1:
            raise ParamsError(
                f"{runs[0].config.method} runs cannot be stacked in one text pass (image-conditional, or no packed prompt): "
                f"pass max_stack=1 or None (one at a time)"
            )
        group = 1
    else:
        group = max_stack or default_max_stack(clip, len(runs[0].classnames), runs[0].config)
    encoder = runs[0].config.text_encoder(clip)
    results: list[TrainResult] = []
    for start in range(0, len(runs), group):
        steppers = [RunStepper(run, clip, encoder) for run in runs[start : start + group]]
        if len(steppers) > 1:
            check_stackable([s.learner for s in steppers])
        logger.info("training %d run(s) stacked (%d of %d)", len(steppers), start + len(steppers), len(runs))
        drive(steppers)
        results += [s.result() for s in steppers]
    return results
