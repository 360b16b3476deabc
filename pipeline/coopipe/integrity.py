"""Integrity of feature stores: every chunk present, every chunk's content what was written.

Why: zarr reads a missing chunk file as its fill value (zeros), so a store that lost a file would silently
hand zeros to training or evaluation (labels all 0, features all 0). A store therefore records, at write
time, one 64-bit digest (truncated sha256) per feature chunk (the ``checksums`` array, written before the chunk is marked done)
and whole-array digests of the small arrays (``labels``, ``index``, ``paths``, ``valid``) in its attributes.
Every array is created with ``write_empty_chunks`` so that *every* chunk has a file: a missing file is always
damage, never a legitimate all-fill chunk.

- :func:`find_damage` lists what is wrong (presence only, or with checksums): used by ``open_store`` (presence,
  cheap: one ``stat`` per chunk), by the re-encode repair path and by ``coopipe cache verify`` (checksums).
- :func:`reopen_for_repair` turns a damaged complete store back into a ``.partial`` with only the damaged
  chunks pending, so re-running the same ``coopipe encode`` re-encodes just those (finished chunks are kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

logger = logging.getLogger(__name__)

INTEGRITY_FORMAT = 1
ROW_ARRAYS = ("labels", "index", "paths")  # written once at creation, from the dataset
CHUNKED_ARRAYS = ("features", "valid", "checksums", "done")  # one chunk per row chunk (done/checksums: 1 row)
REPAIR_HINT = "re-run the same `coopipe encode` command to re-encode the damaged chunks (finished chunks are kept)"


def digest(array: np.ndarray) -> int:
    """First 64 bits of the sha256 of an array's contents (strings hashed as UTF-8, NUL-separated).

    sha256 (hardware-accelerated in OpenSSL) is ~2x faster than blake2b here; 64 bits are plenty to detect
    damage (integrity, not authentication: provenance checks are separate).
    """
    arr = np.asarray(array)
    if arr.dtype.kind in "OUT":
        data = "\0".join(str(x) for x in arr.ravel()).encode("utf-8", "backslashreplace")
    else:
        data = np.ascontiguousarray(arr).tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def digest_hex(array: np.ndarray) -> str:
    return f"{digest(array):016x}"


@dataclass
class Damage:
    """What is wrong with a store; empty means intact (as far as was checked)."""

    path: Path
    feature_chunks: set[int] = field(default_factory=set)  # row chunks to re-encode
    arrays: set[str] = field(default_factory=set)  # row arrays (labels/index/paths) to rewrite
    metadata: set[str] = field(default_factory=set)  # arrays whose zarr.json is missing or unreadable
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.feature_chunks or self.arrays or self.metadata)

    def summary(self, limit: int = 3) -> str:
        return "; ".join(self.notes[:limit]) + (f" (+{len(self.notes) - limit} more)" if len(self.notes) > limit else "")


def _chunk_files(root: Path, name: str, meta: dict[str, Any]) -> list[tuple[int, Path]]:
    """(row chunk, file) for every chunk of array ``name`` (v3 default chunk keys ``c/i/0/...``)."""
    shape = meta["shape"]
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    tail = sep.join("0" for _ in shape[1:])
    n_chunks = -(-shape[0] // rows) if shape[0] else 0
    return [(i, root / name / (f"c{sep}{i}" + (sep + tail if tail else ""))) for i in range(n_chunks)]


def _read_meta(root: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((root / name / "zarr.json").read_text())
    except (OSError, ValueError):
        return None


def find_damage(root: Path, attrs: dict[str, Any], *, checksums: bool) -> Damage:
    """Check chunk presence (always) and, with ``checksums``, every recorded digest of the store at ``root``."""
    damage = Damage(root)
    recorded = attrs.get("integrity") == INTEGRITY_FORMAT
    names = (*CHUNKED_ARRAYS, *ROW_ARRAYS) if recorded else ("features", *ROW_ARRAYS)
    n_rows = int(attrs.get("n_rows", 0))
    rows_per_chunk = 0
    for name in names:
        meta = _read_meta(root, name)
        if meta is None:
            damage.metadata.add(name)
            damage.notes.append(f"{name}/zarr.json is missing or unreadable")
            continue
        if name == "features":
            rows_per_chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if not recorded and name != "features":
            continue  # legacy store: all-fill chunks of the small arrays may legitimately have no file
        for chunk, file in _chunk_files(root, name, meta):
            if not file.is_file():
                damage.notes.append(f"{name} chunk {chunk} ({file.relative_to(root)}) is missing")
                if name in ROW_ARRAYS:
                    damage.arrays.add(name)
                else:
                    damage.feature_chunks.add(chunk)
    if damage.metadata & {"features", "done", "checksums"} and rows_per_chunk == 0:
        return damage  # cannot map chunks without the features metadata; reopen_for_repair restores it
    if checksums and recorded:
        _check_digests(root, attrs, damage, n_rows, rows_per_chunk)
    return damage


def _check_digests(root: Path, attrs: dict[str, Any], damage: Damage, n_rows: int, rows_per_chunk: int) -> None:
    group = zarr.open_group(str(root), mode="r")
    sums = attrs.get("checksums", {})
    for name in ROW_ARRAYS:
        if name in damage.arrays or name in damage.metadata:
            continue
        try:
            ok = digest_hex(group[name][:]) == sums.get(name)
        except Exception:  # noqa: BLE001 - corrupt bytes: blosc/zstd raise RuntimeError, others ValueError
            ok = False
        if not ok:
            damage.arrays.add(name)
            damage.notes.append(f"{name} does not match its recorded checksum")
    if {"features", "checksums"} & damage.metadata:
        return
    try:
        recorded = np.asarray(group["checksums"][:], dtype=np.uint64)
    except Exception:  # noqa: BLE001 - any decode failure is damage
        damage.feature_chunks.update(range(len(range(0, n_rows, rows_per_chunk))))
        damage.notes.append("the checksums array is unreadable")
        return
    features = group["features"]
    for chunk, start in enumerate(range(0, n_rows, rows_per_chunk)):
        if chunk in damage.feature_chunks:
            continue
        try:
            ok = digest(features[start : start + rows_per_chunk]) == int(recorded[chunk])
        except Exception:  # noqa: BLE001 - any decode failure is damage
            ok = False
        if not ok:
            damage.feature_chunks.add(chunk)
            damage.notes.append(f"features chunk {chunk} is corrupt (checksum mismatch or undecodable)")
    if "valid" not in damage.metadata:
        try:
            ok = digest_hex(group["valid"][:]) == sums.get("valid", digest_hex(group["valid"][:]))
        except Exception:  # noqa: BLE001 - any decode failure is damage
            ok = False
        if not ok:
            damage.feature_chunks.update(range(len(range(0, n_rows, rows_per_chunk))))
            damage.notes.append("valid does not match its recorded checksum")


def reopen_for_repair(path: Path, partial: Path, attrs: dict[str, Any], damage: Damage) -> None:
    """Move a damaged complete store back to ``partial`` with only its damaged chunks pending.

    Missing array metadata is restored from the copy kept in the group attributes at creation; damaged row
    arrays are rewritten by the resuming encode (they come from the dataset); damaged feature chunks are
    marked not done, so the resume re-encodes exactly them.
    """
    saved = attrs.get("array_meta", {})
    for name in damage.metadata:
        if name not in saved:
            from coopipe.errors import CorruptStoreError

            raise CorruptStoreError(
                f"store {path}: {name}/zarr.json is missing and the store keeps no copy of it; delete {path} and re-encode"
            )
        (path / name).mkdir(parents=True, exist_ok=True)
        (path / name / "zarr.json").write_text(json.dumps(saved[name]))
    os.replace(path, partial)
    group = zarr.open_group(str(partial), mode="r+")
    done = group["done"].with_config({"write_empty_chunks": True})
    for chunk in sorted(damage.feature_chunks):
        done[chunk] = False
    group.attrs.update({"complete": False, "repair_arrays": sorted(damage.arrays)})
    logger.warning("store %s is damaged (%s): reopened to re-encode %d chunk(s)", path, damage.summary(),
                   len(damage.feature_chunks))
