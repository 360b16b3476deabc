"""Move feature stores to and from HDF5 (h5py), keeping the provenance, for tools that do not read zarr.

The HDF5 file holds the same arrays (features, labels, index, paths, valid) and the store's attributes as a
JSON string attribute ``coopipe`` (HDF5 attributes cannot hold nested dicts). Importing re-creates a zarr store
at the canonical path for that provenance, so an imported store is found and checked like an encoded one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from coopipe.atomic import atomic_write
from coopipe.errors import StoreError, UnsafePathError
from coopipe.store import (
    STORE_FORMAT,
    FeatureStore,
    StoreWriter,
    open_store,
    store_lock,
    store_path,
)

_ATTR = "coopipe"


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
    """Create the zarr store described by an exported HDF5 file under ``cache_dir``; return its path."""
    src = Path(src)
    if not src.is_file():
        raise StoreError(f"no HDF5 file at {src}")
    with h5py.File(src, "r") as h5:
        if _ATTR not in h5.attrs:
            raise StoreError(f"{src} was not exported by coopipe (no '{_ATTR}' attribute); cannot import it")
        attrs = json.loads(h5.attrs[_ATTR])
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{src} holds store format {attrs.get('format')!r}, expected {STORE_FORMAT}")
        provenance = _checked_provenance(attrs.get("provenance"), src)
        path = store_path(cache_dir, provenance)  # every component slugged and confined to cache_dir
        if path.exists():
            open_store(path, expect=provenance)
            return path
        feats = h5["features"]
        with store_lock(path):
            writer = StoreWriter.create(
                path, provenance, labels=h5["labels"][:], index=h5["index"][:],
                paths=[p.decode() if isinstance(p, bytes) else str(p) for p in h5["paths"][:]],
                n_views=int(feats.shape[1]), dim=int(feats.shape[2]), dtype=str(feats.dtype),
                chunk_rows=int(feats.chunks[0]) if feats.chunks else 256,
            )
            valid = np.asarray(h5["valid"][:], dtype=bool)
            for chunk in writer.pending_chunks():
                rows = writer.chunk_rows_range(chunk)
                writer.write_chunk(chunk, feats[rows.start : rows.stop], valid[rows.start : rows.stop])
            extra = {k: v for k, v in attrs.items() if k not in {"format", "provenance", "complete", "n_rows"}}
            writer.finalize(extra)
    return path


def _checked_provenance(provenance: Any, src: Path) -> dict[str, Any]:
    """The imported provenance, refused unless the fields that name the store are plain, safe values.

    An HDF5 file may come from anyone: its ``dataset``/``split`` become folder and file names, so a value
    such as ``../../x`` must never reach the file system (the store path is slugged and confined as well).
    """
    if not isinstance(provenance, dict):
        raise StoreError(f"{src}: the 'provenance' attribute is not an object; the file is damaged or not coopipe's")
    for key in ("dataset", "split", "model", "weights"):
        value = provenance.get(key)
        if not isinstance(value, str) or not value:
            raise StoreError(f"{src}: provenance field {key!r} is missing or not a string; cannot import it")
    for key in ("dataset", "split"):
        value = provenance[key]
        if value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
            raise UnsafePathError(
                f"{src}: provenance {key} {value!r} is not a plain name (it would build a path outside the "
                f"cache); refusing to import it"
            )
    views = provenance.get("views")
    if not isinstance(views, dict) or type(views.get("n_aug")) is not int or views["n_aug"] < 0:
        raise StoreError(f"{src}: provenance field 'views' is missing or malformed; cannot import it")
    return provenance
