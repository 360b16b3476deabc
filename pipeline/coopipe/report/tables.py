"""The report as Markdown tables and long-format CSV (accuracies in percent with two decimals).

Every caption says that the spread is the population standard deviation over seeds (ddof=0), as CoOp's
``parse_test_res.py``; see :mod:`coopipe.report.aggregate` for how the numbers are made.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from coopipe.report.records import RunRecord
from coopipe.report.aggregate import BaseNewRow, Cell, CostRow, Gain, Stat, TransferCell
from coopipe.report.names import AVERAGE, dataset_label, dataset_order, method_label, method_order, several_models

STD_NOTE = (
    "mean ± std over seeds; std is the population standard deviation (ddof=0, numpy's np.std, as CoOp's "
    "parse_test_res.py)"
)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(("---:" if i >= align_right_from else "---") for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def fewshot_markdown(cells: Sequence[Cell], averages: Sequence[Cell], *, stamps: Stamps | None = None) -> list[str]:
    """Rows = method x shots (zero-shot first), columns = datasets (+ Average when there are several); a row of
    runs that trained other epochs than the paper's says so in an Epochs column; ``stamps``: a Setting column."""
    datasets = sorted({c.dataset for c in cells}, key=dataset_order)
    if not datasets:
        return []
    with_avg = len(datasets) > 1
    models = several_models(cells)
    notes = any(c.note for c in cells)
    index = {(c.dataset, c.model, c.method, c.shots, c.note): c for c in cells}
    index.update({(c.dataset, c.model, c.method, c.shots, ""): c for c in averages})
    expected = max((c.accuracy.n for c in cells if not c.accuracy.single), default=None)
    row_keys = sorted({(c.shots, method_order(c.method), c.method, c.model, c.note) for c in cells})
    cols = [*datasets, *([AVERAGE] if with_avg else [])]
    rows = []
    for shots, _, method, model, note in row_keys:
        texts = []
        for ds in cols:
            cell = index.get((ds, model, method, shots, "" if ds == AVERAGE else note))
            text = cell.accuracy.text(expected_n=expected) if cell else "–"
            if cell and ds == AVERAGE and cell.n_datasets < len(datasets):
                text += f" ({cell.n_datasets}/{len(datasets)} datasets)"
            texts.append(text)
        epochs = [note or _epochs_text(method)] if notes else []
        setting = [] if stamps is None else [stamps.of("fewshot", datasets, model=model, method=method, shots=shots,
                                                       epochs_note=note)]
        rows.append([method_label(method, model, with_model=models), str(shots), *epochs, *texts, *setting])
    caption = (
        f"Test accuracy (%) by number of shots per class: {STD_NOTE}. Zero-shot CLIP is a single run (0 shots)."
        + (" (n=k): fewer seeds than the other cells." if any("(n=" in text for row in rows for text in row) else "")
        + (" Average: mean over the datasets of the per-dataset means." if with_avg else "")
        + (" Epochs: the runs' training length where it departs from the paper's." if notes else "")
    )
    header = ["Method", "Shots", *(["Epochs"] if notes else []), *[dataset_label(d) for d in cols],
              *(["Setting"] if stamps is not None else [])]
    return ["## Few-shot accuracy", "", caption, "", *_md_table(header, rows, 2 if notes else 1)]


_NO_EPOCHS = ("linear_probe", "ridge")  # closed-form fits: no training epochs


def _epochs_text(method: str) -> str:
    """The Epochs cell of a row whose runs trained the paper's epochs: none to speak of for fits and zero-shot."""
    return "–" if method.startswith("zeroshot") or method in _NO_EPOCHS else "paper's"


