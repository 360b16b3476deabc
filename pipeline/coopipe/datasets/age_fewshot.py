"""Few-shot draws for age datasets: K images per age value from train; an age with fewer than K keeps them all.

Why not :func:`coopipe.datasets.fewshot.make_few_shot_index`: coopipe's rule for classes refuses a class with fewer
than K images (CoOp's own, Dassl's ``generate_fewshot_dataset`` with its default ``repeat=True``, instead draws such a
class's K with replacement), and ranks without images are normal for ages. OrdinalCLIP's rule
(``RegressionDataset.generate_fewshot_dataset`` in xk-huang/OrdinalCLIP, ``ordinalclip/runner/data.py``, with its
default ``repeat=False``) samples K images of each age without replacement and keeps every image of an age that has
fewer; that part is followed here. Where this module departs from it: the reference draws each K independently
with Python's ``random.sample`` and subsamples only the train list (validation is the whole val list), while here
the draws use the same generator streams as CoOp's (one permutation per (stream, seed, rank), cut to K), so the
K-shot draw of a seed is a subset of its 2K-shot draw, and validation is min(K, 4) images per age, as CoOp's. The
result is an ordinary :class:`FewShotIndex`, so lookups and stores work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from coopipe.datasets.base import Dataset
from coopipe.datasets.fewshot import (
    _TRAIN_STREAM,
    FewShotIndex,
    _check_shots,
    _sample,
    draw_index,
)

__all__ = ["age_few_shot_union", "make_age_few_shot_index", "sample_age_few_shot"]


def sample_age_few_shot(labels: Sequence[int] | np.ndarray, num_ranks: int, shots: int, *, seed: int) -> np.ndarray:
    """Positions of ``min(shots, n_r)`` images of every rank r (n_r: its images), sorted ascending (int64)."""
    _check_shots(shots)
    return _sample(labels, num_ranks, shots, seed=seed, stream=_TRAIN_STREAM, strict=False, classnames=None,
                   source="")


def make_age_few_shot_index(dataset: Dataset, shots: int, seed: int) -> FewShotIndex:
    """The train draw (K per age, sparse ages keep all) and val draw (min(K, 4) per age) of ``dataset``, with each
    age's draw order (so fewer shots of the same seed derive from it: :meth:`FewShotIndex.nested`)."""
    train = dataset.split("train")
    val = dataset.splits.get("val")
    hashes = {"train": dataset.file_list_hash("train")}
    if val is not None and len(val):
        hashes["val"] = dataset.file_list_hash("val")
    return draw_index(dataset.name, train.labels, val.labels if val is not None and len(val) else None,
                      dataset.num_classes, shots, seed, strict=False, split_hashes=hashes)


def age_few_shot_union(dataset: Dataset, shots_list: Iterable[int], seeds: Iterable[int]) -> np.ndarray:
    """Sorted, distinct train positions used by any (shots, seed) pair (the images needing augmented views)."""
    labels = dataset.split("train").labels
    seeds = list(seeds)
    parts = [sample_age_few_shot(labels, dataset.num_classes, k, seed=s) for k in shots_list for s in seeds]
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
