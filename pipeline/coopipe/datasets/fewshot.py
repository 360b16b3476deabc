"""CoOp's few-shot protocol: K images per class from train, min(K, 4) per class from val, per seed.

Sampling is a pure function of (labels, shots, seed): it draws from its own ``numpy.random.Generator`` (never
global random state), so the same seed gives the same indices on every machine and run. Each class gets one
permutation per seed, cut to K, so smaller draws nest in larger ones. Indices are positions
in the dataset's split lists (stores hold rows of the full split). A :class:`FewShotIndex` records one draw,
with the split file-list hashes it was drawn from, as a small JSON file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.atomic import write_json
from coopipe.datasets.base import Dataset
from coopipe.datasets.common import shown
from coopipe.errors import DatasetError, MissingFileError
from coopipe.json_records import read_json

VAL_MAX_SHOTS = 4  # CoOp: the validation subset has min(K, 4) images per class
INDEX_FORMAT = "coopipe.fewshot/1"

_TRAIN_STREAM, _VAL_STREAM = 0, 1  # independent generator streams for the two draws of one seed


def sample_few_shot(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    shots: int,
    *,
    seed: int,
    classnames: Sequence[str] | None = None,
    source: str = "",
    strict: bool = True,
) -> np.ndarray:
    """Positions of exactly ``shots`` images per class, drawn without replacement; sorted ascending (int64).

    Raises :class:`DatasetError` if a class has fewer than ``shots`` images (naming the class and the counts);
    ``classnames`` and ``source`` (e.g. the split file) only make that message clearer. ``strict=False`` (ordinal
    labels) keeps every image of a class with fewer instead.
    """
    _check_shots(shots)
    return _sample(labels, num_classes, shots, seed=seed, stream=_TRAIN_STREAM, strict=strict,
                   classnames=classnames, source=source)


def sample_val(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    shots: int,
    *,
    seed: int,
    classnames: Sequence[str] | None = None,
    source: str = "",
) -> np.ndarray:
    """Positions of ``min(shots, 4)`` validation images per class (all of a class's images if it has fewer,
    as CoOp does); sorted ascending (int64). ``shots`` is the training K."""
    _check_shots(shots)
    return _sample(labels, num_classes, min(shots, VAL_MAX_SHOTS), seed=seed, stream=_VAL_STREAM, strict=False,
                   classnames=classnames, source=source)


@dataclass(frozen=True)
class FewShotIndex:
    """One few-shot draw: which train and val rows (positions in the full splits) a run uses."""

    dataset: str
    shots: int
    seed: int
    train_indices: tuple[int, ...]
    val_indices: tuple[int, ...]
    split_hashes: dict[str, str] = field(default_factory=dict)  # split -> Dataset.file_list_hash(split)
    val_shots: int = 0
    # Each class's draw in draw order (one permutation per class, cut to K): the K'-shot draw of the same seed
    # is the first K' of each, so fewer shots are derived from this index without the images (see nested()).
    train_order: tuple[tuple[int, ...], ...] | None = None
    val_order: tuple[tuple[int, ...], ...] | None = None

    def nested(self, shots: int) -> FewShotIndex:
        """The draw of ``shots`` <= this index's shots for the same seed, derived from the recorded draw order
        (equal to drawing it from the dataset: the draws are nested)."""
        _check_shots(shots)
        if shots > self.shots or self.train_order is None or (self.val_indices and self.val_order is None):
            raise DatasetError(
                f"the {self.shots}-shot index of {self.dataset} (seed {self.seed}) cannot give a {shots}-shot draw"
                + ("" if shots > self.shots else " (it records no draw order: written by an older coopipe)")
                + f"; encode with `coopipe encode --dataset {self.dataset} --shots {shots} --seeds {self.seed} ...`"
            )
        val_shots = min(shots, VAL_MAX_SHOTS)
        val_order = tuple(c[:val_shots] for c in self.val_order) if self.val_order is not None else None
        train_order = tuple(c[:shots] for c in self.train_order)
        return FewShotIndex(
            dataset=self.dataset, shots=shots, seed=self.seed,
            train_indices=tuple(sorted(i for c in train_order for i in c)),
            val_indices=tuple(sorted(i for c in val_order for i in c)) if val_order is not None else (),
            split_hashes=dict(self.split_hashes), val_shots=val_shots, train_order=train_order, val_order=val_order,
        )

    def train_array(self) -> np.ndarray:
        return np.asarray(self.train_indices, dtype=np.int64)

    def val_array(self) -> np.ndarray:
        return np.asarray(self.val_indices, dtype=np.int64)

    def default_filename(self) -> str:
        """``<dataset>-shots<K>-seed<S>.json``."""
        return f"{self.dataset}-shots{self.shots}-seed{self.seed}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "dataset": self.dataset,
            "shots": self.shots,
            "val_shots": self.val_shots,
            "seed": self.seed,
            "split_hashes": dict(self.split_hashes),
            "train_indices": list(self.train_indices),
            "val_indices": list(self.val_indices),
            "train_order": [list(c) for c in self.train_order] if self.train_order is not None else None,
            "val_order": [list(c) for c in self.val_order] if self.val_order is not None else None,
        }

    def save(self, path: str | Path) -> Path:
        """Write the index as compact JSON atomically (:func:`coopipe.atomic.write_json`); returns the path."""
        return write_json(path, self.to_dict(), indent=None, separators=(",", ":"))

    @classmethod
    def load(cls, path: str | Path) -> FewShotIndex:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"few-shot index {path} not found; create it by sampling the few-shot split")
        raw = read_json(path, what="few-shot index", fix="delete and re-create it", error=DatasetError)
        try:
            if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is not {INDEX_FORMAT!r}")
            index = cls(
                dataset=_typed(raw["dataset"], str),
                shots=_typed(raw["shots"], int),
                seed=_typed(raw["seed"], int),
                train_indices=tuple(_typed(i, int) for i in raw["train_indices"]),
                val_indices=tuple(_typed(i, int) for i in raw["val_indices"]),
                split_hashes={_typed(k, str): _typed(v, str) for k, v in raw["split_hashes"].items()},
                val_shots=_typed(raw.get("val_shots", 0), int),
                train_order=_order(raw.get("train_order")),
                val_order=_order(raw.get("val_order")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DatasetError(
                f"few-shot index {path} has the wrong format ({exc!s}); delete and re-create it"
            ) from exc
        return index

    def check_dataset(self, dataset: Dataset, *, source: str = "") -> None:
        """Raise :class:`DatasetError` unless this index was drawn from ``dataset``'s current split lists."""
        where = f"few-shot index {source}" if source else "few-shot index"
        if dataset.name != self.dataset:
            raise DatasetError(f"{where} is for dataset {self.dataset!r}, not {dataset.name!r}; use the right index")
        for split, digest in self.split_hashes.items():
            current = dataset.file_list_hash(split)
            if current != digest:
                raise DatasetError(
                    f"{where}: the {split} list of {dataset.name} changed since the index was made "
                    f"(hash {digest[:12]} -> {current[:12]}); re-create the index"
                )
        for split, indices in (("train", self.train_indices), ("val", self.val_indices)):
            if indices and (min(indices) < 0 or max(indices) >= len(dataset.splits.get(split, ()))):
                raise DatasetError(f"{where}: {split} indices out of range for {dataset.name}; re-create the index")


