"""How a trained run departs from its method's paper setting, in words a metrics file and a report can show.

Why: a number computed under another setting than the paper's (another batch size, a few cached crops instead of a
fresh one every epoch, bf16 features, nested few-shot draws) must say so wherever it is read; otherwise it is
compared with the paper's table as if it were the same experiment. The paper setting comes from the training
config of the method's reference (:meth:`coopipe.train_config.TrainConfig.for_method`) and the reference's
augmentation (:class:`coopipe.views.ViewSpec` defaults: CoOp's random resized crop, scale 0.08-1, with flip; for an
age dataset OrdinalCLIP's, ``ViewSpec(augment="ordinalclip")``, from xk-huang/OrdinalCLIP
``ordinalclip/runner/utils.py``).

Each function returns short phrases (``"batch size 4 (paper 1)"``); an empty list means no departure found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from coopipe.checkpoint import Checkpoint
from coopipe.datasets import is_age_dataset
from coopipe.errors import CoopipeError
from coopipe.selection import selection_phrase, selection_record
from coopipe.train_config import TrainConfig
from coopipe.views import ViewSpec

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_departures", "feature_departures", "training_departures", "training_record", "warn_single_view"]

# What the references do that a cached pipeline cannot, stated once (KaiyangZhou/CoOp; Dassl's few-shot sampler).
FRESH_CROPS = "a fresh random crop of every image each epoch"
NESTED_DRAWS = "nested few-shot draws (the K-shot draw is part of the 2K-shot one; the paper draws each K independently)"
COOP_VIEWS = "random resized crop (OrdinalCLIP: resize 256, random crop 224, flip)"
ORDINALCLIP_VIEWS = "OrdinalCLIP's resize 256 and random crop 224 (paper: random resized crop, scale 0.08-1)"
_OPTIMIZER_FIELDS = (("lr", "lr"), ("momentum", "momentum"), ("weight_decay", "weight decay"),
                     ("warmup_epoch", "warm-up epochs"), ("warmup_lr", "warm-up lr"))


def _views_phrase(n_aug: int, epochs: int, policy: str) -> str | None:
    """The cached-views departure: how many views against how many epochs (None: no training views involved)."""
    if policy == "center" or n_aug == 0:
        return f"no augmentation: every epoch sees the centre crop (paper: {FRESH_CROPS})"
    if policy == "all":
        return f"{n_aug} cached augmented views and the centre view drawn over {epochs} epochs (paper: {FRESH_CROPS})"
    if n_aug == 1:
        return f"1 cached augmented view: every epoch sees the same crop (paper: {FRESH_CROPS})"
    reuse = epochs / n_aug
    return f"{n_aug} cached augmented views over {epochs} epochs, each reused ~{reuse:.3g}x (paper: {FRESH_CROPS})"


def _is_ordinalclip(views: Mapping[str, Any]) -> bool:
    """Whether a train store's views are OrdinalCLIP's resize + random crop (:mod:`coopipe.views`)."""
    return str(views.get("augmentation", "")) == str(ViewSpec(n_aug=1, augment="ordinalclip").to_dict()["augmentation"])


def _augmentation_phrase(views: Mapping[str, Any], age: bool) -> str | None:
    """The augmentation departure (crop kind, scale, flip) of a train store's view spec from the paper's (CoOp's
    random resized crop; OrdinalCLIP's resize + random crop for an age dataset); None when it is the paper's."""
    if int(views.get("n_aug", 0)) == 0:
        return None
    ordinal = _is_ordinalclip(views)
    if age or ordinal:
        parts = []
        if age != ordinal:
            parts.append(ORDINALCLIP_VIEWS if not age else COOP_VIEWS)
        if not views.get("flip", True):
            parts.append("no horizontal flip (paper flips)")
        return "augmentation: " + ", ".join(parts) if parts else None
    paper = ViewSpec(n_aug=1)
    parts = []
    scale = tuple(float(v) for v in views.get("scale", paper.scale))
    if scale != tuple(paper.scale):
        parts.append(f"crop scale {scale[0]:g}-{scale[1]:g} (paper {paper.scale[0]:g}-{paper.scale[1]:g})")
    if not views.get("flip", paper.flip):
        parts.append("no horizontal flip (paper flips)")
    return "augmentation: " + ", ".join(parts) if parts else None


ORDINALCLIP_SELECTION = "OrdinalCLIP keeps the epoch of best validation MAE; on MORPH its validation list is its test list"


def _selection_phrases(select_every: int, age: bool) -> list[str]:
    """The model-selection departure: the papers' CoOp protocol keeps the last epoch; OrdinalCLIP (the age
    datasets' paper setting) keeps the epoch of best validation MAE (xk-huang/OrdinalCLIP ``runner.py``)."""
    if age:
        kept = selection_phrase(select_every) if select_every else "last epoch kept"
        return [f"{kept} ({ORDINALCLIP_SELECTION})"]
    return [f"{selection_phrase(select_every)} (paper: last epoch)"] if select_every else []


def training_departures(config: Mapping[str, Any], paper: Mapping[str, Any] | None,
                        train_views: Mapping[str, Any] | None, *, shots: int | None, age: bool = False) -> list[str]:
    """Departures of a run's training ``config`` (``TrainConfig.to_dict()``) from ``paper`` (the reference config of
    its method, same shape; None when the method has none), given the train store's view spec; ``age``: an age
    dataset, whose paper setting is OrdinalCLIP's."""
    found: list[str] = []
    if paper is not None:
        if config.get("batch_size") != paper.get("batch_size"):
            found.append(f"batch size {config.get('batch_size')} (paper {paper.get('batch_size')})")
        optimizer = [f"{label} {config.get(key)} (paper {paper.get(key)})" for key, label in _OPTIMIZER_FIELDS
                     if config.get(key) != paper.get(key)]
        found += optimizer
    if train_views is not None and int(config.get("max_epoch", 0)) > 0:  # a training-free run draws no views
        phrase = _views_phrase(int(train_views.get("n_aug", 0)), int(config.get("max_epoch", 0)),
                               str(config.get("views", "augmented")))
        found += [p for p in (phrase, _augmentation_phrase(train_views, age)) if p]
    if config.get("autocast_bf16"):
        found.append("text path in bf16 autocast (paper fp16)")
    if int(config.get("max_epoch", 0)) > 0:  # a training-free run has no epoch to keep
        found += _selection_phrases(int(config.get("select_every") or 0), age)
    if shots:
        found.append(NESTED_DRAWS)
    return found


def feature_departures(provenance: Mapping[str, Any]) -> list[str]:
    """Departures of a feature store's precision: CLIP's references run the image tower in fp16 (CoOp's ``PREC``),
    so fp16 and fp32 features are the paper's or better; bf16 keeps fewer mantissa bits."""
    if provenance.get("precision") == "bf16":
        return ["image features computed in bf16 (paper fp16)"]
    return []


def warn_single_view(n_aug: int, trains: bool) -> None:
    """Warn that ``--views 1`` with a training method trains every epoch on one fixed random crop per image (a crop
    that can cover 8% of the image), unlike the references' fresh crop per epoch."""
    if trains and n_aug == 1:
        logger.warning(
            "--views 1: every training epoch sees the same single random crop of each image (it can cover 8%% of "
            "the image); the paper draws %s. Use more views (default 16) for training", FRESH_CROPS
        )


# ---------------------------------------------------------------- a trained run's checkpoint
def paper_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The reference training config of the checkpoint's method (None when the method has none)."""
    try:
        return TrainConfig.for_method(ckpt.method.method, ckpt.run.shots or 16, ckpt.run.dataset).to_dict()
    except CoopipeError:
        return None


def _train_views(ckpt: Checkpoint) -> Mapping[str, Any] | None:
    views = ((ckpt.meta.get("stores") or {}).get("train") or {}).get("views")
    return views if isinstance(views, Mapping) else None


def training_record(ckpt: Checkpoint) -> dict[str, Any]:
    """What a metrics file records of the training: batch size against the paper's, the cached views it drew from,
    whether the text path ran in bf16, which epoch model selection kept and on what."""
    config, paper = ckpt.config.to_dict(), paper_config(ckpt) or {}
    return {"batch_size": config.get("batch_size"), "paper_batch_size": paper.get("batch_size"),
            "cached_views": (_train_views(ckpt) or {}).get("n_aug"), "text_bf16": bool(config.get("autocast_bf16")),
            "selection": ckpt.meta.get("selection") or selection_record(0, None)}


def checkpoint_departures(ckpt: Checkpoint, provenance: Mapping[str, Any]) -> list[str]:
    """Every departure of a trained run from its method's paper setting beyond weights and epochs (which
    :func:`coopipe.report.records.departures` reads from the metrics): batch size, optimizer, cached views against
    epochs, augmentation, model selection, text-path and feature precision (``provenance``: the evaluated store's),
    few-shot draws, and the method's own (:meth:`coopipe.methods.Method.departures`)."""
    return [*training_departures(ckpt.config.to_dict(), paper_config(ckpt), _train_views(ckpt),
                                 shots=ckpt.run.shots, age=is_age_dataset(str(ckpt.run.dataset or ""))),
            *ckpt.method.definition.departures(ckpt.method.options, ckpt.run.dataset),
            *feature_departures(provenance)]