def base2new_markdown(rows: Sequence[BaseNewRow], *, stamps: Stamps | None = None) -> list[str]:
    if not rows:
        return []
    models = several_models(rows)
    body = [[dataset_label(r.dataset), method_label(r.method, r.model, with_model=models), str(r.shots),
             r.base.text(), r.new.text(), "–" if math.isnan(r.hm) else f"{r.hm:.2f}",
             *([] if stamps is None else [stamps.of("base2new", None if r.dataset == AVERAGE else [r.dataset],
                                                    model=r.model, method=r.method, shots=r.shots)])] for r in rows]
    caption = (f"Base-to-new generalisation (CoCoOp's protocol: sorted labels, the first ceil(K/2) classes are base; "
               f"trained on base, tested on base and new separately). Accuracy (%): {STD_NOTE}. H is the harmonic "
               f"mean of the mean base and new accuracy; the average row averages the dataset means.")
    return ["## Base-to-new generalisation", "", caption, "",
            *_md_table(["Dataset", "Method", "Shots", "Base", "New", "H", *(["Setting"] if stamps else [])], body, 2)]


def transfer_markdown(cells: Sequence[TransferCell], fewshot: Sequence[Cell], *,
                      stamps: Stamps | None = None) -> list[str]:
    """Rows = method x source (+ zero-shot CLIP on the same targets), columns = source then targets, Average."""
    if not cells:
        return []
    targets = sorted({c.dataset for c in cells}, key=dataset_order)
    models = several_models(cells)
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
                         f"{np.mean(means):.2f}" if len(means) == len(targets) else "–",
                         *([] if stamps is None else [stamps.of("fewshot", targets, model=model,
                                                                method="zeroshot")])])
    for _, source, _, method, shots, model in row_keys:
        src = own.get((source, model, method, shots))
        got = [index.get((source, t, model, method, shots)) for t in targets]
        means = [g.accuracy.mean for g in got if g]
        body.append([method_label(method, model, with_model=models), dataset_label(source), str(shots),
                     src.accuracy.text() if src else "–", *[g.accuracy.text() if g else "–" for g in got],
                     f"{np.mean(means):.2f}" if len(means) == len(targets) else "–",
                     *([] if stamps is None else [stamps.of("transfer", None, source=source, model=model,
                                                            method=method, shots=shots)])])
    caption = (f"Transfer of a prompt learned on the source dataset to target datasets (cross-dataset and domain "
               f"generalisation; the classifier is rebuilt from the learned context with each target's class names). "
               f"Accuracy (%): {STD_NOTE}. Average: mean over the targets (shown when every target has a result).")
    header = ["Method", "Source", "Shots", "Source acc.", *[dataset_label(t) for t in targets], "Average",
              *(["Setting"] if stamps is not None else [])]
    return ["## Cross-dataset transfer and domain generalisation", "", caption, "", *_md_table(header, body, 2)]


def gains_markdown(gains: Sequence[Gain]) -> list[str]:
    """One row per dataset x model x method: its accuracy at its most shots minus zero-shot CLIP's."""
    if not gains:
        return []
    models = several_models(gains)
    notes = any(g.note for g in gains)
    body = [[dataset_label(g.dataset), method_label(g.method, g.model, with_model=models), str(g.shots),
             f"{g.zeroshot_accuracy:.2f}", f"{g.method_accuracy:.2f}", f"{g.points:+.2f}",
             *([g.note or ("–" if g.method in _NO_EPOCHS else "paper's")] if notes else [])] for g in gains]
    caption = ("Absolute improvement in points over zero-shot CLIP of the same model (mean over seeds minus the "
               "zero-shot accuracy), each method at its most shots"
               + ("; Epochs: where a run's training length departs from the paper's." if notes else "."))
    header = ["Dataset", "Method", "Shots", "Zero-shot CLIP", "Accuracy", "Gain", *(["Epochs"] if notes else [])]
    return ["## Gain over zero-shot CLIP", "", caption, "", *_md_table(header, body, 2)]


