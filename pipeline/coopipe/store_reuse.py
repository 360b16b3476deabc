"""Finding an encode's finished stores without building the model.

Why: a store's path is the hash of its provenance, and the provenance names the model's preprocessing, which
open_clip only reports on a built model. Building RN50 with random weights takes about 6 s on a 2-core CPU, and a
re-run whose stores are all complete (every sweep after the first, every `dvc repro` of a later stage) would pay it
for nothing. The preprocessing is a function of the model name, the weights and the open_clip version, and every
store records all three with it; so a complete store of the same model, weights identity and open_clip version
in the dataset's cache folder tells the preprocessing exactly. The image tower's kind (which the precision rule
needs) follows from the model's open_clip config. With these, :func:`reuse_finished` recomputes each split's full
provenance as :func:`coopipe.encode.encode_split` would and verifies each store as a reuse always does (checksums
included). Anything missing, damaged or uncertain returns None, and the caller builds the model and encodes as usual:
this path can only skip work that is already done, never reuse a store the normal path would not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zarr

from coopipe.datasets.base import Dataset
from coopipe.encode import EncodeOptions, EncodeResult, build_provenance, complete_store
from coopipe.errors import CoopipeError
from coopipe.models import ClipIdentity, PreprocessConfig, is_conv_model, open_clip_version, resolve_weights
from coopipe.store import STORE_FORMAT, store_path
from coopipe.views import ViewSpec

logger = logging.getLogger(__name__)

__all__ = ["cached_identity", "reuse_finished"]


def _preprocess(record: Mapping[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(
        image_size=int(record["image_size"]),
        mean=tuple(float(v) for v in record["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in record["std"]),  # type: ignore[arg-type]
        interpolation=str(record["interpolation"]),
        resize_mode=str(record["resize_mode"]),
    )


def cached_identity(dataset_folder: Path, model: str, pretrained: str) -> ClipIdentity | None:
    """The identity of ``model`` with ``pretrained`` weights, read from a complete store of the same model, weights
    and open_clip version in ``dataset_folder``; None when there is none (or the weights cannot be resolved here)."""
    if not dataset_folder.is_dir():
        return None
    try:
        weights = resolve_weights(model, pretrained).identity
        version = open_clip_version()
    except CoopipeError:
        return None  # the normal path raises the clear error
    for path in sorted(dataset_folder.glob("*.zarr")):
        try:
            attrs: dict[str, Any] = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # noqa: BLE001 - not a readable store: the normal path reports it
            continue
        prov = attrs.get("provenance")
        if attrs.get("format") != STORE_FORMAT or not attrs.get("complete", False) or not isinstance(prov, dict):
            continue
        if (prov.get("model"), prov.get("weights"), prov.get("open_clip_version")) != (model, weights, version):
            continue
        try:
            preprocess = _preprocess(prov["preprocess"])
        except (KeyError, TypeError, ValueError):
            continue
        return ClipIdentity(model, weights, preprocess, is_conv_model(model))
    return None


def reuse_finished(
    dataset: Dataset,
    plans: Sequence[tuple[str, Sequence[int] | None, ViewSpec]],
    *,
    cache_dir: str | Path,
    identity: ClipIdentity,
    options: EncodeOptions,
) -> list[EncodeResult] | None:
    """One reused result per ``(split, positions, views)`` plan when every store is complete and
    intact, else None (then nothing was reused and the caller encodes as usual)."""
    started = time.perf_counter()
    resolved = options.resolved(identity)
    results = []
    for split, positions, views in plans:
        provenance = build_provenance(dataset, split, identity, views, positions=positions, options=resolved)
        done = complete_store(store_path(cache_dir, provenance), provenance, started)
        if done is None:
            return None
        results.append(done)
    logger.info("%d store(s) of %s already complete: the model was not loaded", len(results), dataset.name)
    return results
