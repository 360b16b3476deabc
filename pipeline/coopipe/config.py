"""The user-facing settings of each command, with their defaults written once.

``coopipe``'s command line, ``params.yaml`` and the DVC stage scripts all take their defaults from these
dataclasses (and from :class:`coopipe.encode.EncodeOptions` and :class:`coopipe.train_config.TrainConfig`);
``tests/test_defaults.py`` fails when any of them disagrees. Why one place: a default written twice drifts,
and a drifted default (e.g. random weights where the paper uses OpenAI's) silently changes every number.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASS_SUBSETS", "EncodeConfig", "FewShotConfig", "InterpretConfig", "ModelSpec", "PathsConfig", "ReportConfig", "SweepConfig"]

CLASS_SUBSETS = ("all", "base", "new")  # a run's classes: all of them, or the base or new half (base-to-new)


@dataclass(frozen=True)
class PathsConfig:
    """Where feature stores, run folders and the pipeline's tracked results live (relative to the working
    directory). ``metrics`` is small and kept in git (scores and training curves of the DVC pipeline): a DVC
    experiment commits it, so `dvc exp show`/`exp diff`/`plots diff` can compare experiments; ``runs`` is not."""

    cache: str = "cache"
    runs: str = "runs"
    metrics: str = "metrics"


@dataclass(frozen=True)
class ModelSpec:
    """The frozen CLIP model: an open_clip name and its weights.

    ``pretrained`` is an open_clip tag (downloaded by open_clip), a local checkpoint file, or ``none`` for
    random weights; random weights are never a default (the paper uses OpenAI's RN50).
    """

    name: str = "RN50"
    pretrained: str = "openai"


@dataclass(frozen=True)
class EncodeConfig:
    """What is encoded beside the centre view (these change the stored features, and so the store's key)."""

    views: int = 16  # augmented views (random resized crop + flip) per few-shot train image
    crop_scale: tuple[float, float] = (0.08, 1.0)
    aug_seed: int = 0
    augment: str = "coop"  # coop: random resized crop + flip; ordinalclip: resize 256 + random crop 224 + flip
    scheduler: str | None = None  # dask.distributed address; None encodes in-process
    confine_paths: bool = False  # refuse split-file/manifest image paths outside the data root (untrusted lists)


@dataclass(frozen=True)
class FewShotConfig:
    """CoOp's few-shot protocol: K images per class, three seeds."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class InterpretConfig:
    """Nearest-token lookup of a learned context (CoOp reads its contexts with Euclidean distance)."""

    topk: int = 5
    metric: str = "l2"
    device: str = "cpu"


@dataclass(frozen=True)
class ReportConfig:
    """Which method the gain-over-zero-shot figure shows (None shots: the most available)."""

    gain_method: str = "coop"
    gain_shots: int | None = None


@dataclass(frozen=True)
class SweepConfig:
    """How ``coopipe sweep`` runs its training runs.

    ``stack``: ``auto`` trains runs of one dataset, method and class list (seeds, shots) stacked in one text pass where
    that wins (on CUDA, and on the CPU when the text GEMMs run on oneDNN, see
    :func:`coopipe.sweep.runner.resolve_stack`), ``on`` always (one stack per dataset and method; on a local CPU it
    trains in the sweep's process with all the cores), ``off`` never.
    """

    stack: str = "auto"
