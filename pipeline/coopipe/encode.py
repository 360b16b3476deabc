"""Encode a dataset split once into a feature store: decode in worker processes, encode, write zarr chunks.

The image encoder is the expensive part, so everything else is arranged around keeping it busy:
- the precision defaults to ``auto``: :mod:`coopipe.hardware` resolves it once per store (bf16 autocast where the
  hardware computes bf16 natively, fp16 on older CUDA, else fp32), always with channels_last; the engine defaults
  to ``auto``: :mod:`coopipe.engines` runs fp32 CPU encoding on ONNX Runtime where it is installed, else eager
  PyTorch; the *resolved* precision and the engine that actually ran go into the store's provenance, so machines
  that resolve differently never share (or extend) a store;
- decoding and view generation run in ``num_workers`` DataLoader worker processes (at a lower scheduling
  priority, so on a small CPU they fill the model's idle moments instead of stalling its threads) and hand
  uint8 tensors to the main process, which normalises a whole batch at once and runs the model;
- rows are processed chunk by chunk in store order, and a chunk is handed to a writer thread (compression and
  zarr I/O off the model's critical path) as soon as its last row is encoded; it is marked done once written,
  so a killed run loses at most the chunks in flight and a re-run resumes;
- with a dask.distributed scheduler address, chunk-aligned blocks of rows are encoded by the cluster's
  workers, each loading the model once (a worker plugin caches it), writing into the same partial store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import coopipe
from coopipe.atomic import write_json
from coopipe.datasets.base import Dataset
from coopipe.errors import (
    BadImageError,
    CoopipeError,
    CorruptStoreError,
    MissingFileError,
    ProvenanceMismatchError,
    StoreError,
)
from coopipe.imageio import load_rgb, shown_path
from coopipe.chunkwriter import ChunkWriterThread
from coopipe.engines import ENGINES, Tower, build_tower, resolve_engine
from coopipe.hardware import PRECISIONS, resolve_precision
from coopipe.models import ClipIdentity, LoadedClip, PreprocessConfig, load_clip, open_clip_version
from coopipe.orphans import die_with_parent
from coopipe.store import (
    FeatureStore,
    open_store,
    partial_path,
    store_lock,
    store_path,
)
from coopipe.store_writer import StoreWriter, reopen_damaged
from coopipe.views import ViewSpec, make_views, normalize_batch

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")
_WORKER_NICE = 10  # decode workers yield the cores to the model's threads (see the module docstring)


@dataclass(frozen=True)
class EncodeOptions:
    """How to run the encoder (none of this changes the features except ``precision``, ``engine`` and ``dtype``).

    ``precision``: ``auto`` (the hardware's fast choice, see :mod:`coopipe.hardware`), ``bf16``, ``fp16`` or
    ``fp32``. ``engine``: how the frozen image tower runs: ``auto`` (ONNX Runtime for fp32 on the CPU where it is
    installed, else eager; see :mod:`coopipe.engines`), ``eager`` or ``onnxruntime``.
    """

    batch_size: int = 64
    num_workers: int = 1
    dtype: str = "float16"
    precision: str = "auto"
    engine: str = "auto"
    chunk_rows: int = 256
    on_bad_image: str = "fail"
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.batch_size < 1 or self.chunk_rows < 1 or self.num_workers < 0:
            raise ValueError("batch_size and chunk_rows must be >= 1 and num_workers >= 0")

    def resolved(self, clip: LoadedClip | ClipIdentity | None = None) -> EncodeOptions:
        """These options with ``precision`` resolved for ``device`` and ``clip``'s image tower, then ``engine`` for
        that precision (never ``auto`` afterwards); logs the choices. An explicit ``onnxruntime`` that cannot run
        here raises :class:`~coopipe.errors.EngineError`."""
        conv = clip is not None and (clip.conv_tower if isinstance(clip, ClipIdentity) else is_conv_tower(clip))
        precision = resolve_precision(self.precision, self.device, conv_tower=conv)
        return replace(self, precision=precision, engine=resolve_engine(self.engine, precision, self.device))


def is_conv_tower(clip: LoadedClip) -> bool:
    """Whether the image tower is convolutional (open_clip's ModifiedResNet) rather than a transformer."""
    return clip.identity.conv_tower


@dataclass(frozen=True)
class EncodeJob:
    """Everything a (possibly remote) worker needs to encode rows of one store; picklable."""

    image_root: str
    paths: tuple[str, ...]  # per store row
    positions: tuple[int, ...]  # per store row: position in the split's file list (seeds the views)
    preprocess: PreprocessConfig
    views: ViewSpec
    model: str
    pretrained: str
    options: EncodeOptions


@dataclass
class EncodeResult:
    path: Path
    n_rows: int
    n_views: int
    encoded_rows: int  # rows encoded by this call (0 when the store already existed)
    seconds: float
    reused: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.encoded_rows / self.seconds if self.seconds > 0 else 0.0


def rows_descriptor(positions: Sequence[int] | None, n_split: int) -> Any:
    """Provenance of which split rows a store holds: ``"all"`` or a count + hash of the positions. Only the rows:
    two requests that select the same rows (few-shot draws are nested) get the same store."""
    if positions is None:
        return "all"
    arr = np.asarray(positions, dtype=np.int64)
    return {"count": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()[:16]}


def build_provenance(
    dataset: Dataset,
    split: str,
    clip: LoadedClip | ClipIdentity,
    views: ViewSpec,
    *,
    positions: Sequence[int] | None,
    options: EncodeOptions,
) -> dict[str, Any]:
    """The inputs that determine a store's content (keyed) plus versions (recorded only).

    ``options`` must be resolved (:meth:`EncodeOptions.resolved`): the precision recorded is the one used.
    """
    if "auto" in (options.precision, options.engine):
        raise ValueError("build_provenance needs resolved options (EncodeOptions.resolved()), got 'auto'")
    n_split = len(dataset.split(split))
    # the builder options (an age dataset's rank range, split ratios...): keyed only when given, so that the
    # stores of a dataset built with its defaults keep their keys
    built_with = {"dataset_options": dict(sorted(dataset.options.items()))} if dataset.options else {}
    return {
        "dataset": dataset.name,
        **built_with,
        "split": split,
        "file_list_sha256": dataset.file_list_hash(split),
        "n_split": n_split,
        "classnames": list(dataset.classnames),
        "rows": rows_descriptor(positions, n_split),
        "model": clip.name,
        "weights": clip.weights_id,
        "preprocess": clip.preprocess.to_dict(),
        "views": views.to_dict(),
        "dtype": options.dtype,
        "precision": options.precision,
        "engine": options.engine,
        "normalized": False,
        "coopipe_version": coopipe.__version__,
        "open_clip_version": open_clip_version(),
    }


class _ViewDataset(torch.utils.data.Dataset):
    """Decodes store rows into stacked uint8 views; errors are returned (not raised) to the main process."""

    def __init__(self, job: EncodeJob) -> None:
        self.job = job
        self.root = Path(job.image_root)

    def __len__(self) -> int:
        return len(self.job.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            img = load_rgb(self.root / self.job.paths[row])
            return row, make_views(img, self.job.positions[row], self.job.preprocess, self.job.views), ""
        except (BadImageError, MissingFileError) as exc:
            return row, None, str(exc)


@dataclass(frozen=True)
class DecodedBatch:
    """One loader batch, stacked in the worker that decoded it.

    Why stacked there: a DataLoader worker hands each tensor to the main process through its own shared-memory
    segment, so per-image tensors cost one segment, one file descriptor and one ``torch.cat`` copy each, and the
    main process (which also drives the model) pays for them between model calls. One (n_good * V, 3, S, S) tensor
    per batch is one segment and no copy.
    """

    rows: tuple[int, ...]  # every row of the batch, in loader order
    good: tuple[int, ...]  # the rows that decoded, in order; their views are stacked in ``views``
    views: torch.Tensor | None  # (len(good) * V, 3, S, S) uint8, or None when no row decoded
    errors: tuple[tuple[int, str], ...]  # (row, one-line error) of the rows that did not decode

    def unreadable(self, on_bad_image: str) -> tuple[tuple[int, str], ...]:
        """``errors``, each logged as skipped; under ``on_bad_image='fail'`` the first raises BadImageError."""
        for _, err in self.errors:
            if on_bad_image == "fail":
                raise BadImageError(err)
            logger.warning("skipping unreadable image: %s", err)
        return self.errors


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> DecodedBatch:
    good = [(row, views) for row, views, _ in items if views is not None]
    return DecodedBatch(
        rows=tuple(row for row, _, _ in items),
        good=tuple(row for row, _ in good),
        views=torch.cat([views for _, views in good]) if good else None,
        errors=tuple((row, err) for row, _, err in items if err),
    )


def worker_init(_: int) -> None:
    """The DataLoader's ``worker_init_fn`` of the decode workers (encode and predict)."""
    die_with_parent()  # a killed encode must not leave its decode workers behind, holding the store's lock
    torch.set_num_threads(1)  # decoding is single-threaded PIL work; leave the cores to the model
    try:
        os.nice(_WORKER_NICE)  # run in the model's idle moments rather than preempting one of its threads
    except (AttributeError, OSError):
        pass


def make_tower(clip: LoadedClip, options: EncodeOptions) -> Tower:
    """The image tower for resolved ``options`` (an explicit engine: a worker runs what the store records)."""
    if "auto" in (options.precision, options.engine):
        raise ValueError("encode with resolved options (EncodeOptions.resolved()), got 'auto'")
    return build_tower(clip, options.engine, options.precision, options.device)


def encode_batch(tower: Tower, batch: torch.Tensor, preprocess: PreprocessConfig) -> np.ndarray:
    """uint8 (B, 3, S, S) -> raw image features (B, D) float32, through ``tower`` (its engine and precision)."""
    x = normalize_batch(batch.to(tower.device, non_blocking=True), preprocess)
    return tower(x).cpu().numpy()


def encode_chunks(
    clip: LoadedClip,
    job: EncodeJob,
    writer: StoreWriter,
    chunks: Sequence[int],
    *,
    on_rows: Callable[[int], None] | None = None,
    num_workers: int | None = None,
    tower: Tower | None = None,
) -> list[dict[str, str]]:
    """Encode the given chunks of ``writer``'s store, writing each as soon as it is complete.

    ``tower``: the built image tower (default: built from ``job.options``, whose engine must be the store's).

    Returns the skipped images (``on_bad_image=skip``); raises BadImageError under ``fail`` after the chunks
    finished before the bad image have been written (so a fixed re-run resumes from there).
    """
    rows = [r for c in chunks for r in writer.chunk_rows_range(c)]
    if not rows:
        return []
    tower = tower or make_tower(clip, job.options)
    background = ChunkWriterThread(writer)
    try:
        skipped = _encode_rows(tower, job, writer, chunks, rows, background, on_rows, num_workers)
    except BaseException:
        background.close(raise_errors=False)  # keep the chunks finished before the error (resume point)
        raise
    background.close()
    return skipped


def _encode_rows(
    tower: Tower,
    job: EncodeJob,
    writer: StoreWriter,
    chunks: Sequence[int],
    rows: list[int],
    background: ChunkWriterThread,
    on_rows: Callable[[int], None] | None,
    num_workers: int | None,
) -> list[dict[str, str]]:
    """The loop of :func:`encode_chunks`: decode (workers) -> encode (here) -> hand full chunks to the writer."""
    options = job.options
    n_views = job.views.n_views
    workers = options.num_workers if num_workers is None else num_workers
    loader = DataLoader(
        _ViewDataset(job),
        batch_size=max(1, options.batch_size // n_views) if n_views > 1 else options.batch_size,
        sampler=rows,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    chunk_of = {c: writer.chunk_rows_range(c) for c in chunks}
    buffers: dict[int, np.ndarray] = {}
    valid: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {c: 0 for c in chunks}
    skipped: list[dict[str, str]] = []
    dim: int | None = None
    for decoded in loader:
        skipped.extend({"path": shown_path(job.paths[row]), "error": err}
                       for row, err in decoded.unreadable(options.on_bad_image))
        feats = None
        if decoded.views is not None:  # (b * V, 3, S, S)
            feats = encode_batch(tower, decoded.views, job.preprocess).reshape(len(decoded.good), n_views, -1)
            dim = feats.shape[-1]
        feat_of = {row: feats[i] for i, row in enumerate(decoded.good)} if feats is not None else {}
        for row in decoded.rows:
            chunk = row // writer.chunk_rows
            span = chunk_of[chunk]
            if chunk not in buffers:
                width = dim if dim is not None else writer.features.shape[2]
                buffers[chunk] = np.zeros((len(span), n_views, width), dtype=np.float32)
                valid[chunk] = np.ones(len(span), dtype=bool)
            if row in feat_of:
                buffers[chunk][row - span.start] = feat_of[row]
            else:
                valid[chunk][row - span.start] = False
            filled[chunk] += 1
            if filled[chunk] == len(span):
                background.put(chunk, buffers.pop(chunk), valid.pop(chunk))
        if on_rows is not None:
            on_rows(len(decoded.rows))
    return skipped


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def encode_split(
    dataset: Dataset,
    split: str,
    *,
    cache_dir: str | Path,
    model: str = "RN50",
    pretrained: str = "none",
    views: ViewSpec = ViewSpec(),
    positions: Sequence[int] | None = None,
    options: EncodeOptions = EncodeOptions(),
    scheduler: str | None = None,
    clip: LoadedClip | None = None,
) -> EncodeResult:
    """Encode ``dataset``'s ``split`` (or only the split ``positions`` given) into a store under ``cache_dir``.

    Re-running with the same inputs is a no-op; an interrupted run is resumed; different inputs go to a
    different store. ``scheduler`` is a dask.distributed address (``None`` = in-process).
    """
    started = time.perf_counter()
    data = dataset.split(split)
    if positions is None:
        pos = list(range(len(data)))
    else:
        pos = sorted({int(p) for p in positions})
        if pos and (pos[0] < 0 or pos[-1] >= len(data)):
            raise StoreError(f"row positions out of range for {dataset.name}/{split} ({len(data)} images)")
    clip = clip or load_clip(model, pretrained, device=options.device)
    requested_engine = options.engine
    options = options.resolved(clip)

    def provenance_of(opts: EncodeOptions) -> dict[str, Any]:
        return build_provenance(dataset, split, clip, views, positions=positions, options=opts)

    provenance = provenance_of(options)
    path = store_path(cache_dir, provenance)
    if (done := complete_store(path, provenance, started)) is not None:
        return done
    # Built only when there is work; an ``auto`` engine that fails falls back to eager, which is another store.
    tower = build_tower(clip, requested_engine, options.precision, options.device)
    if tower.engine != options.engine:
        options = replace(options, engine=tower.engine)
        provenance = provenance_of(options)
        path = store_path(cache_dir, provenance)
        if (done := complete_store(path, provenance, started)) is not None:
            return done
    job = EncodeJob(
        image_root=str(dataset.image_root),
        paths=tuple(data.paths[p] for p in pos),
        positions=tuple(pos),
        preprocess=clip.preprocess,
        views=views,
        model=clip.name,
        pretrained=clip.weights.value,
        options=options,
    )
    labels = [data.labels[p] for p in pos]
    with store_lock(path):
        if path.exists():
            reopen_damaged(path)  # under the lock: the store becomes a .partial with only the damage pending
        writer = StoreWriter.resume(path, provenance) if partial_path(path).exists() else None
        if writer is not None:
            writer.rewrite_rows(labels, pos, job.paths)
            logger.info("resuming %s: %d of %d chunks left", path.name, len(writer.pending_chunks()), writer.n_chunks)
        else:
            writer = StoreWriter.create(
                path, provenance, labels=labels, index=pos, paths=job.paths,
                n_views=views.n_views, dim=clip.embed_dim, dtype=options.dtype, chunk_rows=options.chunk_rows,
            )
        pending = writer.pending_chunks()
        todo = sum(len(writer.chunk_rows_range(c)) for c in pending)
        desc = f"encode {dataset.name}/{split} ({views.label})"
        with _progress(todo, desc, options.progress) as bar:
            if scheduler:
                from coopipe.distributed import encode_chunks_distributed

                skipped = encode_chunks_distributed(scheduler, job, writer, pending, on_rows=bar.update)
            else:
                skipped = encode_chunks(clip, job, writer, pending, on_rows=bar.update, tower=tower)
        skipped_all = _skipped_report(writer, skipped)
        if skipped_all:
            report = path.with_name(path.name + ".skipped.json")
            write_json(report, skipped_all)
            logger.warning("%d unreadable image(s) skipped; report: %s", len(skipped_all), report)
        writer.finalize({"skipped": skipped_all, "encode_seconds": round(time.perf_counter() - started, 3)})
    seconds = time.perf_counter() - started
    logger.info("wrote %s (%d rows x %d views) in %.1fs", path, len(pos), views.n_views, seconds)
    return EncodeResult(path, len(pos), views.n_views, todo, seconds, reused=False, skipped=skipped_all)


def complete_store(path: Path, provenance: Mapping[str, Any], started: float) -> EncodeResult | None:
    """The result for a complete, intact store at ``path`` built from ``provenance`` (nothing to encode), else None
    (a damaged one is repaired by the caller)."""
    if not path.exists():
        return None
    try:  # full verification: a reused store must be intact, and a damaged one is repaired below
        store = open_store(path, expect={k: v for k, v in provenance.items() if not k.endswith("_version")},
                           checksums=True)
    except CorruptStoreError as exc:
        logger.warning("%s", exc)
        return None
    except ProvenanceMismatchError as exc:  # re-running encode cannot help: say what can
        raise ProvenanceMismatchError(
            f"{str(exc).split('; re-encode')[0]}; this encode would write the same folder, and it neither reuses nor "
            f"overwrites a store built from other inputs (copied, renamed or edited by hand?): move or delete "
            f"{path} and re-run the same command, or encode into a new --cache folder"
        ) from exc
    logger.info("store %s already complete: nothing to do", path)
    return EncodeResult(path, store.n_rows, store.n_views, 0, time.perf_counter() - started, reused=True)


def _skipped_report(writer: StoreWriter, skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every invalid row (this run's with its error; earlier runs' as such), for the written report."""
    valid = np.asarray(writer.group["valid"][:], dtype=bool)
    if valid.all():
        return []
    known = {s["path"]: s["error"] for s in skipped}
    paths = np.asarray(writer.group["paths"][:])
    return [{"path": str(p), "error": known.get(str(p), "skipped in an earlier run")} for p in paths[~valid]]


def describe_store(store: FeatureStore) -> dict[str, Any]:
    """A JSON-able summary of a store: shape, dtype, provenance (used by `coopipe cache info`)."""
    return {
        "path": str(store.path),
        "shape": list(store.features.shape),
        "dtype": str(store.features.dtype),
        "chunks": list(store.features.chunks),
        "n_valid": int(store.valid().sum()),
        "provenance": store.provenance,
        "skipped": store.attrs.get("skipped", []),
    }


__all__ = [
    "EncodeJob",
    "EncodeOptions",
    "EncodeResult",
    "build_provenance",
    "complete_store",
    "encode_batch",
    "encode_chunks",
    "make_tower",
    "encode_split",
    "describe_store",
    "CoopipeError",
]
