"""The files of a run folder's prompt checkpoint and exported classifier: their names, the tensor names inside, and
safetensors reading and writing.

Why apart: the checkpoint (:mod:`coopipe.checkpoint`), its checks on load (:mod:`coopipe.checkpoint_check`) and the
exported classifier (:mod:`coopipe.classifier`) all read and write these files; the names and the one way to write
a tensor file (atomically, detached CPU copies) live once here. safetensors holds only tensors (no pickle, safe to
load).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from coopipe.atomic import atomic_write
from coopipe.errors import CheckpointError, MissingFileError

TENSORS_FILE = "prompt.safetensors"
META_FILE = "prompt.json"
CLASSIFIER_FILE = "classifier.safetensors"
PARAM_PREFIX = "param."  # every learner parameter (param.ctx, param.meta_net.linear1.weight, ...)
OPTIM_PREFIX = "optim."  # the optimiser's state by parameter and key (resume only)
PREVIOUS_SUFFIX = ".prev"  # the last consistent tensor file, kept while a new pair is being written


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write detached, contiguous CPU copies of ``tensors`` atomically (a reader never sees half a file)."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=dict(metadata)))


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; one :class:`CheckpointError` line if it is absent or unreadable."""
    if not path.is_file():
        raise MissingFileError(f"{what} {path} not found; train (coopipe train) or point to an existing checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is not a readable safetensors file ({exc}); re-create it") from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The text metadata of a safetensors file (the exported classifier's identity)."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose name starts with ``prefix``, by the rest of their name."""
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
