"""What a run costs, in the columns of Tip-Adapter's Table 1: training wall time, time per training image,
inference speed and peak memory.

Why here and measured by the run itself: the field compares methods by accuracy *and* cost (Tip-Adapter, ECCV
2022, Table 1: "Models | Training | Epochs | Time | Accuracy | Gain | Infer. Speed | GPU Mem.", 16-shot ImageNet,
batch 32, one RTX 3090), and a cost taken afterwards on another machine or load is not the run's. The definitions:

- **training wall time** = the method's one-off setup (building the learner and :meth:`Method.prepare`: a cache of
  few-shot features, zero-shot text features, a closed-form initialisation) + the optimisation epochs (the sum of
  the per-epoch times of the run's history: every batch's forward, backward and step, the per-step text pass
  included; per-epoch validation and checkpoint writes excluded). The history survives a resume, so a killed and
  resumed run reports the time of an uninterrupted one (its setup counted once);
- **time per training image** = training wall time / images seen, images seen = few-shot train images x epochs
  (Table 1's Time over its Epochs and images; a training-free fit sees each image once);
- **inference images/s** = test images / wall time of the logits on the cached test features (the head only, read
  from its file or rebuilt from the checkpoint; the model is loaded before: the image tower ran once at encode
  time, unlike Table 1, whose speed includes the image encoder);
- **peak memory** = on the CPU, the process's peak resident set size during inference above its resident size at
  the start (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` first); on CUDA, the peak of
  ``torch.cuda.max_memory_allocated`` above the allocation at the start. Where the peak cannot be reset, the rise of
  the process's lifetime peak (``ru_maxrss``) is reported, a lower bound, and named so.

Runs stacked in one text pass (:mod:`coopipe.stacked`) share their epochs' time: their cost says how many runs it
served (``stacked_runs``), and the report marks it.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from coopipe.train_config import EpochRecord

logger = logging.getLogger(__name__)

__all__ = ["InferenceCost", "PeakMemory", "TrainingCost", "measure_inference", "peak_memory", "read_training_cost",
           "training_cost"]

T = TypeVar("T")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class TrainingCost:
    """A training run's cost (seconds; ``images``: few-shot train images; ``epochs``: optimisation epochs done)."""

    setup_seconds: float
    epoch_seconds: float
    epochs: int
    images: int
    stacked_runs: int = 1
    threads: int = 1
    device: str = "cpu"

    @property
    def train_seconds(self) -> float:
        return self.setup_seconds + self.epoch_seconds

    @property
    def images_seen(self) -> int:
        return self.images * max(self.epochs, 1)

    @property
    def seconds_per_image(self) -> float | None:
        return self.train_seconds / self.images_seen if self.images_seen else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_seconds": self.train_seconds, "images_seen": self.images_seen,
                "seconds_per_train_image": self.seconds_per_image}


def training_cost(history: Sequence[EpochRecord], *, setup_seconds: float, images: int, stacked_runs: int = 1,
                  device: str = "cpu") -> TrainingCost:
    """The cost of a run from its history (every epoch, resumed ones included) and its last start's setup time."""
    return TrainingCost(setup_seconds=float(setup_seconds), epoch_seconds=float(sum(r.seconds for r in history)),
                        epochs=len(history), images=int(images), stacked_runs=int(stacked_runs),
                        threads=torch.get_num_threads(), device=device)


@dataclass
class PeakMemory:
    """Peak memory of a block above its start (bytes), and how it was measured (``kind``)."""

    kind: str = ""
    bytes: int | None = None
    absolute_bytes: int | None = None  # the process's (CPU) or device's (CUDA) peak itself, where known


@dataclass(frozen=True)
class InferenceCost:
    """Inference over cached test features: images, wall time, peak memory."""

    images: int
    seconds: float
    memory: PeakMemory = field(default_factory=PeakMemory)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"inference_images": self.images, "inference_seconds": self.seconds,
                "inference_images_per_s": self.images_per_s, "peak_memory_bytes": self.memory.bytes,
                "peak_memory_absolute_bytes": self.memory.absolute_bytes, "peak_memory_kind": self.memory.kind}


def _status_bytes(name: str) -> int | None:
    """A ``VmXXX`` line of ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak memory of the ``with`` block above its start (see the module docstring for the kinds)."""
    out = PeakMemory()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield out
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        out.kind, out.bytes, out.absolute_bytes = "cuda max allocated above the start", peak - start, peak
        return
    reset = _reset_peak_rss()
    rss = _status_bytes("VmRSS") if reset else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    yield out
    if rss is not None and (hwm := _status_bytes("VmHWM")) is not None:
        out.kind, out.bytes, out.absolute_bytes = "cpu peak RSS above the start (VmHWM reset)", max(hwm - rss, 0), hwm
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.kind, out.bytes, out.absolute_bytes = "cpu rise of the lifetime peak RSS (a lower bound)", after - before, after


def measure_inference(n_images: int, infer: Callable[[], T], *, device: str | torch.device = "cpu") -> tuple[T, InferenceCost]:
    """Run ``infer()`` (the logits of ``n_images`` cached test features) timed and with its peak memory."""
    with peak_memory(device) as memory:
        started = time.perf_counter()
        result = infer()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return result, InferenceCost(int(n_images), seconds, memory)


def read_training_cost(run_dir: str | Path) -> dict[str, Any] | None:
    """The training cost a run folder's ``train.json`` records (None when it records none)."""
    path = Path(run_dir) / "train.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cost = data.get("cost") if isinstance(data, dict) else None
    return dict(cost) if isinstance(cost, Mapping) else None