def markdown_report(
    cells: Sequence[Cell],
    averages: Sequence[Cell],
    b2n: Sequence[BaseNewRow],
    transfer: Sequence[TransferCell],
    gains: Sequence[Gain],
    *,
    title: str = "coopipe report",
    figures: Mapping[str, str] | None = None,
    records: Sequence[RunRecord] = (),
    costs: Sequence[CostRow] = (),
) -> str:
    """The whole report as Markdown: the settings of the runs it used, the few-shot table, gains, base-to-new,
    transfer and cost tables (each row stamped with its setting when ``records`` are given), figure links, the
    settings' legend and the list of runs."""
    parts: list[str] = [f"# {title}", "", *settings_markdown(records)]
    stamps = Stamps(records) if records else None
    zeroshot = {(c.dataset, c.model): c.accuracy.mean for c in cells if c.method == "zeroshot"}
    datasets = sorted({r.dataset for r in costs}, key=dataset_order)
    cost_sections = [cost_markdown([r for r in costs if r.dataset == ds], zeroshot=zeroshot, stamps=stamps,
                                   title=f"Cost: {dataset_label(ds)}" if len(datasets) > 1 else "Cost")
                     for ds in datasets]
    for section in (fewshot_markdown(cells, averages, stamps=stamps), gains_markdown(gains),
                    base2new_markdown(b2n, stamps=stamps), transfer_markdown(transfer, cells, stamps=stamps),
                    *cost_sections):
        if section:
            parts += [*section, ""]
    if len(parts) == 2:
        parts += ["No finished runs found (no metrics.json below the runs folder).", ""]
    for caption, name in (figures or {}).items():
        parts += [f"![{caption}]({name})", ""]
    if stamps is not None:
        parts += stamps.legend()
    if records:
        parts += ["## Runs used", "", *[_run_line(r) for r in sorted(records, key=lambda r: r.path)], ""]
    return "\n".join(parts)


def _run_line(r: RunRecord) -> str:
    """One run of the report with every departure from its paper setting that its metrics file lists."""
    line = f"- `{r.path}`: {r.method}, {r.model}, {r.shots} shots, seed {r.seed}"
    return f"{line}; departures: {'; '.join(r.departures)}" if r.departures else line


def settings_markdown(records: Sequence[RunRecord]) -> list[str]:
    """Which model settings the results come from, and a warning when they depart from the paper's protocol."""
    if not records:
        return []
    counts: dict[str, int] = {}
    for r in records:
        counts[r.model] = counts.get(r.model, 0) + 1
    lines = ["Results by model setting (never averaged across settings): "
             + "; ".join(f"{m or 'unknown model'}: {n} result(s)" for m, n in sorted(counts.items())), ""]
    if any("random weights" in m for m in counts):
        lines += ["> **Random weights**: some results come from randomly initialised CLIP models (`pretrained=none`); "
                  "they only check that the pipeline runs and say nothing about the method.", ""]
    if any(r.epochs_note for r in records):
        lines += ["> **Not the paper's protocol**: some runs trained for other epochs than the paper's (the Epochs "
                  "columns say which).", ""]
    return lines


CSV_FIELDS = ("table", "dataset", "source", "method", "model", "shots", "classes", "n", "seeds", "mean", "std",
              "macro_f1_mean", "macro_f1_std", "n_datasets", "epochs_note")


def csv_rows(
    cells: Sequence[Cell], averages: Sequence[Cell], b2n: Sequence[BaseNewRow], transfer: Sequence[TransferCell]
) -> list[dict[str, Any]]:
    """Long-format rows (one per table cell; percent values; std = population std) for report.csv."""

    def row(table: str, dataset: str, method: str, model: str, shots: int, stat: Stat, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = {k: "" for k in CSV_FIELDS}
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
                       macro_f1_std=_num(f1.std) if f1 and not f1.single else "", epochs_note=c.note))
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


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` (from :func:`csv_rows`) as CSV text with a header of :data:`CSV_FIELDS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- settings and cost
class Stamps:
    """Each row's setting (model, weights, feature cache, departures from the paper) as a short id (``S1``) in a
    Setting column, spelled out once in a legend: the full stamp on every row would drown the numbers."""

    def __init__(self, records: Sequence[RunRecord]) -> None:
        self._records = list(records)
        self._ids: dict[tuple[str, str, str, tuple[str, ...]], str] = {}

    def of(self, kind: str, datasets: Collection[str] | None, **fields: Any) -> str:
        """The ids of the settings of the records of ``kind`` on ``datasets`` (None: any) whose ``fields`` (record
        attributes) have the given values (``–`` when none)."""
        settings = sorted({(r.model, r.weights, r.cache, r.departures) for r in self._records
                           if r.kind == kind and (datasets is None or r.dataset in datasets)
                           and all(getattr(r, name) == value for name, value in fields.items())})
        return ", ".join(self._ids.setdefault(s, f"S{len(self._ids) + 1}") for s in settings) or "–"

    def legend(self) -> list[str]:
        if not self._ids:
            return []
        lines = ["### Settings", "", "Setting: the model, its weights, the feature cache the results were "
                 "evaluated on, and every departure from the method's paper setting its metrics files list.", ""]
        for (model, weights, cache, departures), sid in self._ids.items():
            lines.append(f"- **{sid}**: model {model or '?'}; weights {weights or '?'}; cache `{cache or '?'}`; "
                         f"departures: {'; '.join(departures) if departures else 'none'}")
        return [*lines, ""]


