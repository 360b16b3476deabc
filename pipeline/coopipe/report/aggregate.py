"""Mean ± std over seeds per dataset x shots x method: the numbers of the paper's tables and figures.

Why pure functions over :class:`~coopipe.report.records.RunRecord` values: the numbers a report prints must be
checkable by hand, so reading files (the job ``coopipe.jobs.report``) is kept apart from the arithmetic here,
which tests feed with hand-made records.

Conventions, as CoOp's reference ``tools/parse_test_res.py``:
- accuracies are in percent;
- the spread is the *population* standard deviation over seeds (``np.std``, ddof=0), not the sample one; with
  three seeds it is sqrt(2/3) ~ 0.82 times the sample std;
- the average over datasets is the mean of the per-dataset means; its spread is the std over seeds of the
  per-seed averages (seeds common to all datasets of the row);
- base-to-new results are reported with the harmonic mean H = 2 B N / (B + N) of the mean base and new
  accuracies, as CoCoOp does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from coopipe.report.names import AVERAGE, dataset_order, method_order
from coopipe.report.records import RunRecord

STD_DDOF = 0  # population std, as CoOp's parse_test_res.py (np.std)


@dataclass(frozen=True)
class Stat:
    """Mean ± population std (ddof=0) of per-seed values in percent, with the seeds and values themselves."""

    mean: float
    std: float
    n: int
    seeds: tuple[int | None, ...] = ()
    values: tuple[float, ...] = ()

    @property
    def single(self) -> bool:
        """One value (zero-shot CLIP, or a single seed): shown without ±."""
        return self.n == 1

    def text(self, *, digits: int = 2, expected_n: int | None = None) -> str:
        """``83.53 ± 1.20``; a seedless value without ±; `` (n=2)`` appended when fewer seeds than expected."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        body = f"{self.mean:.{digits}f}"
        if not self.single and not math.isnan(self.std):
            body += f" ± {self.std:.{digits}f}"
        if expected_n is not None and not self.single and self.n < expected_n:
            body += f" (n={self.n})"
        return body


def summarize(values: Sequence[float], seeds: Sequence[int | None] = ()) -> Stat:
    """Mean and population std (ddof=0, as CoOp's parser) of ``values`` (already in percent)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(arr.mean()), float(arr.std(ddof=STD_DDOF)), int(arr.size), tuple(seeds), tuple(arr.tolist()))


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b): CoCoOp's H of base and new accuracy (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def average_stat(stats: Sequence[Stat]) -> Stat:
    """The average of several datasets' results: mean = mean of their means; std = population std over seeds of
    the per-seed averages, on the seeds all of them have (n = the number of those seeds)."""
    per_seed = [dict(zip(s.seeds, s.values)) for s in stats]
    common = [seed for seed in per_seed[0] if all(seed in d for d in per_seed[1:])] if per_seed else []
    spread = summarize([float(np.mean([d[seed] for d in per_seed])) for seed in common], common)
    mean = float(np.mean([s.mean for s in stats])) if stats else float("nan")
    return Stat(mean, spread.std, spread.n, spread.seeds, spread.values)


def _seed_stat(records: Sequence[RunRecord], value: Callable[[RunRecord], float]) -> Stat:
    """Mean ± std of ``value`` (a fraction) over the records' seeds, in percent."""
    ordered = sorted(records, key=lambda r: (r.seed is None, r.seed or 0))
    return summarize([100.0 * value(r) for r in ordered], [r.seed for r in ordered])


