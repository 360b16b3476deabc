"""Stacked runs: which runs may share one text pass per step, and how many fit in memory at once.

Why: a CoOp step is one K-class text pass; at K = 10 that pass leaves a GPU idle, so R runs (seeds x shots of one
dataset, model, variant and class list) share it. The loop is the one training loop (:func:`coopipe.loop.train_runs`,
where stacking is a property: each run keeps its own state and gradient, and a stacked run equals the same run
trained alone to float tolerance, ``tests/test_stacked.py``); this module groups runs for it.
:func:`coopipe.train.train_prompt` is the one-run case. Image-conditional learners (CoCoOp) need a text pass per
image, not per step: they train alone (a stack of more than one raises).

Memory: a stacked pass holds R x the activations of one run (about K x L x width x layers x
:data:`ACTIVATION_FLOATS` floats each for the backward pass); :func:`train_stacked` trains a longer list in groups
of at most ``max_stack`` runs (default: what half the free memory holds, :func:`default_max_stack`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from coopipe.errors import ParamsError
from coopipe.loop import StackedRun, train_runs
from coopipe.models import LoadedClip
from coopipe.text_tower import resolve_text_tower
from coopipe.train_config import TrainConfig, TrainResult

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATION_FLOATS", "default_max_stack", "run_bytes", "stack_key", "train_stacked"]

ACTIVATION_FLOATS = 24  # floats kept per row, width and layer for the backward pass (ln, qkv, attention, 4x MLP...)
TEXT_PATH_OPTIONS = ("cut", "share_prefix", "class_chunk", "checkpoint_chunks", "autocast_bf16")


def stack_key(run: StackedRun) -> tuple[object, ...]:
    """What runs sharing a text pass must share: class list, method and variant, and the text-path options."""
    config = run.config
    return (tuple(run.classnames), config.method, *(getattr(config, name) for name in TEXT_PATH_OPTIONS))


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
    logger.info("text GEMMs on %s", encoder.gemm.describe(resolve_text_tower(clip.model).device, encoder.autocast_bf16))
    results: list[TrainResult] = []
    for start in range(0, len(runs), group):
        stack = runs[start : start + group]
        if len(stack) > 1:
            logger.info("training %d runs stacked (%d of %d)", len(stack), start + len(stack), len(runs))
        results += train_runs(stack, clip, encoder)
    return results