def _duration(seconds: float) -> str:
    """A duration as Tip-Adapter's table writes it (``14h 40min``, ``5min``), down to µs for per-image times."""
    if math.isnan(seconds):
        return "–"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}min"
    if seconds >= 60:
        return f"{int(seconds // 60)}min {int(seconds % 60)}s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _mib(n_bytes: float) -> str:
    return "–" if math.isnan(n_bytes) else f"{n_bytes / 2**20:.1f} MiB"


def _training_kind(row: CostRow) -> str:
    """Table 1's Training column: free (no fit at all), a fit without epochs (a closed form or a search on the
    validation split), or trained for epochs."""
    if row.epochs:
        return "trained"
    return "free" if row.method.startswith("zeroshot") else "fit"


def cost_markdown(rows: Sequence[CostRow], *, zeroshot: Mapping[tuple[str, str], float] | None = None,
                  stamps: Stamps | None = None, title: str = "Cost") -> list[str]:
    """Tip-Adapter's Table 1 layout (Models, Training, Epochs, Time, Accuracy, Gain, Infer. Speed, Memory) plus the
    time per training image, one row per method x shots; ``zeroshot``: (dataset, model) -> zero-shot accuracy for
    the Gain column."""
    if not rows:
        return []
    zeroshot = zeroshot or {}
    models = several_models(rows)
    body = []
    for r in rows:
        zero = zeroshot.get((r.dataset, r.model))
        gain = "–" if zero is None or r.method.startswith("zeroshot") else f"{r.accuracy.mean - zero:+.2f}"
        time_text = _duration(r.train_seconds.mean) + (f" (stack of {r.stacked_runs})" if r.stacked_runs > 1 else "")
        speed = r.images_per_s.mean
        body.append([
            method_label(r.method, r.model, with_model=models), str(r.shots), _training_kind(r),
            "–" if r.epochs is None else str(r.epochs), time_text, _duration(r.seconds_per_image.mean),
            r.accuracy.text(), gain, "–" if math.isnan(speed) else f"{speed:,.0f}", _mib(r.peak_memory_bytes.mean),
            *([r.note or _epochs_text(r.method)] if any(x.note for x in rows) else []),
            *([stamps.of("fewshot", [r.dataset], model=r.model, method=r.method, shots=r.shots, epochs_note=r.note)]
              if stamps is not None else []),
        ])
    kinds = sorted({r.memory_kind for r in rows if r.memory_kind})
    caption = (
        "Cost in the layout of Tip-Adapter's Table 1 (means over seeds; accuracy: " + STD_NOTE + "). Training wall "
        "time: the method's setup (learner, its prepare step) plus its optimisation epochs, validation and "
        "checkpoints excluded; time per training image: that time over the images seen (few-shot images x "
        "epochs); inference images/s: the head's logits on cached test features (the image tower ran once, at "
        "encode time, unlike Table 1's speed); peak memory: " + ("; ".join(kinds) or "as recorded") + ". Gain: "
        "points over zero-shot CLIP of the same model. A stack of R: R runs shared one text pass, and its time."
    )
    header = ["Method", "Shots", "Training", "Epochs", "Training wall time", "Time per training image", "Accuracy",
              "Gain", "Inference images/s", "Peak memory", *(["Epochs departure"] if any(x.note for x in rows) else []),
              *(["Setting"] if stamps is not None else [])]
    return [f"## {title}", "", caption, "", *_md_table(header, body, 1)]
