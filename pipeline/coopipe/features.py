"""Find the feature store a training or evaluation step needs, and read it into tensors.

Why a separate step: the trainer and the baselines take plain tensors, so they can be tested on in-memory
data; everything that can go wrong with the cache (no store for the requested split, a store built with
another model or weights, a subset store lacking the few-shot images, NaN/inf features) is caught here and
turned into a :class:`~coopipe.errors.StoreError` saying which command fixes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from coopipe.errors import StoreError
from coopipe.store import FeatureStore, find_stores

logger = logging.getLogger(__name__)

__all__ = [
    "SplitFeatures",
    "read_split",
    "select_store",
]


@dataclass
class SplitFeatures:
    """Features of some rows of one split, read from one store."""

    features: torch.Tensor  # (N, V, D) raw float32 (V = 1 when only the centre view was read)
    labels: torch.Tensor  # (N,) int64
    classnames: list[str]
    store: FeatureStore

    @property
    def center(self) -> torch.Tensor:
        """The centre-crop view (N, D)."""
        return self.features[:, 0]


def select_store(
    cache_dir: str | os.PathLike[str],
    dataset: str,
    split: str,
    *,
    model: str,
    weights: str,
    positions: Sequence[int] | np.ndarray | None = None,
    need_views: bool = False,
) -> FeatureStore:
    """The store of ``dataset``/``split`` from ``model``/``weights`` that holds ``positions`` (all rows if None).

    Prefers stores with augmented views (``find_stores`` sorts them first). With ``need_views`` a centre-only store
    is still accepted, with a warning, since CoOp can train on the centre view. Raises :class:`StoreError` naming
    the ``coopipe encode`` call that would create a suitable store.
    """
    stores = find_stores(cache_dir, dataset, split, model=model, weights=weights)
    fix = f"run `coopipe encode` for dataset {dataset}, split {split}, model {model}, weights {weights}"
    if not stores:
        raise StoreError(f"no feature store for {dataset}/{split} ({model}, {weights}) under {cache_dir}; {fix} first")
    for store in stores:
        if positions is None:
            if store.provenance.get("rows", "all") == "all":
                break
            continue
        try:
            store.rows_for(positions)
        except StoreError:
            continue
        break
    else:
        what = "the whole split" if positions is None else f"all {len(positions)} requested images"
        raise StoreError(
            f"no store for {dataset}/{split} ({model}, {weights}) under {cache_dir} holds {what} "
            f"(found {len(stores)} subset store(s)); {fix} covering those images"
        )
    if need_views:
        _check_one_augmentation(stores, positions)
    if need_views and store.n_views == 1:
        logger.warning("store %s holds only the centre view: training without cached augmentation", store.path)
    return store


def _check_one_augmentation(stores: Sequence[FeatureStore], positions: Sequence[int] | np.ndarray | None) -> None:
    """Refuse a choice between stores of different augmentations (``coopipe encode --augment``): which crops a run
    trains on changes its result, so it is never decided by the order stores are found in."""
    kinds: dict[str, FeatureStore] = {}
    for store in stores:
        views = store.provenance.get("views") or {}
        if int(views.get("n_aug", 0)) == 0:
            continue
        if positions is not None:
            try:
                store.rows_for(positions)
            except StoreError:
                continue
        kinds.setdefault(str(views.get("augmentation")), store)
    if len(kinds) > 1:
        found = "; ".join(f"{kind}: {store.path}" for kind, store in kinds.items())
        raise StoreError(f"the cache holds training views of {len(kinds)} augmentations for these images ({found}); "
                         f"training would pick one by chance: keep one augmentation per cache (move the other "
                         f"stores to another --features folder)")


def read_split(
    store: FeatureStore,
    positions: Sequence[int] | np.ndarray | None = None,
    *,
    all_views: bool = True,
) -> SplitFeatures:
    """Read the rows of ``positions`` (split positions; all valid rows if None) as float32 tensors.

    ``all_views=False`` reads only the centre view (evaluation). Raises :class:`StoreError` for missing or
    unreadable rows and for NaN/inf features.
    """
    if positions is None:
        rows = np.flatnonzero(store.valid())
        skipped = store.n_rows - rows.size
        if skipped:
            logger.warning("store %s: leaving out %d image(s) skipped at encode time", store.path, skipped)
    else:
        rows = store.rows_for(positions)
    if rows.size == 0:
        raise StoreError(f"store {store.path} has no readable rows; re-encode it")
    feats = store.read(rows, view=None if all_views else 0)  # (N, V, D) or (N, D); checks NaN/inf
    if feats.ndim == 2:
        feats = feats[:, None, :]  # (N, 1, D)
    return SplitFeatures(
        features=torch.from_numpy(np.ascontiguousarray(feats)),
        labels=torch.from_numpy(store.labels()[rows]),
        classnames=store.classnames(),
        store=store,
    )
