"""Using a learned prompt on classes it was not trained on: CoCoOp's base/new split and cross-dataset transfer.

Why this works at all: a *unified* CoOp context is shared by every class, so it can be spliced in front of any
class name, including names never seen in training; the classifier for the new names is simply the text
encoder's output for ``[SOS] ctx [CLASS] . [EOS]`` with those names. A class-specific context (CSC) has one
context per training class and cannot be moved to other classes: that is refused with a clear error.

- :class:`ClassSubset`: CoCoOp's protocol. Labels are sorted; the first ``ceil(K/2)`` classes are *base*, the
  rest *new*. Rows of other classes are dropped and the kept labels renumbered ``0..K'-1`` in the same order,
  so a subset looks like a dataset of its own to the trainer and the metrics.
- :func:`context_text_features`: the (K', D) classifier of a checkpoint's context for any class list.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from coopipe.checkpoint import Checkpoint
from coopipe.config import CLASS_SUBSETS
from coopipe.errors import CheckpointError, DatasetError, ParamsError
from coopipe.features import SplitFeatures
from coopipe.models import LoadedClip
from coopipe.store import FeatureStore

logger = logging.getLogger(__name__)



def subset_ids(n_classes: int, which: str) -> tuple[int, ...]:
    """Label ids of ``which`` among ``n_classes`` sorted labels: base = the first ceil(K/2), new = the rest."""
    if which not in CLASS_SUBSETS:
        raise ParamsError(f"classes must be one of {', '.join(CLASS_SUBSETS)}, got {which!r}")
    if n_classes < 1:
        raise DatasetError("a class subset needs at least one class")
    m = math.ceil(n_classes / 2)
    ids = {"all": range(n_classes), "base": range(m), "new": range(m, n_classes)}[which]
    if len(ids) == 0:
        raise DatasetError(f"a dataset of {n_classes} class(es) has no '{which}' classes (base = first ceil(K/2))")
    return tuple(ids)


@dataclass(frozen=True)
class ClassSubset:
    """Which classes of a dataset a run uses, and how their labels are renumbered."""

    which: str
    ids: tuple[int, ...]  # original labels kept, ascending
    classnames: tuple[str, ...]  # their names, in the new label order
    n_total: int  # number of classes of the full dataset

    @classmethod
    def of(cls, classnames: Sequence[str], which: str) -> ClassSubset:
        ids = subset_ids(len(classnames), which)
        return cls(which=which, ids=ids, classnames=tuple(classnames[i] for i in ids), n_total=len(classnames))

    def relabel(self, labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(boolean row mask of the kept rows, their labels renumbered 0..K'-1)."""
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        y = y.astype(np.int64).reshape(-1)
        mapping = np.full(self.n_total, -1, dtype=np.int64)
        mapping[list(self.ids)] = np.arange(len(self.ids))
        if y.size and (y.min() < 0 or y.max() >= self.n_total):
            raise DatasetError(f"labels must lie in 0..{self.n_total - 1} for {self.n_total} classes")
        new = mapping[y]
        keep = new >= 0
        return keep, new[keep]

    def apply(self, split: SplitFeatures) -> SplitFeatures:
        """The rows of ``split`` that belong to this subset, relabelled; the split itself when ``which == 'all'``."""
        if len(split.classnames) != self.n_total:
            raise DatasetError(
                f"store {split.store.path} has {len(split.classnames)} classes, the class subset was made for {self.n_total}"
            )
        if self.which == "all":
            return split
        keep, labels = self.relabel(split.labels)
        if not keep.any():
            raise DatasetError(f"store {split.store.path} holds no image of the {self.which} classes")
        rows = torch.from_numpy(np.flatnonzero(keep))
        return dataclasses.replace(
            split, features=split.features[rows], labels=torch.from_numpy(labels), classnames=list(self.classnames)
        )


def check_store_classes(ckpt: Checkpoint, store: FeatureStore, which: str) -> None:
    """Raise :class:`CheckpointError` unless ``store`` holds features of the checkpoint's model and weights and
    its ``which`` classes are exactly the checkpoint's classes (a resumed or re-evaluated subset run)."""
    prov = store.provenance
    problems = []
    if (prov.get("model"), prov.get("weights")) != (ckpt.model, ckpt.weights):
        problems.append(f"model {ckpt.model} ({ckpt.weights}) vs {prov.get('model')} ({prov.get('weights')})")
    names = list(ClassSubset.of(list(prov.get("classnames", [])), which).classnames)
    if names != ckpt.classnames:
        problems.append(f"the {which} classes of the store are {len(names)} other names than the checkpoint's {len(ckpt.classnames)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit store {store.path}: {'; '.join(problems)}; use another run folder "
            f"or the store the run was trained on"
        )


def check_same_encoder(ckpt: Checkpoint, store: FeatureStore) -> None:
    """Raise unless ``store`` was encoded by the image encoder the prompt was trained against (model + weights)."""
    prov = store.provenance
    if (prov.get("model"), prov.get("weights")) != (ckpt.model, ckpt.weights):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained on {ckpt.model} ({ckpt.weights}) features, store {store.path} holds "
            f"{prov.get('model')} ({prov.get('weights')}) features; encode the target dataset with the same model "
            f"and weights (coopipe encode --model {ckpt.model} --pretrained ...)"
        )


def context_text_features(ckpt: Checkpoint, clip: LoadedClip, classnames: Sequence[str]) -> torch.Tensor:
    """The L2-normalised class text features (K', D) of ``ckpt``'s learned prompt for ``classnames``.

    Needs a prompt that does not belong to its classes (a unified context); a class-specific context is tied to
    the classes it was trained for and raises :class:`CheckpointError` (see :func:`coopipe.trained_learner.load_learner`).
    """
    if list(classnames) != ckpt.classnames:
        logger.info("building a %d-class classifier from the context of %s", len(classnames), ckpt.path)
    return ckpt.text_features(clip, classnames)
