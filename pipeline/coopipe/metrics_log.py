"""Training metrics through dvclive, DVC's own logger: one step per epoch, so ``dvc plots`` and ``dvc exp show``
read them natively.

A run folder gets ``dvclive/metrics.json`` (the latest values and step, for ``dvc metrics``/``dvc exp show``) and
``dvclive/plots/metrics/{loss,train_acc,val_acc,lr}.tsv`` (one row per epoch, for ``dvc plots``). The same files
are written under DVC (``dvc repro``/``dvc exp run``) and by ``coopipe train`` outside it; ``history.tsv`` stays
as the plain record.

Steps are epochs: step N holds epoch N (1 = the first), the numbering of ``history.tsv`` and of the checkpoint.
A resumed run continues the same count: the logger is opened with ``Live(resume=True)`` and the rows of epochs
after the checkpoint it resumes from (logged before a kill, trained again now) are dropped first, so no step
appears twice. No DVC experiment is saved and no ``dvc.yaml`` is written (``save_dvc_exp=False,
dvcyaml=None``): the DVC pipeline tracks the report's copy of the curves (``metrics/training``) instead.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from coopipe.atomic import write_text
from coopipe.train_config import EpochRecord

logger = logging.getLogger(__name__)

__all__ = ["DVCLIVE_DIR", "LOGGED", "EpochMetricsLog"]

DVCLIVE_DIR = "dvclive"
LOGGED = ("loss", "train_acc", "val_acc", "lr")  # EpochRecord fields logged each epoch (val_acc when measured)


class EpochMetricsLog:
    """A dvclive logger for one training run: :meth:`log` one :class:`EpochRecord` per epoch, then close.

    ``start_epoch`` is the epoch training starts after (0 for a fresh run, the checkpoint's epoch when resuming);
    rows of later epochs already on disk are dropped. Use as a context manager so dvclive's ``end`` always runs.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, start_epoch: int = 0,
                 history: Sequence[EpochRecord] | None = None) -> None:
        from dvclive import Live  # imports DVC: only paid by processes that train

        self.dir = Path(run_dir) / DVCLIVE_DIR
        with self._named():
            if history is not None:  # the checkpoint's record: dvclive's files as an uninterrupted run left them
                write_from_history(self.dir, [r for r in history if r.epoch <= start_epoch])
            else:
                dropped = drop_steps_after(self.dir, start_epoch)
                if dropped:
                    logger.info("dvclive: dropped %d row(s) after epoch %d in %s (trained again)", dropped,
                                start_epoch, self.dir)
                repair_summary(self.dir)
            self._live = Live(dir=str(self.dir), resume=True, save_dvc_exp=False, dvcyaml=None)

    def log(self, record: EpochRecord) -> None:
        """Log ``record``'s metrics as step ``record.epoch`` and write the step (tsv rows and metrics.json)."""
        with self._named():
            self._live.step = record.epoch
            for name in LOGGED:
                value = getattr(record, name)
                if value is not None:
                    self._live.log_metric(name, float(value))
            self._live.next_step()

    def close(self) -> None:
        """End the dvclive run (writes the summary and releases the DVC repository it opened)."""
        with self._named():
            self._live.end()

    @contextmanager
    def _named(self) -> Iterator[None]:
        """dvclive writes in place and raises a full disk without a file name: name its folder (a resume rewrites
        its files from the checkpoint's history, so what a failed write left is never read)."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), str(self.dir)) from exc
            raise

    def __enter__(self) -> EpochMetricsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_from_history(live_dir: str | os.PathLike[str], history: Sequence[EpochRecord]) -> None:
    """Write dvclive's files (one tsv per logged metric, ``metrics.json``) as logging ``history`` left them.

    Why: dvclive appends rows and rewrites ``metrics.json`` in place, so a full disk or a kill inside a write leaves
    a truncated row (read back as another value, or glued to the next row) or an empty summary. A resume writes
    them again from the checkpoint's history, atomically, in dvclive's format, so the resumed run's files equal an
    uninterrupted run's."""
    live_dir = Path(live_dir)
    summary: dict[str, Any] = {}
    for name in LOGGED:
        values = [(r.epoch, float(getattr(r, name))) for r in history if getattr(r, name) is not None]
        path = live_dir / "plots" / "metrics" / f"{name}.tsv"
        if values:  # csv writes a float as str(): dvclive's row text
            write_text(path, _tsv_text([["step", name], *([str(step), str(v)] for step, v in values)]))
            summary[name] = values[-1][1]
        else:
            path.unlink(missing_ok=True)
    if history:
        write_text(live_dir / "metrics.json", json.dumps({**summary, "step": history[-1].epoch}, indent=4) + "\n")
    else:
        (live_dir / "metrics.json").unlink(missing_ok=True)


def drop_steps_after(live_dir: str | os.PathLike[str], last_step: int) -> int:
    """Remove the rows with ``step > last_step`` from every dvclive metrics file under ``live_dir``.

    Returns the number of rows removed. Files are rewritten atomically, keeping their header, and only when
    something changes.
    """
    removed = 0
    for path in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        header, rows = _read_tsv(path)
        if "step" not in header:
            continue
        step = header.index("step")
        kept = [row for row in rows if len(row) > step and _as_int(row[step]) <= last_step]
        if len(kept) != len(rows):
            removed += len(rows) - len(kept)
            write_text(path, _tsv_text([header, *kept]))
    return removed


def repair_summary(live_dir: str | os.PathLike[str]) -> bool:
    """Rebuild dvclive's ``metrics.json`` from its per-epoch rows when it is empty or truncated; True if rebuilt.

    Why: dvclive writes ``metrics.json`` in place, so a full disk or a kill inside that write leaves it empty, and
    ``Live(resume=True)`` then fails on every later resume with a bare JSON error naming no file. The rows under
    ``plots/metrics`` (pruned to the checkpoint's epoch by :func:`drop_steps_after`) hold the same latest values.
    """
    path = Path(live_dir) / "metrics.json"
    if not path.is_file():
        return False
    try:
        if isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
            return False
    except (ValueError, UnicodeDecodeError):
        pass
    summary: dict[str, Any] = {}
    step = 0
    for tsv in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        header, rows = _read_tsv(tsv)
        name = tsv.stem
        if "step" not in header or name not in header:
            continue
        for row in reversed(rows):  # the last complete row (a truncated last line is skipped)
            try:
                value, row_step = float(row[header.index(name)]), int(row[header.index("step")])
            except (IndexError, ValueError):
                continue
            summary[name], step = value, max(step, row_step)
            break
    write_text(path, json.dumps({**summary, "step": step}, indent=4))
    logger.warning("dvclive summary %s was empty or truncated: rebuilt from its per-epoch rows (step %d)", path, step)
    return True


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
    return (lines[0], lines[1:]) if lines else ([], [])


def _tsv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator=os.linesep).writerows(rows)  # as dvclive writes them
    return buf.getvalue()


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # an unreadable step is kept (it cannot be a later epoch's row)
