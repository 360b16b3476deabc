"""Move feature stores to and from HDF5 (h5py), keeping the provenance, for tools that do not read zarr.

The HDF5 file holds the same arrays (features, labels, index, paths, valid) and the store's attributes as a
JSON string attribute ``coopipe`` (HDF5 attributes cannot hold nested dicts). Importing re-creates a zarr store
at the canonical path for that provenance, so an imported store is found and checked like an encoded one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from coopipe.atomic import atomic_write
from coopipe.errors import StoreError
from coopipe.hdf5check import (
    MAX_CHUNK_BYTES,
    MAX_PATH_BYTES,
    REEXPORT,
    checked_dataset,
    open_untrusted,
    read_strings,
)
from coopipe.provenance_check import checked_provenance
from coopipe.store import (
    STORE_FORMAT,
    FeatureStore,
    open_store,
    store_lock,
    store_path,
)
from coopipe.store_writer import StoreWriter

_ATTR = "coopipe"
MAX_ATTR_CHARS = 64 << 20  # the attribute is JSON text: provenance, skipped list
MAX_DIM = 1 << 16


def export_hdf5(store: FeatureStore, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``store`` to an HDF5 file (atomically: a temporary file renamed when complete)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    atomic_write(out, lambda tmp: _write_hdf5(store, tmp))
    return out


def _write_hdf5(store: FeatureStore, tmp: Path) -> None:
    with h5py.File(tmp, "w") as h5:
        feats = h5.create_dataset(
            "features", shape=store.features.shape, dtype=store.features.dtype,
            chunks=tuple(int(c) for c in store.features.chunks), compression="gzip", compression_opts=4,
        )
        step = int(store.features.chunks[0])
        for chunk, start in enumerate(range(0, store.n_rows, step)):
            feats[start : start + step] = store.chunk(chunk)  # checked: a damaged store is never exported
        h5.create_dataset("labels", data=store.labels().astype(np.int32))
        h5.create_dataset("index", data=store.index())
        h5.create_dataset("paths", data=np.asarray(store.paths(), dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("valid", data=store.valid())
        h5.attrs[_ATTR] = json.dumps(store.attrs, default=str)
        for key in ("dataset", "split", "model", "weights"):
            h5.attrs[key] = str(store.provenance.get(key, ""))


def import_hdf5(src: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """Create the zarr store described by an exported HDF5 file under ``cache_dir``; return its path.

    The file is untrusted (:mod:`coopipe.hdf5check`): its arrays are checked against the store schema and the
    file's real size before anything is read, every checksum of the new store is computed here (none is taken
    from the file), and a failed import leaves no partial store behind.
    """
    src = Path(src)
    with open_untrusted(src) as (h5, size):
        attrs = _checked_attrs(h5, src)
        provenance = checked_provenance(attrs.get("provenance"), str(src))
        feats, rows = _checked_arrays(h5, src, size, provenance)
        path = store_path(cache_dir, provenance)  # every component slugged, short, and confined
        if path.exists():
            open_store(path, expect=provenance)
            return path
        with store_lock(path):
            writer = StoreWriter.create(
                path, provenance, labels=rows["labels"], index=rows["index"], paths=rows["paths"],
                n_views=int(feats.shape[1]), dim=int(feats.shape[2]), dtype=str(feats.dtype),
                chunk_rows=_chunk_rows(feats),
            )
            try:
                for chunk in writer.pending_chunks():
                    span = writer.chunk_rows_range(chunk)
                    block = feats[span.start : span.stop]
                    if not np.isfinite(block).all():
                        raise StoreError(f"{src}: features rows {span.start}..{span.stop - 1} hold NaN/inf; "
                                         f"{REEXPORT}")
                    writer.write_chunk(chunk, block, rows["valid"][span.start : span.stop])
                writer.finalize(_kept_attrs(attrs))
            except BaseException:
                shutil.rmtree(writer.partial, ignore_errors=True)  # an import restarts; never a stray folder
                raise
    return path


def _checked_attrs(h5: h5py.File, src: Path) -> dict[str, Any]:
    raw = h5.attrs.get(_ATTR)
    if raw is None:
        raise StoreError(f"{src} was not exported by coopipe (no '{_ATTR}' attribute); cannot import it")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str) or len(raw) > MAX_ATTR_CHARS:
        raise StoreError(f"{src}: the '{_ATTR}' attribute is not one JSON string (got {type(raw).__name__}); "
                         f"{REEXPORT}")
    try:
        attrs = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{src}: the '{_ATTR}' attribute is not valid JSON ({exc}); {REEXPORT}") from exc
    if not isinstance(attrs, dict):
        raise StoreError(f"{src}: the '{_ATTR}' attribute is not a JSON object; {REEXPORT}")
    if attrs.get("format") != STORE_FORMAT:
        raise StoreError(f"{src} holds store format {attrs.get('format')!r}, expected {STORE_FORMAT}")
    return attrs


def _checked_arrays(
    h5: h5py.File, src: Path, size: int, provenance: dict[str, Any]
) -> tuple[h5py.Dataset, dict[str, Any]]:
    """The features array (checked, not read) and the row arrays (read, checked against the store schema)."""
    feats = checked_dataset(h5, "features", src, size)
    n_views = provenance["views"]["n_aug"] + 1
    if feats.ndim != 3 or feats.shape[1] != n_views or not 1 <= feats.shape[2] <= MAX_DIM:
        raise StoreError(f"{src}: features have shape {feats.shape}; a store holds (rows, {n_views} views, "
                         f"dim <= {MAX_DIM}): {REEXPORT}")
    if str(feats.dtype) != provenance["dtype"]:
        raise StoreError(f"{src}: features are {feats.dtype}, the provenance says {provenance['dtype']} "
                         f"(a store holds float16 or float32): {REEXPORT}")
    if n_views * feats.shape[2] * feats.dtype.itemsize > MAX_CHUNK_BYTES:
        raise StoreError(f"{src}: one features row of shape {feats.shape[1:]} is too large to import: {REEXPORT}")
    n = int(feats.shape[0])
    if n == 0:
        raise StoreError(f"{src}: the store holds no rows; nothing to import")
    rows: dict[str, Any] = {}
    for name, kinds in (("labels", "iu"), ("index", "iu"), ("valid", "b"), ("paths", "")):
        dset = checked_dataset(h5, name, src, size)
        if dset.shape != (n,):
            raise StoreError(f"{src}: '{name}' has shape {dset.shape} but features have {n} rows: {REEXPORT}")
        if name == "paths":
            rows[name] = read_strings(dset, name, src, size)
            continue
        if dset.dtype.kind not in kinds or dset.dtype.itemsize > 8:
            what = "whole numbers (an integer array)" if kinds == "iu" else "booleans"
            raise StoreError(f"{src}: '{name}' must hold {what}, got {dset.dtype}: {REEXPORT}")
        rows[name] = dset[:]
    n_classes = len(provenance["classnames"])
    labels, index = rows["labels"].astype(np.int64), rows["index"].astype(np.int64)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise StoreError(f"{src}: labels range {labels.min()}..{labels.max()} but there are {n_classes} classes "
                         f"(0..{n_classes - 1}): {REEXPORT}")
    n_split = provenance["n_split"]
    if index.min() < 0 or index.max() >= n_split or np.unique(index).size != n:
        raise StoreError(f"{src}: 'index' must hold {n} distinct split positions in 0..{n_split - 1}: {REEXPORT}")
    rows["labels"], rows["index"] = labels, index
    return feats, rows


def _chunk_rows(feats: h5py.Dataset) -> int:
    """Store chunk rows: the file's (bounded by its chunk check) or as many as fit one read."""
    row_bytes = int(feats.shape[1]) * int(feats.shape[2]) * feats.dtype.itemsize
    limit = max(1, MAX_CHUNK_BYTES // row_bytes)
    return min(int(feats.chunks[0]) if feats.chunks else 256, limit)


def _kept_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The informative attributes an import keeps (never integrity bookkeeping: that is recomputed)."""
    kept: dict[str, Any] = {}
    skipped = attrs.get("skipped")
    if isinstance(skipped, list) and all(
        isinstance(s, dict) and all(isinstance(s.get(k), str) for k in ("path", "error")) for s in skipped
    ):
        kept["skipped"] = [{"path": s["path"][:MAX_PATH_BYTES], "error": s["error"][:1000]} for s in skipped]
    seconds = attrs.get("encode_seconds")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds):
        kept["encode_seconds"] = seconds
    return kept
