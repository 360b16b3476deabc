"""Stage `encode`: every image that later stages read goes through the image encoder exactly once.

What gets encoded (encoder time is spent only where it is used):
- ``test``: every image, centre view;
- ``train``: with few-shot ``shots``/``seeds`` given, only the union of the images those draws select, with
  ``views`` augmented views each beside the centre view (training draws one per epoch); without shots, the
  whole split;
- ``val``: with shots, the union of the few-shot validation subsets (min(K, 4) per class); else all; centre view.
The few-shot draws are written as small index files under ``<cache>/<dataset>/fewshot/``.

Run by DVC as ``python stages/encode.py`` (reads params.yaml) and by ``coopipe encode``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coopipe.hardware import check_device
from coopipe.atomic import write_json
from coopipe.config import EncodeConfig, ModelSpec, PathsConfig
from coopipe.datasets import load_dataset
from coopipe.datasets.base import Dataset
from coopipe.datasets.common import check_confined
from coopipe.datasets.fewshot import FewShotIndex, make_few_shot_index
from coopipe.encode import EncodeOptions, EncodeResult, encode_split
from coopipe.lookup import fewshot_index_path
from coopipe.models import check_model_name, load_clip
from coopipe.store import dataset_folder
from coopipe.store_reuse import cached_identity, reuse_finished
from coopipe.views import ViewSpec

logger = logging.getLogger(__name__)

ALL_SPLITS = ("train", "val", "test")


def write_fewshot_indices(dataset: Dataset, shots: Sequence[int], seeds: Sequence[int], cache_dir: str | Path) -> list[FewShotIndex]:
    """Draw and save every (shots, seed) index; raises DatasetError before any encoding if a class is too small.

    Ordinal datasets (ages) take the age rule (K per age, an age with fewer keeps them all, ranks without images
    are normal): :func:`coopipe.datasets.fewshot.make_few_shot_index` reads the dataset's label kind.
    """
    indices = [make_few_shot_index(dataset, k, s) for k in shots for s in seeds]
    for index in indices:
        index.save(fewshot_index_path(cache_dir, dataset.name, index.shots, index.seed))
    return indices


@dataclass(frozen=True)
class SplitPlan:
    split: str
    positions: list[int] | None
    views: ViewSpec


def plan_splits(
    dataset: Dataset,
    splits: Sequence[str],
    *,
    views: ViewSpec,
    indices: Sequence[FewShotIndex],
) -> list[SplitPlan]:
    """Which rows and views each split gets (see the module docstring). A few-shot store is keyed by the rows the
    draws select, not by the shots and seeds that asked for them: the draws are nested, so ``[1,16]`` and
    ``[1,2,4,8,16]`` select the same rows and share one store."""
    plans = []
    for split in splits:
        if split == "test":
            plans.append(SplitPlan(split, None, ViewSpec()))
            continue
        if split not in dataset.splits or len(dataset.splits[split]) == 0:
            logger.warning("dataset %s has no %s split: skipped", dataset.name, split)
            continue
        if split == "train":
            pos = sorted({int(i) for ix in indices for i in ix.train_indices}) if indices else None
            plans.append(SplitPlan(split, pos, views))
        else:
            pos = sorted({int(i) for ix in indices for i in ix.val_indices}) if indices else None
            plans.append(SplitPlan(split, pos, ViewSpec()))
    return plans


def run_encode(
    *,
    dataset: str,
    data_root: str | Path,
    splits: Sequence[str] = ALL_SPLITS,
    cache_dir: str | Path = PathsConfig.cache,
    model: str = ModelSpec.name,
    pretrained: str = ModelSpec.pretrained,
    views: int = EncodeConfig.views,
    crop_scale: tuple[float, float] = EncodeConfig.crop_scale,
    aug_seed: int = EncodeConfig.aug_seed,
    augment: str = EncodeConfig.augment,
    shots: Sequence[int] = (),
    seeds: Sequence[int] = (),
    options: EncodeOptions = EncodeOptions(),
    scheduler: str | None = EncodeConfig.scheduler,
    confine_paths: bool = EncodeConfig.confine_paths,
    dataset_options: Mapping[str, Any] | None = None,
) -> list[EncodeResult]:
    """Encode the requested splits of ``dataset``; returns one result per store (reused ones included).

    ``dataset_options`` go to the dataset's builder (an age dataset's ``min_age``/``max_age``, a split file...)
    and into every store's provenance.

    ``confine_paths`` refuses image paths that resolve outside the dataset's image folder (for split files
    and manifests from untrusted sources); by default they may point anywhere.
    """
    spec = ViewSpec(n_aug=views, scale=tuple(crop_scale), seed=aug_seed, augment=augment)  # type: ignore[arg-type]  # checked first
    check_model_name(model)  # an unknown or unsupported model is refused before the data is read
    data = load_dataset(dataset, data_root, **dict(dataset_options or {}))
    if confine_paths:
        check_confined(Path(data.image_root), data.splits, source=data.source or str(data_root))
    if bool(shots) != bool(seeds):
        raise ValueError("give both --shots and --seeds (or neither)")
    # A test-only encode needs no few-shot draw (and must not fail on a split too small for the shots).
    needs_draws = bool(shots) and any(s in ("train", "val") for s in splits)
    indices = write_fewshot_indices(data, shots, seeds, cache_dir) if needs_draws else []
    identity = cached_identity(dataset_folder(cache_dir, data.name), model, pretrained)
    plans = None
    if identity is not None:  # a re-run whose stores are all complete needs no model
        plans = plan_splits(data, splits, views=spec, indices=indices)
        reused = reuse_finished(data, [(p.split, p.positions, p.views) for p in plans], cache_dir=cache_dir,
                                identity=identity, options=options)
        if reused is not None:
            return reused
    check_device(options.device)
    clip = load_clip(model, pretrained, device=options.device)
    results = []
    if plans is None:  # planned after the model loads: bad weights fail before any other message
        plans = plan_splits(data, splits, views=spec, indices=indices)
    for plan in plans:
        results.append(
            encode_split(
                data, plan.split, cache_dir=cache_dir, views=plan.views, positions=plan.positions,
                options=options, scheduler=scheduler, clip=clip,
            )
        )
    if any(not r.reused for r in results):  # a no-op re-run keeps the summary of the run that did the work
        write_json(Path(cache_dir) / data.name / "encode_summary.json", [_result_dict(r) for r in results])
    return results


def _result_dict(result: EncodeResult) -> dict:
    return {
        "store": str(result.path),
        "rows": result.n_rows,
        "views": result.n_views,
        "encoded_rows": result.encoded_rows,
        "reused": result.reused,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 2),
        "skipped": len(result.skipped),
    }


def preflight(dataset: str, data_root: str, model: str, pretrained: str,
              dataset_options: Mapping[str, Any] | None = None) -> None:
    """Check data and weights before any work, and say in one message everything that must be set."""
    from coopipe.errors import CoopipeError, ParamsError
    from coopipe.models import check_weights_available

    problems = []
    try:
        load_dataset(dataset, data_root, **dict(dataset_options or {}))
    except CoopipeError as exc:
        problems.append(f"data: {exc} -> set data.root in params.yaml to your local dataset root")
    try:
        check_weights_available(model, pretrained)
    except CoopipeError as exc:
        problems.append(f"model: {exc}")
    if problems:
        raise ParamsError("cannot run the pipeline as configured:\n  " + "\n  ".join(problems))