def make_few_shot_index(dataset: Dataset, shots: int, seed: int) -> FewShotIndex:
    """Draw the train (K per class) and val (min(K, 4) per class) subsets of ``dataset`` for one seed.

    An ``ordinal`` dataset (ages) takes OrdinalCLIP's rule (``generate_fewshot_dataset``): a rank with fewer than
    K images keeps them all, and ranks without images are normal; a ``class`` dataset refuses a class that is too
    small. The draws use the same generator streams either way, so they are explicit, reproducible and nested.
    """
    train = dataset.split("train")
    val = dataset.splits.get("val")
    hashes = {"train": dataset.file_list_hash("train")}
    if val is not None and len(val):
        hashes["val"] = dataset.file_list_hash("val")
    return draw_index(
        dataset.name, train.labels, val.labels if val is not None and len(val) else None, dataset.num_classes,
        shots, seed, strict=dataset.label_kind == "class", split_hashes=hashes, classnames=dataset.classnames,
        source=f"the train split of {dataset.name} ({dataset.source or dataset.image_root})",
    )


def draw_index(
    dataset: str,
    train_labels: Sequence[int] | np.ndarray,
    val_labels: Sequence[int] | np.ndarray | None,
    num_classes: int,
    shots: int,
    seed: int,
    *,
    strict: bool,
    split_hashes: dict[str, str] | None = None,
    train_positions: Sequence[int] | np.ndarray | None = None,
    val_positions: Sequence[int] | np.ndarray | None = None,
    classnames: Sequence[str] | None = None,
    source: str = "",
) -> FewShotIndex:
    """The :class:`FewShotIndex` of one (shots, seed) draw from label lists, with each class's draw order.

    Why one function: the dataset draw (CoOp's strict rule, or the age rule with ``strict=False``: a class with
    fewer than K images keeps them all) and the lookup's draw from a full-split store must give the same index.
    ``train_positions``/``val_positions`` map label rows to split positions (a store's ``index()``; identity
    when None). ``val_labels`` None or empty: no validation draw.
    """
    _check_shots(shots)

    def mapped(order: list[np.ndarray], positions: Sequence[int] | np.ndarray | None) -> tuple[tuple[int, ...], ...]:
        pos = None if positions is None else np.asarray(positions, dtype=np.int64)
        return tuple(tuple(int(i) for i in (c if pos is None else pos[c])) for c in order)

    train_order = mapped(_draw(train_labels, num_classes, shots, seed=seed, stream=_TRAIN_STREAM, strict=strict,
                               classnames=classnames, source=source), train_positions)
    val_order = None
    if val_labels is not None and len(val_labels):
        val_order = mapped(_draw(val_labels, num_classes, min(shots, VAL_MAX_SHOTS), seed=seed, stream=_VAL_STREAM,
                                 strict=False, classnames=None, source=""), val_positions)
    return FewShotIndex(
        dataset=dataset,
        shots=shots,
        seed=seed,
        train_indices=tuple(sorted(i for c in train_order for i in c)),
        val_indices=tuple(sorted(i for c in val_order for i in c)) if val_order is not None else (),
        split_hashes=dict(split_hashes or {}),
        val_shots=min(shots, VAL_MAX_SHOTS),
        train_order=train_order,
        val_order=val_order,
    )


