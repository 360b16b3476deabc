"""The paper's tables and figures from finished runs: mean ± std over seeds per dataset x shots x method.

One module a job (reading the run folders and writing the files is the job :mod:`coopipe.jobs.report`):

- :mod:`coopipe.report.records`: run results from ``metrics.json`` mappings, one per run;
- :mod:`coopipe.report.aggregate`: mean ± population std over seeds, averages, base-to-new H, transfer, gains;
- :mod:`coopipe.report.names`: dataset and method labels and their order;
- :mod:`coopipe.report.tables`: Markdown and CSV;
- :mod:`coopipe.report.figures`: matplotlib Figures 3 and 4.

The names below are the package's public API, re-exported (as open_clip does); the library itself imports each
from its module.
"""

from coopipe.report.aggregate import (
    STD_DDOF,
    BaseNewRow,
    Cell,
    Gain,
    Stat,
    TransferCell,
    average_cells,
    average_stat,
    base2new_rows,
    fewshot_cells,
    gain_shots_for,
    gains_over_zeroshot,
    harmonic_mean,
    summarize,
    transfer_cells,
)
from coopipe.report.figures import plot_accuracy_vs_shots, plot_gains, shot_position
from coopipe.report.names import AVERAGE, DATASET_LABELS, dataset_label, dataset_order, method_label, method_order
from coopipe.report.records import ReportError, RunRecord, dedupe, record_from_metrics
from coopipe.report.tables import CSV_FIELDS, STD_NOTE, csv_rows, csv_text, markdown_report

__all__ = [
    "AVERAGE",
    "CSV_FIELDS",
    "DATASET_LABELS",
    "STD_DDOF",
    "STD_NOTE",
    "BaseNewRow",
    "Cell",
    "Gain",
    "ReportError",
    "RunRecord",
    "Stat",
    "TransferCell",
    "average_cells",
    "average_stat",
    "base2new_rows",
    "csv_rows",
    "csv_text",
    "dataset_label",
    "dataset_order",
    "dedupe",
    "fewshot_cells",
    "gain_shots_for",
    "gains_over_zeroshot",
    "harmonic_mean",
    "markdown_report",
    "method_label",
    "method_order",
    "plot_accuracy_vs_shots",
    "plot_gains",
    "record_from_metrics",
    "shot_position",
    "summarize",
    "transfer_cells",
]
