"""Writing feature stores: chunk by chunk into ``<name>.zarr.partial``, published atomically when complete.

Crash consistency: creation writes the provenance first and marks the partial store ``initialized`` only once
every array exists, so a kill or a full disk at any point leaves either a resumable partial store or one that
:meth:`StoreWriter.resume` recognises as restartable. Each chunk is written with its digest before it is
marked done (see :mod:`coopipe.integrity`), and every array stores every chunk, so a missing file is damage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from coopipe.errors import IncompleteStoreError, ProvenanceMismatchError, StoreError
from coopipe.imageio import shown_path
from coopipe.integrity import (
    INTEGRITY_FORMAT,
    digest,
    digest_hex,
    find_damage,
    meta_digest,
    record_damage,
    reopen_for_repair,
)
from coopipe.store import _UNKEYED, STORE_FORMAT, diff_provenance, partial_path

logger = logging.getLogger(__name__)

_EVERY_CHUNK = {"write_empty_chunks": True}  # every chunk gets a file, so a missing file is always damage


def _writable(group: zarr.Group, name: str) -> zarr.Array:
    """Array ``name`` of ``group`` set to store every chunk (the setting is per opened array, not persisted)."""
    return group[name].with_config(_EVERY_CHUNK)  # type: ignore[union-attr]


class StoreWriter:
    """Writes one store chunk by chunk into ``<path>.partial`` and publishes it atomically when complete.

    Chunk writes are independent (disjoint files), so several processes (dask workers) may write different
    chunks of the same partial store at once; only :meth:`finalize` must run in a single process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = partial_path(path)
        self.group = zarr.open_group(str(self.partial), mode="r+")
        self.features: zarr.Array = _writable(self.group, "features")
        self.chunk_rows = int(self.features.chunks[0])
        self.n_rows = int(self.features.shape[0])
        self.n_chunks = -(-self.n_rows // self.chunk_rows)

    @classmethod
    def create(
        cls,
        path: Path,
        provenance: Mapping[str, Any],
        *,
        labels: Sequence[int],
        index: Sequence[int],
        paths: Sequence[str],
        n_views: int,
        dim: int,
        dtype: str = "float16",
        chunk_rows: int = 256,
    ) -> StoreWriter:
        """Create ``<path>.partial``: provenance first, arrays next, ``initialized`` last.

        A kill (or full disk) at any point leaves a partial store that :meth:`resume` either resumes or,
        when its creation had not finished, recognises as restartable: never a stuck folder.
        """
        n = len(labels)
        if n == 0:
            raise StoreError(f"refusing to create an empty store at {path}: the split has no images")
        if n_views < 1:
            raise StoreError(f"a store needs at least one view per image, got {n_views}")
        n_classes = len(provenance.get("classnames") or ())
        if n_classes and not all(0 <= int(label) < n_classes for label in labels):
            raise StoreError(f"refusing to create {path}: labels must lie in 0..{n_classes - 1} (one per class name)")
        partial = partial_path(path)
        try:
            if partial.exists():
                shutil.rmtree(partial)
            group = zarr.open_group(str(partial), mode="w")
            group.attrs.update(
                {"format": STORE_FORMAT, "provenance": dict(provenance), "complete": False, "n_rows": n,
                 "initialized": False}
            )
            chunk_rows = max(1, min(chunk_rows, n))
            n_chunks = -(-n // chunk_rows)
            compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
            group.create_array(
                "features", shape=(n, n_views, dim), chunks=(chunk_rows, n_views, dim), dtype=dtype,
                compressors=compressor, fill_value=0, config=_EVERY_CHUNK,
            )
            group.create_array("valid", shape=(n,), chunks=(chunk_rows,), dtype=bool, fill_value=True, config=_EVERY_CHUNK)
            group.create_array("checksums", shape=(n_chunks,), chunks=(1,), dtype="uint64", fill_value=0, config=_EVERY_CHUNK)
            group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False, config=_EVERY_CHUNK)
            for name, dt in (("labels", "int32"), ("index", "int64"), ("paths", str)):
                group.create_array(name, shape=(n,), chunks=(n,), dtype=dt, config=_EVERY_CHUNK)
            sums = _write_rows(group, labels, index, paths)
            array_meta = {
                name: json.loads((partial / name / "zarr.json").read_text())
                for name in ("features", "valid", "checksums", "done", "labels", "index", "paths")
            }
            bound = {"format": STORE_FORMAT, "provenance": dict(provenance), "n_rows": n, "array_meta": array_meta}
            group.attrs.update(
                {"initialized": True, "integrity": INTEGRITY_FORMAT, "checksums": sums, "array_meta": array_meta,
                 "meta_digest": meta_digest(bound)}
            )
        except OSError as exc:
            raise StoreError(_write_error(partial, "create the store", exc)) from exc
        return cls(path)

    @classmethod
    def resume(cls, path: Path, provenance: Mapping[str, Any]) -> StoreWriter | None:
        """Open ``<path>.partial`` to finish it, or ``None`` when its creation never finished (start afresh)."""
        partial = partial_path(path)
        try:
            attrs = dict(zarr.open_group(str(partial), mode="r").attrs)
        except Exception:  # noqa: BLE001 - no or unreadable group metadata: killed right at the start
            attrs = {}
        if not attrs.get("initialized") or record_damage(attrs):
            logger.info("partial store %s was interrupted while being created (or predates checksums): restarting it", partial)
            return None
        writer = cls(path)
        stored = dict(attrs.get("provenance", {}))
        diffs = diff_provenance({k: v for k, v in provenance.items() if k not in _UNKEYED}, stored)
        if diffs:
            raise ProvenanceMismatchError(
                f"partial store {writer.partial} was started from other inputs ({', '.join(diffs)} differ), and "
                f"re-running encode resumes it only for its own inputs: remove it with `coopipe cache clean "
                f"{path.parent.parent} --yes` (it removes partial stores only) and re-run the same command"
            )
        return writer

    def rewrite_rows(self, labels: Sequence[int], index: Sequence[int], paths: Sequence[str]) -> None:
        """Rewrite the row arrays (from the dataset) when a repair found them damaged."""
        if not self.group.attrs.get("repair_arrays"):
            return
        try:
            sums = _write_rows(self.group, labels, index, paths)
            self.group.attrs.update({"checksums": {**self.group.attrs.get("checksums", {}), **sums}, "repair_arrays": []})
        except OSError as exc:
            raise StoreError(_write_error(self.partial, "rewrite the row arrays", exc)) from exc

    def pending_chunks(self) -> list[int]:
        done = np.asarray(self.group["done"][:], dtype=bool)
        return [int(i) for i in np.flatnonzero(~done)]

    def chunk_rows_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows))

    def write_chunk(self, chunk: int, features: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write one whole row chunk (V views), its validity and digest, and then mark it done."""
        rows = self.chunk_rows_range(chunk)
        if features.shape[0] != len(rows):
            raise StoreError(f"chunk {chunk} needs {len(rows)} rows, got {features.shape[0]}")
        data = np.ascontiguousarray(features.astype(self.features.dtype, copy=False))
        try:
            self.features[rows.start : rows.stop] = data
            _writable(self.group, "valid")[rows.start : rows.stop] = np.ones(len(rows), bool) if valid is None else valid
            _writable(self.group, "checksums")[chunk] = np.uint64(digest(data))
            _writable(self.group, "done")[chunk] = True
        except OSError as exc:
            raise StoreError(_write_error(self.partial, f"write chunk {chunk}", exc)) from exc

    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> Path:
        """Check every chunk is done, mark complete and atomically publish under the final name."""
        pending = self.pending_chunks()
        if pending:
            raise IncompleteStoreError(f"store {self.partial} still misses {len(pending)} chunk(s); resume it")
        attrs = dict(extra_attrs or {})
        attrs["complete"] = True
        attrs["checksums"] = {**self.group.attrs.get("checksums", {}), "valid": digest_hex(self.group["valid"][:])}
        try:
            self.group.attrs.update(attrs)
            os.replace(self.partial, self.path)  # atomic on one filesystem: readers see all or nothing
        except OSError as exc:
            raise StoreError(_write_error(self.partial, "finish the store", exc)) from exc
        return self.path


def _write_rows(group: zarr.Group, labels: Sequence[int], index: Sequence[int], paths: Sequence[str]) -> dict[str, str]:
    """Write labels/index/paths and return their digests (paths as shown: undecodable bytes escaped)."""
    arrays = {
        "labels": np.asarray(labels, dtype=np.int32),
        "index": np.asarray(index, dtype=np.int64),
        "paths": np.asarray([shown_path(p) for p in paths], dtype=object),
    }
    for name, data in arrays.items():
        _writable(group, name)[:] = data
    return {name: digest_hex(np.asarray(group[name][:])) for name in arrays}


def _write_error(partial: Path, what: str, exc: OSError) -> str:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return (f"cannot {what} of {partial} ({reason}); free space or fix the folder, then re-run the same command "
            f"(finished chunks are kept)")


def reopen_damaged(path: Path) -> bool:
    """Verify a complete store fully; if damaged, reopen it as ``.partial`` with only the damage pending.

    A store whose group metadata (root ``zarr.json``) is gone or whose integrity record cannot be trusted keeps
    nothing to check its chunks against: it is removed, and the caller encodes it afresh (runs under the lock).
    """
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - zarr raises several unrelated types for a missing/garbled zarr.json
        attrs = {}
    damage = find_damage(path, attrs, checksums=True)
    if damage.record:
        logger.warning("store %s cannot be checked (%s): rebuilding it", path, damage.record or "no group metadata")
        shutil.rmtree(path)
    elif damage:
        reopen_for_repair(path, partial_path(path), attrs, damage)
    return bool(damage)