def few_shot_union(dataset: Dataset, shots_list: Iterable[int], seeds: Iterable[int]) -> np.ndarray:
    """Sorted, distinct train positions used by any (shots, seed) pair: the images that need augmented views."""
    train = dataset.split("train")
    seeds = list(seeds)
    parts = [
        sample_few_shot(train.labels, dataset.num_classes, shots, seed=seed, classnames=dataset.classnames,
                        source=f"the train split of {dataset.name}", strict=dataset.label_kind == "class")
        for shots in shots_list
        for seed in seeds
    ]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(parts)).astype(np.int64)


def _sample(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    per_class: int,
    *,
    seed: int,
    stream: int,
    strict: bool,
    classnames: Sequence[str] | None,
    source: str,
) -> np.ndarray:
    return _sorted(_draw(labels, num_classes, per_class, seed=seed, stream=stream, strict=strict,
                         classnames=classnames, source=source))


def _sorted(order: Sequence[np.ndarray]) -> np.ndarray:
    """All positions of a per-class draw, sorted ascending (int64)."""
    if not len(order):
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([np.asarray(c, dtype=np.int64) for c in order])).astype(np.int64)


def _order(raw: Any) -> tuple[tuple[int, ...], ...] | None:
    if raw is None:
        return None
    return tuple(tuple(_typed(i, int) for i in c) for c in raw)


def _draw(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    per_class: int,
    *,
    seed: int,
    stream: int,
    strict: bool,
    classnames: Sequence[str] | None,
    source: str,
) -> list[np.ndarray]:
    """Each class's draw, in draw order (a list of one array per class)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"few-shot seed must be a non-negative integer, got {seed!r}")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"labels must lie in 0..{num_classes - 1} for {num_classes} classes{_in(source)}")
    counts = np.bincount(y, minlength=num_classes)
    if strict:
        short = [int(c) for c in np.flatnonzero(counts < per_class)]
        if short:
            names = [_class_label(c, classnames) for c in short]
            first = short[0]
            raise DatasetError(
                f"class {names[0]} has {counts[first]} images but {per_class} shots were requested{_in(source)}"
                + (f" ({len(short) - 1} more classes are short: {shown(names[1:])})" if len(short) > 1 else "")
                + (f"; use shots <= {smallest}" if (smallest := int(counts.min())) else
                   "; a class without images cannot be sampled: add images or remove the class")
            )
    order = np.argsort(y, kind="stable")  # positions grouped by class, ascending within a class
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen = []
    for c in range(num_classes):
        pool = order[starts[c] : starts[c + 1]]
        take = min(per_class, pool.size)
        if take:
            # One permutation per (stream, seed, class), cut to K: the K-shot draw is a prefix of the
            # 16-shot draw of the same seed, so the images needing augmented views over all shots of a
            # seed are just its largest draw (a third of the encoding of independent draws).
            rng = np.random.default_rng([stream, int(seed), c])
            chosen.append(rng.permutation(pool)[:take].astype(np.int64))
        else:
            chosen.append(np.zeros(0, dtype=np.int64))
    return chosen


def _check_shots(shots: int) -> None:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise DatasetError(f"shots must be a positive integer (CoOp uses 1, 2, 4, 8, 16), got {shots!r}")


def _class_label(c: int, classnames: Sequence[str] | None) -> str:
    return f"{classnames[c]!r} (label {c})" if classnames is not None and c < len(classnames) else f"label {c}"


def _in(source: str) -> str:
    return f" in {source}" if source else ""


def _typed(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {value!r:.40}")
    return value
