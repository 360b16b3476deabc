"""Run results read from ``metrics.json`` mappings, told apart by kind, one per run.

Records come in five kinds, told apart by fields the evaluation writes into ``metrics.json``:
``fewshot`` (all classes; zero-shot CLIP counts as 0 shots), ``base2new`` (``classes`` base/new: CoCoOp's
protocol), ``transfer`` (``source_dataset`` differs from ``dataset``: cross-dataset and domain generalisation),
``age`` (an age dataset's result, with MAEs: exact-age accuracy means nothing there, so only the age report reads
it) and ``other`` (e.g. a base-trained prompt evaluated on all classes).

A record's ``model`` names the model and its weights' departure (random weights are another model, never
compared with trained ones); a departure from the paper's epochs is the record's ``epochs_note``, shown beside the
result: the run still belongs to its method's series and is still compared with zero-shot CLIP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coopipe.errors import CoopipeError
from coopipe.metrics_log import DVCLIVE_DIR

logger = logging.getLogger(__name__)



class ReportError(CoopipeError, ValueError):
    """A metrics file that cannot be read as a run result, or a report request that cannot be met."""


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class CostRecord:
    """What a run cost, as its metrics file records it (:mod:`coopipe.cost` defines each number); None: not
    recorded (an older run, or a number that does not apply)."""

    train_seconds: float | None = None
    seconds_per_image: float | None = None
    epochs: int | None = None
    images_per_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    stacked_runs: int = 1


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cost_from_metrics(data: Mapping[str, Any]) -> CostRecord | None:
    """The ``cost`` section of a metrics mapping (None when absent or not a mapping)."""
    cost = data.get("cost")
    if not isinstance(cost, Mapping):
        return None
    epochs, peak, stacked = _number(cost, "epochs"), _number(cost, "peak_memory_bytes"), _number(cost, "stacked_runs")
    return CostRecord(train_seconds=_number(cost, "train_seconds"), seconds_per_image=_number(cost, "seconds_per_train_image"),
                      epochs=None if epochs is None else int(epochs), images_per_s=_number(cost, "inference_images_per_s"),
                      peak_memory_bytes=None if peak is None else int(peak),
                      memory_kind=str(cost.get("peak_memory_kind") or ""),
                      stacked_runs=1 if stacked is None else int(stacked))


def cache_of(store: Any) -> str:
    """The feature cache a store lies in (``cache/eurosat/test_RN50_....zarr`` -> ``cache``; see
    :func:`coopipe.store.store_path`): the report's stamp."""
    return str(Path(str(store)).parent.parent) if store else ""


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
    departures: tuple[str, ...] = ()  # every departure from the paper's setting the metrics file lists
    epochs_note: str = ""  # e.g. "10 epochs (paper 200)"; empty when the run trained the paper's epochs
    ordinal: bool = False  # an age result (metrics.json holds MAEs): the age report's, not this report's
    weights: str = ""  # the weights' identity (metrics ``weights``)
    cache: str = ""  # the feature cache the evaluated store lies in
    cost: CostRecord | None = None

    @property
    def kind(self) -> str:
        """``age``, ``transfer``, ``base2new``, ``fewshot``, or ``other`` (e.g. a base-trained prompt on all
        classes)."""
        if self.ordinal:
            return "age"
        if self.source is not None and self.source != self.dataset:
            return "transfer"
        if self.classes in ("base", "new"):
            return "base2new"
        if self.classes == "all" and self.train_classes == "all":
            return "fewshot"
        return "other"

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.dataset, self.source, self.model, self.method, self.shots, self.classes, self.seed,
                self.epochs_note)


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
        model=model_setting(data),
        classes=str(data.get("classes") or "all"),
        train_classes=str(data.get("train_classes") or "all"),
        source=str(data["source_dataset"]) if data.get("source_dataset") else None,
        path=path,
        departures=tuple(str(d) for d in data.get("departures") or ()),
        epochs_note=epochs_departure(data),
        ordinal="mae_exp" in data,
        weights=str(data.get("weights") or ""),
        cache=cache_of(data.get("store")),
        cost=cost_from_metrics(data),
    )


def departures(data: Mapping[str, Any]) -> list[str]:
    """How a result departs from the paper's setting in ways that change its numbers: random weights, other epochs,
    another batch size (as ``metrics.json`` records). The full list of a trained run (cached views, precision, draw
    rule, ...: :mod:`coopipe.departures`) is the metrics file's ``departures``."""
    found = ["random weights"] if _random_weights(data) else []
    batch, paper_batch = data.get("batch_size"), data.get("paper_batch_size")
    if isinstance(batch, int) and isinstance(paper_batch, int) and batch != paper_batch:
        found.append(f"batch size {batch} (paper {paper_batch})")
    return [*found, *filter(None, [epochs_departure(data)])]


def _random_weights(data: Mapping[str, Any]) -> bool:
    return str(data.get("weights") or "").startswith("random-init")


def epochs_departure(data: Mapping[str, Any]) -> str:
    """``"30 epochs (paper 200)"`` when the run trained other epochs than the paper's, else ``""``."""
    epochs, paper = data.get("epochs"), data.get("paper_epochs")
    if isinstance(epochs, int) and isinstance(paper, int) and epochs != paper:
        return f"{epochs} epochs (paper {paper})"
    return ""


def model_setting(data: Mapping[str, Any]) -> str:
    """The model and the departures that make results a different series, e.g. ``RN50 [random weights, batch size
    4 (paper 1)]``: results are grouped by it, so runs of other weights or batch sizes are never averaged together.
    The epochs departure is not among them: it is shown on the row (the record's ``epochs_note``)."""
    model = str(data.get("model") or "")
    epochs = epochs_departure(data)
    tags = [d for d in departures(data) if d != epochs]
    return f"{model} [{', '.join(tags)}]" if tags else model


def metrics_files(runs_dir: Path, pattern: str = "metrics*.json") -> list[Path]:
    """The result files below ``runs_dir`` (sorted): evaluation metrics, not dvclive's per-epoch training logs
    (``<run>/dvclive/metrics.json``), which share the name."""
    return sorted(p for p in runs_dir.rglob(pattern) if DVCLIVE_DIR not in p.relative_to(runs_dir).parts)


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