# ---------------------------------------------------------------- few-shot table
@dataclass(frozen=True)
class Cell:
    """One dataset x model x method x shots over seeds (accuracy and macro-F1 in percent)."""

    dataset: str
    method: str
    shots: int
    accuracy: Stat
    model: str = ""
    macro_f1: Stat | None = None
    n_datasets: int = 1  # average cells: how many datasets went into it
    paths: tuple[str, ...] = ()
    note: str = ""  # the epochs departure of its runs (RunRecord.epochs_note), shown beside the number

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fewshot_cells(records: Iterable[RunRecord]) -> list[Cell]:
    """Cells of the few-shot records (zero-shot CLIP at 0 shots) per dataset x model x method x shots."""
    groups: dict[tuple[str, str, str, int, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.kind == "fewshot":
            groups[(r.dataset, r.model, r.method, r.shots, r.epochs_note)].append(r)
    cells = []
    for (dataset, model, method, shots, note), recs in groups.items():
        f1 = None
        if all(r.macro_f1 is not None for r in recs):
            f1 = _seed_stat(recs, lambda r: r.macro_f1 or 0.0)
        cells.append(Cell(dataset, method, shots, _seed_stat(recs, lambda r: r.accuracy), model, f1,
                          paths=tuple(sorted(r.path for r in recs)), note=note))
    return sorted(cells, key=lambda c: (dataset_order(c.dataset), c.shots, method_order(c.method), c.model))


def average_cells(cells: Iterable[Cell]) -> list[Cell]:
    """The "Average" column and panel: per model x method x shots, over the datasets that have the cell.

    See :func:`average_stat`; ``n_datasets`` tells how many datasets were averaged.
    """
    groups: dict[tuple[str, str, int], list[Cell]] = defaultdict(list)
    for c in cells:
        if c.dataset != AVERAGE:
            groups[(c.model, c.method, c.shots)].append(c)
    out = [Cell(AVERAGE, method, shots, average_stat([c.accuracy for c in members]), model, n_datasets=len(members),
                note="; ".join(sorted({c.note for c in members} - {""})))
           for (model, method, shots), members in groups.items()]
    return sorted(out, key=lambda c: (c.shots, method_order(c.method), c.model))


# ---------------------------------------------------------------- base-to-new and transfer
@dataclass(frozen=True)
class BaseNewRow:
    """CoCoOp's base-to-new result of one dataset x model x method x shots; H of the mean base and new."""

    dataset: str
    method: str
    shots: int
    base: Stat
    new: Stat
    model: str = ""

    @property
    def hm(self) -> float:
        if self.base.n == 0 or self.new.n == 0:
            return float("nan")
        return harmonic_mean(self.base.mean, self.new.mean)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hm": self.hm}


def base2new_rows(records: Iterable[RunRecord]) -> list[BaseNewRow]:
    """Base and new accuracy per dataset x model x method x shots, plus an average row per method."""
    groups: dict[tuple[str, str, str, int], dict[str, list[RunRecord]]] = defaultdict(lambda: {"base": [], "new": []})
    for r in records:
        if r.kind == "base2new":
            groups[(r.dataset, r.model, r.method, r.shots)][r.classes].append(r)
    rows = [
        BaseNewRow(ds, method, shots, _seed_stat(parts["base"], lambda r: r.accuracy),
                   _seed_stat(parts["new"], lambda r: r.accuracy), model)
        for (ds, model, method, shots), parts in groups.items()
    ]
    rows.sort(key=lambda r: (dataset_order(r.dataset), method_order(r.method), r.shots, r.model))
    by_method: dict[tuple[str, str, int], list[BaseNewRow]] = defaultdict(list)
    for row in rows:
        if row.base.n and row.new.n:
            by_method[(row.model, row.method, row.shots)].append(row)
    datasets = {r.dataset for r in rows}
    if len(datasets) > 1:
        for (model, method, shots), members in sorted(by_method.items(), key=lambda kv: (method_order(kv[0][1]), kv[0][2])):
            rows.append(BaseNewRow(AVERAGE, method, shots, average_stat([m.base for m in members]),
                                   average_stat([m.new for m in members]), model))
    return rows


@dataclass(frozen=True)
class TransferCell:
    """A prompt learned on ``source`` evaluated on ``dataset`` (cross-dataset / domain generalisation)."""

    source: str
    dataset: str
    method: str
    shots: int
    accuracy: Stat
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transfer_cells(records: Iterable[RunRecord]) -> list[TransferCell]:
    """Per source x target x model x method x shots over seeds."""
    groups: dict[tuple[str, str, str, str, int], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.kind == "transfer" and r.source is not None:
            groups[(r.source, r.dataset, r.model, r.method, r.shots)].append(r)
    cells = [TransferCell(src, ds, method, shots, _seed_stat(recs, lambda r: r.accuracy), model)
             for (src, ds, model, method, shots), recs in groups.items()]
    return sorted(cells, key=lambda c: (dataset_order(c.source), method_order(c.method), c.shots,
                                        dataset_order(c.dataset)))


# ---------------------------------------------------------------- gain over zero-shot (Figure 4)
@dataclass(frozen=True)
class Gain:
    """A method's accuracy minus zero-shot CLIP's on the same dataset and model (weights), in points; ``note``
    is the method's epochs departure, shown on the row (a shortened run is still compared, and says so)."""

    dataset: str
    method: str
    shots: int
    method_accuracy: float
    zeroshot_accuracy: float
    model: str = ""
    note: str = ""

    @property
    def points(self) -> float:
        return self.method_accuracy - self.zeroshot_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.points}


def gain_shots_for(cells: Iterable[Cell], method: str) -> int | None:
    """The most shots ``method`` has results for (16 in the full grid), or None."""
    shots = [c.shots for c in cells if c.method == method and c.dataset != AVERAGE]
    return max(shots) if shots else None


def gains_over_zeroshot(cells: Sequence[Cell], *, method: str | None = None, shots: int | None = None) -> list[Gain]:
    """Each method (or only ``method``) minus zero-shot CLIP of the same dataset and model, in points: per dataset
    x model x method at ``shots``, or at the most shots that method has there. Sorted by dataset, then method."""
    zero = {(c.dataset, c.model): c for c in cells if c.method == "zeroshot" and c.dataset != AVERAGE}
    mine = [c for c in cells if not c.method.startswith("zeroshot") and c.dataset != AVERAGE
            and (method is None or c.method == method) and (c.dataset, c.model) in zero]
    most: dict[tuple[str, str, str], int] = {}
    for c in mine:
        key = (c.dataset, c.model, c.method)
        most[key] = max(most.get(key, c.shots), c.shots)
    out = [Gain(c.dataset, c.method, c.shots, c.accuracy.mean, zero[(c.dataset, c.model)].accuracy.mean, c.model,
                c.note)
           for c in mine if c.shots == (shots if shots is not None else most[(c.dataset, c.model, c.method)])]
    return sorted(out, key=lambda g: (dataset_order(g.dataset), g.model, method_order(g.method), g.note))


# ---------------------------------------------------------------- cost (Tip-Adapter's Table 1)
@dataclass(frozen=True)
class CostRow:
    """A method's cost and accuracy on one dataset x model x shots, over seeds (:mod:`coopipe.cost` defines each
    number): training wall time (s), time per training image (s), inference images/s and peak memory (bytes) as
    mean ± std over the seeds that recorded them; ``stacked_runs`` > 1 when its runs shared a text pass."""

    dataset: str
    method: str
    shots: int
    accuracy: Stat
    train_seconds: Stat
    seconds_per_image: Stat
    images_per_s: Stat
    peak_memory_bytes: Stat
    epochs: int | None = None
    model: str = ""
    note: str = ""
    stacked_runs: int = 1
    memory_kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cost_stat(records: Sequence[RunRecord], field: str) -> Stat:
    """Mean ± population std of a cost field over the records that hold it (no percent scaling)."""
    pairs = [(r.seed, getattr(r.cost, field)) for r in records if r.cost is not None]
    pairs = [(seed, float(v)) for seed, v in pairs if v is not None]
    return summarize([v for _, v in pairs], [s for s, _ in pairs])


def cost_rows(records: Iterable[RunRecord]) -> list[CostRow]:
    """One row per dataset x model x method x shots (x epochs departure) of the few-shot results that recorded a
    cost, sorted as the few-shot table."""
    groups: dict[tuple[str, str, str, int, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.kind == "fewshot" and r.cost is not None:
            groups[(r.dataset, r.model, r.method, r.shots, r.epochs_note)].append(r)
    rows = []
    for (dataset, model, method, shots, note), recs in groups.items():
        costs = [r.cost for r in recs if r.cost is not None]
        epochs = {c.epochs for c in costs if c.epochs is not None}
        rows.append(CostRow(
            dataset, method, shots, _seed_stat(recs, lambda r: r.accuracy), _cost_stat(recs, "train_seconds"),
            _cost_stat(recs, "seconds_per_image"), _cost_stat(recs, "images_per_s"),
            _cost_stat(recs, "peak_memory_bytes"), epochs=max(epochs) if epochs else None, model=model, note=note,
            stacked_runs=max(c.stacked_runs for c in costs), memory_kind="; ".join(sorted({c.memory_kind for c in costs} - {""}))))
    return sorted(rows, key=lambda c: (dataset_order(c.dataset), c.shots, method_order(c.method), c.model))
