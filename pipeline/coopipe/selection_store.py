"""The best epoch kept by model selection, stored in the run folder so that a killed run resumes with it.

Why a file of its own: the resume checkpoint (``prompt.json``) holds the current epoch's tensors, which are what
training continues from; the epoch model selection keeps (:mod:`coopipe.selection`) is another set of tensors,
replaced whenever a later epoch validates better, often between two checkpoints. It is written as soon as it is
found:

    best_epoch-<E>.safetensors   the learner's tensors after epoch E, by name
    best_epoch.json              epoch, validation accuracy, the run's training config, the tensor file's name and
                                 sha256, and the record's own digest (``record_sha256``, as ``prompt.json``)

Both go through :func:`coopipe.atomic.atomic_write`, the tensors first under a name of their own, then the JSON
that points at them, then the previous tensor file is removed: a kill at any point leaves a JSON whose tensors
exist. On resume the record is checked like a checkpoint (types, digest, the training config equal to the run's,
the tensor file's hash, finite tensors); what is wrong is one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coopipe.atomic import atomic_write, write_json
from coopipe.checkpoint_check import RECORD_DIGEST, record_digest
from coopipe.errors import CheckpointError, ParamsError
from coopipe.json_records import fields_of, read_json
from coopipe.models import sha256_file
from coopipe.selection import BestEpoch, check_kept
from coopipe.train_config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["BEST_FILE", "BEST_FORMAT", "clear_best", "load_best", "save_best"]

BEST_FILE = "best_epoch.json"
BEST_FORMAT = "coopipe.best_epoch/1"
_TENSORS_GLOB = "best_epoch-*.safetensors"
_FIX = "restore the run folder from a copy, or delete it and re-train"


def _tensor_name(epoch: int) -> str:
    return f"best_epoch-{epoch}.safetensors"


def save_best(directory: str | os.PathLike[str], best: BestEpoch, config: TrainConfig) -> None:
    """Store ``best`` for the run of ``config`` in ``directory`` (tensors, then the record, then the old tensors go)."""
    directory = Path(directory)
    name = _tensor_name(best.epoch)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in best.params.items()}
    tensors = atomic_write(directory / name, lambda tmp: save_file(clean, str(tmp), metadata={"format": BEST_FORMAT}))
    record: dict[str, Any] = {"format": BEST_FORMAT, "epoch": best.epoch, "val_acc": best.val_acc,
                              "config": config.to_dict(), "tensors": {"file": name, "sha256": sha256_file(tensors)}}
    record[RECORD_DIGEST] = record_digest(record)
    write_json(directory / BEST_FILE, record, default=str)
    for old in directory.glob(_TENSORS_GLOB):
        if old.name != name:
            old.unlink(missing_ok=True)


def clear_best(directory: str | os.PathLike[str]) -> None:
    """Remove a stored best epoch (a run starting from scratch must not start from an earlier attempt's)."""
    directory = Path(directory)
    (directory / BEST_FILE).unlink(missing_ok=True)
    for old in directory.glob(_TENSORS_GLOB):
        old.unlink(missing_ok=True)


def load_best(directory: str | os.PathLike[str], config: TrainConfig, *, resumed_epoch: int) -> BestEpoch | None:
    """The best epoch stored for the run of ``config`` resumed after ``resumed_epoch`` epochs (None when selection
    is off or no candidate epoch was reached yet); a record that is missing where it must exist, damaged, or of
    another training config is a :class:`CheckpointError`."""
    if not config.select_every:
        return None
    directory = Path(directory)
    path = directory / BEST_FILE
    first_candidate = min(config.select_every, config.max_epoch)
    if not path.is_file():
        if resumed_epoch >= first_candidate:
            raise CheckpointError(f"run {directory} is at epoch {resumed_epoch} with model selection, but {path} "
                                  f"(the best epoch so far) is missing; {_FIX}")
        return None
    record = read_json(path, what="best epoch record", fix=_FIX, error=CheckpointError)
    with fields_of(path, what="best epoch record", fix=_FIX, error=CheckpointError):
        if not isinstance(record, dict) or record.get("format") != BEST_FORMAT:
            raise CheckpointError(f"{path} is not a coopipe best epoch record (format {BEST_FORMAT}); {_FIX}")
        if record.get(RECORD_DIGEST) != record_digest(record):
            raise CheckpointError(f"{path}: its record was changed after it was written (its {RECORD_DIGEST} "
                                  f"differs); {_FIX}")
        epoch, val_acc = record["epoch"], record["val_acc"]
        if problem := check_kept(epoch, val_acc, config.max_epoch):
            raise CheckpointError(f"{path}: {problem}; {_FIX}")
        try:
            saved = TrainConfig.from_dict(record["config"])
        except ParamsError as exc:
            raise CheckpointError(f"{path}: unreadable training config ({exc}); {_FIX}") from exc
        if diffs := saved.result_differences(config):
            raise CheckpointError(f"{path} was kept by a run with another training config ({', '.join(diffs)}); "
                                  f"{_FIX}")
        name = record["tensors"]["file"]
        if not isinstance(name, str) or Path(name).name != name or not name.startswith("best_epoch-"):
            raise CheckpointError(f"{path}: field 'tensors.file' must name a best_epoch-*.safetensors file; {_FIX}")
        tensor_path = directory / name
        if not tensor_path.is_file() or sha256_file(tensor_path) != record["tensors"]["sha256"]:
            raise CheckpointError(f"{tensor_path} is missing or does not match {path} (sha256 differs); {_FIX}")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{tensor_path} is not a readable safetensors file ({exc}); {_FIX}") from exc
    if not tensors or not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        raise CheckpointError(f"{tensor_path} holds no tensor or non-finite values; {_FIX}")
    logger.info("model selection: resuming with epoch %d kept (validation accuracy %.4f)", epoch, val_acc)
    return BestEpoch(epoch=int(epoch), val_acc=float(val_acc), params=tensors)
