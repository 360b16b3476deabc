"""Stage `interpret`: read a learned CoOp context as its nearest vocabulary words (CoOp's interpretation).

For the checkpoint's own model (name and weights identity from the checkpoint's metadata) a FAISS index over the
token-embedding table is loaded from ``<cache>/vocab`` (built and cached the first time); every context vector
(per class under class-specific context) is looked up; the result is written as JSON and TSV. When a test store
of the same dataset, model and weights is in the cache, the test accuracy of the learned prompt and of its
nearest-word projection are measured too.

Run by DVC as ``python stages/interpret.py --checkpoint ... --json ... --tsv ...`` (topk/metric/device from the
``interpret`` section of params.yaml) and by ``coopipe interpret``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coopipe.atomic import write_json, write_text
from coopipe.checkpoint import Checkpoint, load_checkpoint
from coopipe.errors import CheckpointError, ParamsError, StoreError
from coopipe.features import read_split, select_store
from coopipe.interpret.projection import evaluate_projection
from coopipe.interpret.reading import Interpretation, interpret_prompt
from coopipe.interpret.render import format_tsv
from coopipe.interpret.vocab_index import METRICS, load_vocab_index
from coopipe.models import LoadedClip, load_clip
from coopipe.prompt import PromptLearner
from coopipe.lookup import pretrained_for
from coopipe.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- checkpoint -> model
def _recorded_pretrained(params: Any) -> list[str]:
    """Every ``pretrained`` value recorded in a checkpoint's ``params`` (nested mappings searched)."""
    found: list[str] = []
    if isinstance(params, Mapping):
        for key, value in params.items():
            if key == "pretrained" and isinstance(value, str):
                found.append(value)
            else:
                found += _recorded_pretrained(value)
    return found


def checkpoint_pretrained(ckpt: Checkpoint) -> str:
    """The ``pretrained`` argument that loads the weights ``ckpt`` was trained with (from its weights identity).

    ``open_clip:<model>/<tag>`` -> the tag; ``random-init:...`` -> ``none``; ``sha256:...`` (a local file) -> the
    file recorded in the checkpoint's params, if it still exists. The identity is checked after loading.
    """
    if not ckpt.weights.startswith("sha256:"):
        return pretrained_for(ckpt.weights)  # an open_clip tag, or none for random init
    for candidate in _recorded_pretrained(ckpt.meta.get("params")):
        if Path(candidate).expanduser().is_file():
            return candidate
    raise CheckpointError(
        f"checkpoint {ckpt.path} was trained with weights from a local file ({ckpt.weights}) that it cannot locate; "
        f"pass the file's path (coopipe interpret --pretrained PATH)"
    )


def load_for_interpretation(
    ckpt: Checkpoint, *, device: str = "cpu", pretrained: str | None = None
) -> tuple[LoadedClip, PromptLearner]:
    """The checkpoint's own model (weights identity checked) and a prompt learner holding the learned context."""
    clip = load_clip(ckpt.model, pretrained or checkpoint_pretrained(ckpt), device=device)
    ckpt.check_clip(clip)
    variant = ckpt.variant
    try:
        learner = PromptLearner(
            clip,
            ckpt.classnames,
            n_ctx=int(variant.get("n_ctx", 16)),
            ctx_init=variant.get("ctx_init"),
            csc=bool(variant.get("csc", False)),
            class_token_position=str(variant.get("class_token_position", "end")),
            generator=torch.Generator().manual_seed(0),  # its draw is overwritten by the checkpoint's context
        )
    except ParamsError as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: its prompt variant {variant} cannot be rebuilt ({exc})") from exc
    ctx = ckpt.ctx
    if tuple(learner.ctx.shape) != tuple(ctx.shape):
        raise CheckpointError(
            f"checkpoint {ckpt.path}: context of shape {tuple(ctx.shape)} does not fit its own variant {variant} "
            f"(needs {tuple(learner.ctx.shape)}); the checkpoint is corrupt, re-train"
        )
    with torch.no_grad():
        learner.ctx.copy_(ctx.to(learner.ctx.device, learner.ctx.dtype))
    return clip, learner


