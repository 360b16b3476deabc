"""The exported classifier of a run: its class text features (K, D) and CLIP's logit scale in one safetensors file.

Why a file of its own: inference and evaluation of a prompt with one K x D classifier then need no text encoder;
the file carries its identity (model, weights, class names, where it came from) in its safetensors metadata, so a
classifier used with features of another model or class list is refused (:mod:`coopipe.compatibility`), and a
damaged one (rows missing, NaN) is one line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import coopipe
from coopipe.checkpoint_files import CLASSIFIER_FILE, read_metadata, read_tensors, write_tensors
from coopipe.compatibility import check_compatible
from coopipe.errors import CheckpointError
from coopipe.json_records import fields_of
from coopipe.store import FeatureStore

CLASSIFIER_FORMAT = "coopipe.classifier/1"


@dataclass
class Classifier:
    """A K x D text classifier exported from a prompt (or a zero-shot baseline)."""

    path: Path
    text_features: torch.Tensor  # (K, D) L2-normalised, float32
    logit_scale: float  # CLIP's log scale
    classnames: list[str]
    model: str
    weights: str
    source: dict[str, Any]

    def check_store(self, store: FeatureStore) -> None:
        check_compatible(
            what=f"classifier {self.path}",
            model=self.model,
            weights=self.weights,
            classnames=self.classnames,
            store=store,
        )


def export_classifier(
    path: str | os.PathLike[str],
    text_features: torch.Tensor,
    *,
    classnames: Sequence[str],
    model: str,
    weights: str,
    logit_scale: float,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the (K, D) normalised class text features and the logit scale as safetensors (identity in metadata)."""
    feats = torch.nn.functional.normalize(text_features.detach().float().cpu(), dim=-1)  # (K, D)
    if feats.ndim != 2 or feats.shape[0] != len(classnames):
        raise CheckpointError(
            f"classifier of shape {tuple(feats.shape)} does not have one row per class ({len(classnames)})"
        )
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "model": model,
        "weights": weights,
        "classnames": json.dumps(list(classnames)),
        "source": json.dumps(dict(source or {}), default=str),
        "coopipe_version": coopipe.__version__,
    }
    tensors = {"text_features": feats, "logit_scale": torch.tensor(float(logit_scale), dtype=torch.float32)}
    return write_tensors(Path(path), tensors, metadata)


def load_classifier(path: str | os.PathLike[str]) -> Classifier:
    """Load an exported classifier (a ``classifier.safetensors`` file or the checkpoint directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CLASSIFIER_FILE
    tensors = read_tensors(path, "classifier")
    meta = read_metadata(path)
    if meta.get("format") != CLASSIFIER_FORMAT or "text_features" not in tensors:
        raise CheckpointError(f"{path} is not a coopipe classifier (format {meta.get('format')!r}); re-export it")
    try:
        classnames = list(json.loads(meta["classnames"]))
        source = dict(json.loads(meta.get("source", "{}")))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"classifier {path} has unreadable metadata ({exc}); re-export it") from exc
    with fields_of(path, what="classifier", fix="re-run `coopipe train` with the same options to regenerate it",
                   error=CheckpointError):
        _check_rows(tensors["text_features"], classnames, path)
        if not bool(torch.isfinite(tensors["text_features"]).all()) or not bool(torch.isfinite(tensors["logit_scale"]).all()):
            raise CheckpointError(
                f"classifier {path} holds non-finite values (NaN/inf: its training diverged); re-train with a lower --lr"
            )
        return Classifier(
            path=path,
            text_features=tensors["text_features"],
            logit_scale=float(tensors["logit_scale"]),
            classnames=classnames,
            model=meta.get("model", ""),
            weights=meta.get("weights", ""),
            source=source,
        )


def _check_rows(text_features: torch.Tensor, classnames: list[str], where: Path) -> None:
    """An exported classifier has one row per class name (fewer rows used to end in an ``IndexError``)."""
    if text_features.ndim != 2 or text_features.shape[0] != len(classnames) or not text_features.dtype.is_floating_point:
        raise CheckpointError(f"classifier {where} holds {text_features.dtype} {tuple(text_features.shape)}, not one "
                              f"row per class ({len(classnames)}); re-run `coopipe train` with the same options to "
                              f"regenerate it")
