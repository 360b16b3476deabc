"""The paper's tables and figures from finished runs: mean ± std over seeds per dataset x shots x method.

Why pure functions over :class:`RunRecord` values: the numbers a report prints must be checkable by hand, so
reading files (the stage ``coopipe.jobs.report``) is kept apart from the arithmetic and the layout here, which
tests feed with hand-made records.

Conventions, as CoOp's reference ``tools/parse_test_res.py``:
- accuracies are shown in percent with two decimals;
- the spread is the *population* standard deviation over seeds (``np.std``, ddof=0), not the sample one; with
  three seeds it is sqrt(2/3) ~ 0.82 times the sample std. Every table caption says so.
- the average over datasets is the mean of the per-dataset means; its spread is the std over seeds of the
  per-seed averages (seeds common to all datasets of the row).

Records come in four kinds, told apart by fields the evaluation writes into ``metrics.json``:
``fewshot`` (all classes; zero-shot CLIP counts as 0 shots), ``base2new`` (``classes`` base/new: CoCoOp's
protocol, reported with the harmonic mean H = 2 B N / (B + N) of the mean base and new accuracies, as CoCoOp
does), ``transfer`` (``source_dataset`` differs from ``dataset``: cross-dataset and domain generalisation).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.errors import CoopipeError

logger = logging.getLogger(__name__)

STD_DDOF = 0  # population std, as CoOp's parse_test_res.py (np.std)
AVERAGE = "average"
STD_NOTE = (
    "mean ± std over seeds; std is the population standard deviation (ddof=0, numpy's np.std, as CoOp's "
    "parse_test_res.py)"
)

# CoOp's benchmark order (the paper's tables and Figure 3), then the ImageNet variants.
DATASET_LABELS: dict[str, str] = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenetv2": "ImageNetV2",
    "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A",
    "imagenet_r": "ImageNet-R",
    AVERAGE: "Average",
}
_METHOD_NAMES = {
    "zeroshot": "Zero-shot CLIP",
    "zeroshot_ensemble": "Zero-shot CLIP (ensemble)",
    "linear_probe": "Linear probe CLIP",
    "coop": "CoOp",
}
_METHOD_ORDER = ("zeroshot", "zeroshot_ensemble", "linear_probe", "coop")


class ReportError(CoopipeError, ValueError):
    """A metrics file that cannot be read as a run result, or a report request that cannot be met."""


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class RunRecord:
    """The result of one evaluated run (accuracy as a fraction, as in ``metrics.json``)."""

    dataset: str
    method: str
    shots: int
    seed: int | None
    accuracy: float
    macro_f1: float | None = None
    model: str = ""
    classes: str = "all"  # the classes evaluated: all, base or new
    train_classes: str = "all"  # the classes trained on
    source: str | None = None  # training dataset, for transfer results
    path: str = ""

    @property
    def kind(self) -> str:
        """``transfer``, ``base2new``, ``fewshot``, or ``other`` (e.g. a base-trained prompt on all classes)."""
        if self.source is not None and self.source != self.dataset:
            return "transfer"
        if self.classes in ("base", "new"):
            return "base2new"
        if self.classes == "all" and self.train_classes == "all":
            return "fewshot"
        return "other"

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.dataset, self.source, self.model, self.method, self.shots, self.classes, self.seed)


def record_from_metrics(data: Mapping[str, Any], path: str = "") -> RunRecord:
    """A :class:`RunRecord` from a ``metrics.json`` mapping; :class:`ReportError` if it is not a run result."""
    where = f" in {path}" if path else ""
    missing = [k for k in ("method", "dataset", "accuracy") if data.get(k) is None]
    if missing:
        raise ReportError(f"not a coopipe run result{where}: missing {', '.join(missing)}")
    acc = data["accuracy"]
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= float(acc) <= 1.0:
        raise ReportError(f"accuracy{where} must be a fraction in [0, 1], got {acc!r}")
    shots, seed = data.get("shots"), data.get("seed")
    if shots is None and str(data["method"]).startswith("zeroshot"):
        shots = 0
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ReportError(f"shots{where} must be a non-negative integer, got {shots!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ReportError(f"seed{where} must be an integer or null, got {seed!r}")
    f1 = data.get("macro_f1")
    return RunRecord(
        dataset=str(data["dataset"]),
        method=str(data["method"]),
        shots=shots,
        seed=seed,
        accuracy=float(acc),
        macro_f1=float(f1) if isinstance(f1, (int, float)) and not isinstance(f1, bool) else None,
        model=str(data.get("model") or ""),
        classes=str(data.get("classes") or "all"),
        train_classes=str(data.get("train_classes") or "all"),
        source=str(data["source_dataset"]) if data.get("source_dataset") else None,
        path=path,
    )


def dedupe(records: Iterable[RunRecord]) -> list[RunRecord]:
    """One record per (kind, dataset, source, model, method, shots, classes, seed): the first by path wins.

    Two folders holding the same run (a copy, or a quick try beside the real grid) would otherwise count one
    seed twice and shrink the std; the duplicates are logged.
    """
    kept: dict[tuple[Any, ...], RunRecord] = {}
    for rec in sorted(records, key=lambda r: r.path):
        first = kept.setdefault(rec.key(), rec)
        if first is not rec:
            logger.warning("duplicate result %s (same run as %s): ignored", rec.path, first.path)
    return list(kept.values())


# ---------------------------------------------------------------- statistics
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
        """One seedless value (zero-shot CLIP): shown without ±."""
        return self.seeds == (None,)

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fewshot_cells(records: Iterable[RunRecord]) -> list[Cell]:
    """Cells of the few-shot records (zero-shot CLIP at 0 shots) per dataset x model x method x shots."""
    groups: dict[tuple[str, str, str, int], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.kind == "fewshot":
            groups[(r.dataset, r.model, r.method, r.shots)].append(r)
    cells = []
    for (dataset, model, method, shots), recs in groups.items():
        f1 = None
        if all(r.macro_f1 is not None for r in recs):
            f1 = _seed_stat(recs, lambda r: r.macro_f1 or 0.0)
        cells.append(Cell(dataset, method, shots, _seed_stat(recs, lambda r: r.accuracy), model, f1,
                          paths=tuple(sorted(r.path for r in recs))))
    return sorted(cells, key=lambda c: (dataset_order(c.dataset), c.shots, method_order(c.method), c.model))


def average_cells(cells: Iterable[Cell]) -> list[Cell]:
    """The "Average" column and panel: per model x method x shots, over the datasets that have the cell.

    See :func:`average_stat`; ``n_datasets`` tells how many datasets were averaged.
    """
    groups: dict[tuple[str, str, int], list[Cell]] = defaultdict(list)
    for c in cells:
        if c.dataset != AVERAGE:
            groups[(c.model, c.method, c.shots)].append(c)
    out = [Cell(AVERAGE, method, shots, average_stat([c.accuracy for c in members]), model, n_datasets=len(members))
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
    dataset: str
    method: str
    shots: int
    method_accuracy: float
    zeroshot_accuracy: float
    model: str = ""

    @property
    def points(self) -> float:
        return self.method_accuracy - self.zeroshot_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.points}


def gain_shots_for(cells: Iterable[Cell], method: str) -> int | None:
    """The most shots ``method`` has results for (16 in the full grid), or None."""
    shots = [c.shots for c in cells if c.method == method and c.dataset != AVERAGE]
    return max(shots) if shots else None


def gains_over_zeroshot(cells: Sequence[Cell], *, method: str = "coop", shots: int | None = None) -> list[Gain]:
    """``method`` at ``shots`` minus zero-shot CLIP (same model), in points, per dataset that has both."""
    shots = gain_shots_for(cells, method) if shots is None else shots
    zero = {(c.dataset, c.model): c for c in cells if c.method == "zeroshot" and c.dataset != AVERAGE}
    out = [
        Gain(c.dataset, method, c.shots, c.accuracy.mean, zero[(c.dataset, c.model)].accuracy.mean, c.model)
        for c in cells
        if c.method == method and c.shots == shots and c.dataset != AVERAGE and (c.dataset, c.model) in zero
    ]
    return sorted(out, key=lambda g: g.points)


# ---------------------------------------------------------------- names and order
def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def dataset_order(name: str) -> tuple[int, str]:
    names = list(DATASET_LABELS)
    return (names.index(name), name) if name in DATASET_LABELS else (len(names) - 1, name)


def method_order(method: str) -> tuple[int, str]:
    for i, prefix in enumerate(_METHOD_ORDER):
        if method == prefix:
            return (i, "")
    return (len(_METHOD_ORDER), method)


def method_label(method: str, model: str = "", *, with_model: bool = False) -> str:
    """Readable method name: ``coop_csc_middle`` -> ``CoOp (CSC, middle)``; ``coop_m8`` -> ``CoOp (M=8)``."""
    name = _METHOD_NAMES.get(method)
    if name is None and method.startswith("coop_"):
        parts = []
        for token in method[len("coop_"):].split("_"):
            if token == "csc":
                parts.append("CSC")
            elif token.startswith("init-"):
                parts.append('init "' + token[len("init-"):].replace("-", " ") + '"')
            elif token[:1] == "m" and token[1:].isdigit():
                parts.append(f"M={token[1:]}")
            else:
                parts.append(token)
        name = f"CoOp ({', '.join(parts)})"
    name = name or method
    return f"{name} [{model}]" if with_model and model else name


def _several_models(items: Iterable[Any]) -> bool:
    return len({getattr(i, "model", "") for i in items}) > 1


# ---------------------------------------------------------------- Markdown and CSV
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(("---:" if i >= align_right_from else "---") for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def fewshot_markdown(cells: Sequence[Cell], averages: Sequence[Cell]) -> list[str]:
    """Rows = method x shots (zero-shot first), columns = datasets (+ Average when there are several)."""
    datasets = sorted({c.dataset for c in cells}, key=dataset_order)
    if not datasets:
        return []
    with_avg = len(datasets) > 1
    models = _several_models(cells)
    index = {(c.dataset, c.model, c.method, c.shots): c for c in [*cells, *averages]}
    expected = max((c.accuracy.n for c in cells if not c.accuracy.single), default=None)
    row_keys = sorted({(c.shots, method_order(c.method), c.method, c.model) for c in cells})
    cols = [*datasets, *([AVERAGE] if with_avg else [])]
    rows = []
    for shots, _, method, model in row_keys:
        texts = []
        for ds in cols:
            cell = index.get((ds, model, method, shots))
            text = cell.accuracy.text(expected_n=expected) if cell else "–"
            if cell and ds == AVERAGE and cell.n_datasets < len(datasets):
                text += f" ({cell.n_datasets}/{len(datasets)} datasets)"
            texts.append(text)
        rows.append([method_label(method, model, with_model=models), str(shots), *texts])
    caption = (
        f"Test accuracy (%) by number of shots per class: {STD_NOTE}. Zero-shot CLIP is a single run (0 shots)."
        + (" (n=k): fewer seeds than the other cells." if any("(n=" in text for row in rows for text in row) else "")
        + (" Average: mean over the datasets of the per-dataset means." if with_avg else "")
    )
    return ["## Few-shot accuracy", "", caption, "",
            *_md_table(["Method", "Shots", *[dataset_label(d) for d in cols]], rows, 1)]


def base2new_markdown(rows: Sequence[BaseNewRow]) -> list[str]:
    if not rows:
        return []
    models = _several_models(rows)
    body = [[dataset_label(r.dataset), method_label(r.method, r.model, with_model=models), str(r.shots),
             r.base.text(), r.new.text(), "–" if math.isnan(r.hm) else f"{r.hm:.2f}"] for r in rows]
    caption = (f"Base-to-new generalisation (CoCoOp's protocol: sorted labels, the first ceil(K/2) classes are base; "
               f"trained on base, tested on base and new separately). Accuracy (%): {STD_NOTE}. H is the harmonic "
               f"mean of the mean base and new accuracy; the average row averages the dataset means.")
    return ["## Base-to-new generalisation", "", caption, "",
            *_md_table(["Dataset", "Method", "Shots", "Base", "New", "H"], body, 2)]


def transfer_markdown(cells: Sequence[TransferCell], fewshot: Sequence[Cell]) -> list[str]:
    """Rows = method x source (+ zero-shot CLIP on the same targets), columns = source then targets, Average."""
    if not cells:
        return []
    targets = sorted({c.dataset for c in cells}, key=dataset_order)
    models = _several_models(cells)
    index = {(c.source, c.dataset, c.model, c.method, c.shots): c for c in cells}
    own = {(c.dataset, c.model, c.method, c.shots): c for c in fewshot}
    row_keys = sorted({(dataset_order(c.source), c.source, method_order(c.method), c.method, c.shots, c.model)
                       for c in cells})
    body = []
    for model in sorted({c.model for c in cells}):
        zero = [own.get((t, model, "zeroshot", 0)) for t in targets]
        if any(zero):
            means = [z.accuracy.mean for z in zero if z]
            body.append([method_label("zeroshot", model, with_model=models), "–", "0", "–",
                         *[z.accuracy.text() if z else "–" for z in zero],
                         f"{np.mean(means):.2f}" if len(means) == len(targets) else "–"])
    for _, source, _, method, shots, model in row_keys:
        src = own.get((source, model, method, shots))
        got = [index.get((source, t, model, method, shots)) for t in targets]
        means = [g.accuracy.mean for g in got if g]
        body.append([method_label(method, model, with_model=models), dataset_label(source), str(shots),
                     src.accuracy.text() if src else "–", *[g.accuracy.text() if g else "–" for g in got],
                     f"{np.mean(means):.2f}" if len(means) == len(targets) else "–"])
    caption = (f"Transfer of a prompt learned on the source dataset to target datasets (cross-dataset and domain "
               f"generalisation; the classifier is rebuilt from the learned context with each target's class names). "
               f"Accuracy (%): {STD_NOTE}. Average: mean over the targets (shown when every target has a result).")
    header = ["Method", "Source", "Shots", "Source acc.", *[dataset_label(t) for t in targets], "Average"]
    return ["## Cross-dataset transfer and domain generalisation", "", caption, "", *_md_table(header, body, 2)]


def gains_markdown(gains: Sequence[Gain]) -> list[str]:
    if not gains:
        return []
    body = [[dataset_label(g.dataset), f"{g.zeroshot_accuracy:.2f}", f"{g.method_accuracy:.2f}", f"{g.points:+.2f}"]
            for g in sorted(gains, key=lambda g: -g.points)]
    name = method_label(gains[0].method)
    return [f"## {name} ({gains[0].shots} shots) vs zero-shot CLIP", "",
            "Absolute improvement in points (mean over seeds minus the zero-shot accuracy).", "",
            *_md_table(["Dataset", "Zero-shot CLIP", name, "Gain"], body, 1)]


def markdown_report(
    cells: Sequence[Cell],
    averages: Sequence[Cell],
    b2n: Sequence[BaseNewRow],
    transfer: Sequence[TransferCell],
    gains: Sequence[Gain],
    *,
    title: str = "coopipe report",
    figures: Mapping[str, str] | None = None,
) -> str:
    """The whole report as Markdown: few-shot table, gains, base-to-new and transfer tables, figure links."""
    parts: list[str] = [f"# {title}", ""]
    for section in (fewshot_markdown(cells, averages), gains_markdown(gains), base2new_markdown(b2n),
                    transfer_markdown(transfer, cells)):
        if section:
            parts += [*section, ""]
    if len(parts) == 2:
        parts += ["No finished runs found (no metrics.json below the runs folder).", ""]
    for caption, name in (figures or {}).items():
        parts += [f"![{caption}]({name})", ""]
    return "\n".join(parts)


CSV_FIELDS = ("table", "dataset", "source", "method", "model", "shots", "classes", "n", "seeds", "mean", "std",
              "macro_f1_mean", "macro_f1_std", "n_datasets")


def csv_rows(
    cells: Sequence[Cell], averages: Sequence[Cell], b2n: Sequence[BaseNewRow], transfer: Sequence[TransferCell]
) -> list[dict[str, Any]]:
    """Long-format rows (one per table cell; percent values; std = population std) for report.csv."""

    def row(table: str, dataset: str, method: str, model: str, shots: int, stat: Stat, **extra: Any) -> dict[str, Any]:
        base = {k: "" for k in CSV_FIELDS}
        base.update(table=table, dataset=dataset, method=method, model=model, shots=shots, classes="all", n=stat.n,
                    seeds=";".join("" if s is None else str(s) for s in stat.seeds),
                    mean=_num(stat.mean), std="" if stat.single else _num(stat.std))
        base.update(extra)
        return base

    out = []
    for c in cells:
        f1 = c.macro_f1
        out.append(row("fewshot", c.dataset, c.method, c.model, c.shots, c.accuracy,
                       macro_f1_mean=_num(f1.mean) if f1 else "",
                       macro_f1_std=_num(f1.std) if f1 and not f1.single else ""))
    out += [row("fewshot", AVERAGE, c.method, c.model, c.shots, c.accuracy, n_datasets=c.n_datasets) for c in averages]
    for r in b2n:
        out.append(row("base2new", r.dataset, r.method, r.model, r.shots, r.base, classes="base"))
        out.append(row("base2new", r.dataset, r.method, r.model, r.shots, r.new, classes="new"))
        out.append(row("base2new", r.dataset, r.method, r.model, r.shots, Stat(r.hm, float("nan"), 0), classes="hm",
                       std=""))
    out += [row("transfer", t.dataset, t.method, t.model, t.shots, t.accuracy, source=t.source) for t in transfer]
    return out


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.4f}"


# ---------------------------------------------------------------- figures
def shot_position(shots: float) -> float:
    """x position of a number of shots: 0 -> 0, K -> 1 + log2(K), so 0/1/2/4/8/16 are evenly spaced."""
    return 0.0 if shots <= 0 else 1.0 + math.log2(shots)


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas without touching pyplot's global state (safe in tests and workers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


@dataclass
class _Palette:
    colors: dict[str, Any] = field(default_factory=dict)

    def __call__(self, key: str) -> Any:
        from matplotlib import colormaps

        if key not in self.colors:
            self.colors[key] = colormaps["tab10"](len(self.colors) % 10)
        return self.colors[key]


def plot_accuracy_vs_shots(cells: Sequence[Cell], averages: Sequence[Cell], path: str | Path) -> Path:
    """Figure 3: accuracy against shots, one panel per dataset (+ Average), one line per method with std bands;
    zero-shot CLIP as a star at 0 shots."""
    datasets = sorted({c.dataset for c in cells}, key=dataset_order)
    panels = [*datasets, *([AVERAGE] if len(datasets) > 1 else [])]
    ncols = max(1, min(4, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = _figure(max(3.6 * ncols, 6.4), 3.0 * nrows + 0.9)
    models = _several_models(cells)
    palette = _Palette()
    keys = sorted({(method_order(c.method), c.method, c.model) for c in cells})
    for _, method, model in keys:
        palette(f"{method}|{model}")
    handles: dict[str, Any] = {}
    all_cells = [*cells, *averages]
    ticks = sorted({c.shots for c in cells} | {0})
    for i, panel in enumerate(panels or ["(no results)"]):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(dataset_label(panel), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xticks([shot_position(t) for t in ticks], [str(t) for t in ticks])
        ax.set_xlim(-0.4, shot_position(max(ticks)) + 0.4)
        for _, method, model in keys:
            mine = sorted((c for c in all_cells if c.dataset == panel and c.method == method and c.model == model),
                          key=lambda c: c.shots)
            if not mine:
                continue
            color = palette(f"{method}|{model}")
            label = method_label(method, model, with_model=models)
            x = np.array([shot_position(c.shots) for c in mine])
            y = np.array([c.accuracy.mean for c in mine])
            err = np.array([0.0 if c.accuracy.single or math.isnan(c.accuracy.std) else c.accuracy.std for c in mine])
            if method.startswith("zeroshot"):
                (h,) = ax.plot(x, y, linestyle="none", marker="*", markersize=13, color=color, label=label)
            else:
                style = "--" if method == "linear_probe" else "-"
                h = ax.errorbar(x, y, yerr=err, linestyle=style, marker="o", markersize=4, capsize=3,
                                color=color, label=label)
                ax.fill_between(x, y - err, y + err, color=color, alpha=0.12, linewidth=0)
            handles.setdefault(label, h)
        if i % ncols == 0:
            ax.set_ylabel("Accuracy (%)")
        if i >= len(panels) - ncols:
            ax.set_xlabel("Shots per class")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   fontsize=8, frameon=False)
    else:
        fig.text(0.5, 0.5, "no few-shot results yet", ha="center", va="center")
    fig.suptitle("Accuracy vs shots per class (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.95))
    return _save(fig, path)


def plot_gains(gains: Sequence[Gain], path: str | Path, *, method: str = "coop", shots: int | None = None) -> Path:
    """Figure 4: horizontal bars of ``method`` minus zero-shot CLIP per dataset, in points, sorted by gain."""
    fig = _figure(6.0, 0.45 * max(len(gains), 3) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    name = method_label(method)
    shots_text = f"{shots}-shot " if shots is not None else ""
    if gains:
        ordered = sorted(gains, key=lambda g: g.points)
        values = [g.points for g in ordered]
        colors = ["#2a9d8f" if v >= 0 else "#e76f51" for v in values]
        ypos = np.arange(len(ordered))
        ax.barh(ypos, values, color=colors)
        ax.set_yticks(ypos, [dataset_label(g.dataset) for g in ordered])
        span = max(abs(v) for v in values) or 1.0
        for y, v in zip(ypos, values):
            ax.text(v + (0.02 * span if v >= 0 else -0.02 * span), y, f"{v:+.2f}", va="center",
                    ha="left" if v >= 0 else "right", fontsize=8)
        ax.set_xlim(min(0.0, min(values)) - 0.25 * span, max(0.0, max(values)) + 0.25 * span)
        ax.axvline(0, color="black", linewidth=0.8)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"no dataset has both zero-shot CLIP and {shots_text}{name} results",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("Absolute improvement over zero-shot CLIP (points)")
    ax.set_title(f"{shots_text}{name} vs zero-shot CLIP", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
