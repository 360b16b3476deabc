"""The coopipe exception family.

Library code raises these (chained with ``from`` where there is a cause); only the CLI turns them into exit
codes and one-line messages. Each subclasses a built-in exception too, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working. Messages name the offending file or value and the fix.
"""

from __future__ import annotations


class CoopipeError(Exception):
    """Base class of every error coopipe raises on purpose."""


class DatasetError(CoopipeError, ValueError):
    """A dataset, split file, class list or few-shot request is unusable."""


class UnknownDatasetError(DatasetError, KeyError):
    """A dataset name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(CoopipeError, FileNotFoundError):
    """A file that a split, manifest, store or checkpoint refers to is missing."""


class BadImageError(CoopipeError, ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image)."""


class WeightsError(CoopipeError, RuntimeError):
    """Model weights cannot be obtained or do not fit the model."""


class StoreError(CoopipeError, ValueError):
    """A feature store is incomplete, corrupt, or not what the reader asked for."""


class ProvenanceMismatchError(StoreError):
    """A store (or checkpoint) was built from other inputs than the reader expects."""


class IncompleteStoreError(StoreError):
    """A store whose writing has not finished (it can be resumed, never read)."""


class CheckpointError(CoopipeError, ValueError):
    """A checkpoint is missing, corrupt, or incompatible with the features it is used with."""


class ParamsError(CoopipeError, ValueError):
    """params.yaml (or a CLI option) holds a value that cannot work."""


class TrainingDivergedError(CoopipeError, ArithmeticError):
    """A non-finite loss or parameter: training stopped, the run was not marked complete."""


class LockedError(CoopipeError, RuntimeError):
    """Another process holds the lock of a store or run folder."""


class EngineError(CoopipeError, RuntimeError):
    """The requested image-tower engine cannot run here (package missing, wrong precision or device)."""


class CorruptStoreError(StoreError):
    """A complete store with a missing, truncated or altered chunk (re-encoding repairs only the damage)."""


class UnsafePathError(CoopipeError, ValueError):
    """A path built from data (provenance, manifest, split file) would leave the folder it must stay in."""