# ---------------------------------------------------------------------------------------------- test features
def checkpoint_dataset(ckpt: Checkpoint) -> str | None:
    """The dataset the prompt was trained on (from the stores it records, else its params)."""
    for ref in (ckpt.meta.get("stores") or {}).values():
        if isinstance(ref, Mapping) and ref.get("dataset"):
            return str(ref["dataset"])
    params = ckpt.meta.get("params") or {}
    data = params.get("data") if isinstance(params, Mapping) else None
    if isinstance(data, Mapping) and data.get("dataset"):
        return str(data["dataset"])
    if isinstance(params, Mapping) and isinstance(params.get("dataset"), str):
        return str(params["dataset"])
    return None


def find_test_store(
    ckpt: Checkpoint, cache_dir: str | os.PathLike[str], test_store: str | os.PathLike[str] | None = None
) -> FeatureStore | None:
    """``test_store`` if given, else the full test store of the checkpoint's dataset, model and weights under
    ``cache_dir`` (None when there is none). Raises if the store does not fit the checkpoint."""
    if test_store is not None:
        store = open_store(test_store)
    else:
        dataset = checkpoint_dataset(ckpt)
        if dataset is None:
            logger.warning("checkpoint %s records no dataset: cannot look for its test store", ckpt.path)
            return None
        try:
            store = select_store(cache_dir, dataset, "test", model=ckpt.model, weights=ckpt.weights)
        except StoreError as exc:
            logger.warning("%s", exc)
            return None
    ckpt.check_store(store)
    return store


# ---------------------------------------------------------------------------------------------- the stage
def run_interpret(
    *,
    checkpoint: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] = "cache",
    topk: int = 5,
    metric: str = "l2",
    test_store: str | os.PathLike[str] | None = None,
    accuracy: bool | None = None,
    device: str = "cpu",
    gpu: bool | None = None,
    pretrained: str | None = None,
    json_out: str | os.PathLike[str] | None = None,
    tsv_out: str | os.PathLike[str] | None = None,
) -> Interpretation:
    """Interpret ``checkpoint``'s context: nearest tokens of each vector, the nearest-word prompt, its accuracy.

    ``accuracy``: None measures it when a test store is found (``test_store``, else the full test store of the
    checkpoint's dataset, model and weights under ``cache_dir``), True requires it, False skips it.
    ``pretrained`` overrides where the weights are loaded from (their identity must still match). ``gpu``: see
    :func:`coopipe.interpret.vocab_index.load_vocab_index`.
    Writes ``json_out``/``tsv_out`` when given (atomically).
    """
    if metric not in METRICS:
        raise ParamsError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ParamsError(f"topk must be a positive integer, got {topk!r}")
    ckpt = load_checkpoint(checkpoint)
    clip, learner = load_for_interpretation(ckpt, device=device, pretrained=pretrained)
    index = load_vocab_index(clip, metric=metric, cache_dir=cache_dir, gpu=gpu)
    result = interpret_prompt(learner, clip, index, topk=topk)
    store = None
    if accuracy is not False:
        store = find_test_store(ckpt, cache_dir, test_store)
        if store is None and accuracy:
            raise StoreError(
                f"no test store of {checkpoint_dataset(ckpt)} for {ckpt.model} ({ckpt.weights}) under {cache_dir}; "
                f"run `coopipe encode --split test` with the checkpoint's model and weights, or pass a test store"
            )
        if store is None:
            logger.warning("no test store found for checkpoint %s: accuracy not measured", ckpt.path)
    if store is not None:
        test = read_split(store, all_views=False)
        result.accuracy = evaluate_projection(result, learner, clip, test.center, test.labels, source=str(store.path))
    if json_out is not None:
        data = {"checkpoint": str(Path(checkpoint)), **result.to_dict()}
        write_json(json_out, data, ensure_ascii=False)
    if tsv_out is not None:
        write_text(tsv_out, format_tsv(result))
    return result
