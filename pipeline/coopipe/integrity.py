"""Integrity of feature stores: every chunk present, every chunk's content what was written.

Why: zarr reads a missing chunk file as its fill value (zeros), so a store that lost a file would silently
hand zeros to training or evaluation (labels all 0, features all 0). A store therefore records, at write
time, one 64-bit digest (truncated sha256) per feature chunk (the ``checksums`` array, written before the chunk is marked done)
and whole-array digests of the small arrays (``labels``, ``index``, ``paths``, ``valid``) in its attributes.
Every array is created with ``write_empty_chunks`` so that *every* chunk has a file: a missing file is always
damage, never a legitimate all-fill chunk.

Metadata is covered too: bytes checksums alone would let a changed ``features/zarr.json`` (float16 read as
int16) pass with every chunk intact. Each array's ``zarr.json`` must equal the copy saved in the group attributes
at creation (``array_meta``), and since integrity format 2 that copy, the provenance, the row count and the
format are bound by one digest (``meta_digest``), so no edit of the attributes (``"integrity": 0``, another
dtype, other class names) goes unnoticed. Stores of format 1 (written before the digest) keep working: their
array metadata is still compared with the saved copy, but their provenance is not covered, which
``coopipe cache verify`` says. A store without a valid integrity record is never read: re-encoding rebuilds it.

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

from coopipe.atomic import write_text

logger = logging.getLogger(__name__)

INTEGRITY_FORMAT = 2
ACCEPTED_FORMATS = (1, 2)  # 1: chunk and row digests, array metadata against its saved copy; 2: + meta_digest
ROW_ARRAYS = ("labels", "index", "paths")  # written once at creation, from the dataset
CHUNKED_ARRAYS = ("features", "valid", "checksums", "done")  # one chunk per row chunk (done/checksums: 1 row)
REPAIR_HINT = "re-run the same `coopipe encode` command to re-encode the damaged chunks (finished chunks are kept)"
REBUILD_HINT = "re-run the same `coopipe encode` command to rebuild it (or `coopipe cache import` it again)"


def digest(array: np.ndarray) -> int:
    """First 64 bits of the sha256 of an array's contents (strings hashed as UTF-8, NUL-separated).

    sha256 (hardware-accelerated in OpenSSL) is ~2x faster than blake2b here; 64 bits are plenty to detect
    damage (integrity, not authentication: provenance checks are separate). Numbers are hashed through a
    buffer view (no copy of a chunk).
    """
    arr = np.asarray(array)
    if arr.dtype.kind in "OUT":
        return int.from_bytes(hashlib.sha256(
            "\0".join(str(x) for x in arr.ravel()).encode("utf-8", "backslashreplace")).digest()[:8], "little")
    data = np.ascontiguousarray(arr)
    return int.from_bytes(hashlib.sha256(data.view(np.uint8).reshape(-1) if data.size else b"").digest()[:8], "little")


def meta_digest(attrs: dict[str, Any]) -> str:
    """Digest binding what a store's bytes mean: format, provenance, row count and every array's metadata."""
    bound = {key: attrs.get(key) for key in ("format", "provenance", "n_rows", "array_meta")}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]


def digest_hex(array: np.ndarray) -> str:
    return f"{digest(array):016x}"


@dataclass
class Damage:
    """What is wrong with a store; empty means intact (as far as was checked)."""

    path: Path
    feature_chunks: set[int] = field(default_factory=set)  # row chunks to re-encode
    arrays: set[str] = field(default_factory=set)  # row arrays (labels/index/paths) to rewrite
    metadata: set[str] = field(default_factory=set)  # arrays whose zarr.json is missing, unreadable or altered
    notes: list[str] = field(default_factory=list)
    record: str = ""  # what is wrong with the integrity record itself (then nothing else can be trusted)

    def __bool__(self) -> bool:
        return bool(self.record or self.feature_chunks or self.arrays or self.metadata)

    def summary(self, limit: int = 3) -> str:
        if self.record:
            return self.record
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


def record_damage(attrs: dict[str, Any]) -> str:
    """What makes a store's integrity record unusable ("" when it is sound); then nothing in it is trusted."""
    fmt = attrs.get("integrity")
    if type(fmt) is not int or fmt not in ACCEPTED_FORMATS:
        return (f"it has no integrity record (integrity {fmt!r}: written by an older coopipe, or its attributes "
                f"were altered)")
    saved = attrs.get("array_meta")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(n), dict) for n in (*CHUNKED_ARRAYS, *ROW_ARRAYS)):
        return "its saved array metadata is missing or malformed"
    sums = attrs.get("checksums")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(n), str) for n in ROW_ARRAYS):
        return "its recorded row checksums are missing or malformed"
    if fmt >= 2 and attrs.get("meta_digest") != meta_digest(attrs):
        return "its provenance or array metadata does not match the recorded metadata checksum"
    try:
        for name in (*CHUNKED_ARRAYS, *ROW_ARRAYS):
            _chunk_files(Path(), name, saved[name])
        if int(saved["features"]["shape"][0]) != attrs.get("n_rows"):
            return "its row count does not match its features' saved shape"
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
        return "its saved array metadata is malformed"
    return ""


def find_damage(root: Path, attrs: dict[str, Any], *, checksums: bool) -> Damage:
    """Check the integrity record, every array's metadata against its saved copy, chunk presence (always) and,
    with ``checksums``, every recorded digest of the store at ``root``."""
    damage = Damage(root)
    damage.record = record_damage(attrs)
    if damage.record:
        return damage
    saved = attrs["array_meta"]
    n_rows = int(attrs["n_rows"])
    rows_per_chunk = int(saved["features"]["chunk_grid"]["configuration"]["chunk_shape"][0])
    for name in (*CHUNKED_ARRAYS, *ROW_ARRAYS):
        meta = _read_meta(root, name)
        if meta != saved[name]:
            damage.metadata.add(name)
            what = "is missing or unreadable" if meta is None else "differs from the one recorded (dtype, shape or chunks)"
            damage.notes.append(f"{name}/zarr.json {what}")
        for chunk, file in _chunk_files(root, name, saved[name]):
            if not file.is_file():
                damage.notes.append(f"{name} chunk {chunk} ({file.relative_to(root)}) is missing")
                if name in ROW_ARRAYS:
                    damage.arrays.add(name)
                else:
                    damage.feature_chunks.add(chunk)
    if checksums and not damage.metadata:  # digests are read through the metadata: restore it first
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
            ok = digest_hex(group["valid"][:]) == sums.get("valid")
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
    saved = attrs["array_meta"]  # sound: find_damage checked the integrity record first
    for name in damage.metadata:
        (path / name).mkdir(parents=True, exist_ok=True)
        write_text(path / name / "zarr.json", json.dumps(saved[name]))
    if damage.metadata:  # the chunks could not be checked through the altered metadata: check them now
        damage.metadata.clear()
        rows_per_chunk = int(saved["features"]["chunk_grid"]["configuration"]["chunk_shape"][0])
        _check_digests(path, attrs, damage, int(attrs["n_rows"]), rows_per_chunk)
    os.replace(path, partial)
    group = zarr.open_group(str(partial), mode="r+")
    done = group["done"].with_config({"write_empty_chunks": True})
    for chunk in sorted(damage.feature_chunks):
        done[chunk] = False
    group.attrs.update({"complete": False, "repair_arrays": sorted(damage.arrays)})
    logger.warning("store %s is damaged (%s): reopened to re-encode %d chunk(s)", path, damage.summary(),
                   len(damage.feature_chunks))
