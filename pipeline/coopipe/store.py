"""Chunked zarr v3 feature stores: one per dataset x split x model x weights x view-set.

Layout of a store (a zarr v3 group, directory ``<name>.zarr``)::

    features  (N, V, D)  float16 by default   raw ``encode_image`` output (not L2-normalised); view 0 = centre
    labels    (N,)       int32
    index     (N,)       int64                position of each row in the dataset split's file list
    paths     (N,)       str                  image path relative to the dataset's image root
    valid     (N,)       bool                 False for images skipped under ``on_bad_image=skip``
    done      (n_chunks,) bool                which row chunks are written (resume bookkeeping)
    checksums (n_chunks,) uint64              digest of each features chunk, written before its done mark
    attrs     provenance (model, weights, preprocessing, views, dataset file-list hash, ...) + "complete"

Why it is safe:
- A store is written under ``<name>.zarr.partial`` and renamed to ``<name>.zarr`` only once every chunk is
  written, so nothing half-written is ever opened as complete. A killed encode leaves the ``.partial``
  directory; the next run with the same inputs resumes it, skipping the chunks marked done. A chunk is
  marked done only after its features are written.
- The store name ends with a hash of its provenance (the inputs that determine the features), so different
  inputs write a different store and identical inputs find the existing one (a no-op).
- Every chunk has a file and a digest (:mod:`coopipe.integrity`): :func:`open_store` refuses a store with a
  missing chunk or array metadata (zarr would read zeros), :meth:`FeatureStore.read` checks each chunk's
  digest, and a re-run of the same encode re-encodes only the damaged chunks (:mod:`coopipe.store_writer`).
- :func:`open_store` compares the provenance a reader expects with the stored one and raises
  :class:`~coopipe.errors.ProvenanceMismatchError` naming the fields that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from coopipe.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    ProvenanceMismatchError,
    StoreError,
    UnsafePathError,
)
from coopipe.integrity import (
    REBUILD_HINT,
    REPAIR_HINT,
    digest,
    digest_hex,
    find_damage,
    record_damage,
)
from coopipe.locks import exclusive_lock
from coopipe.provenance_check import READ_FIELDS, checked_provenance

logger = logging.getLogger(__name__)

STORE_FORMAT = "coopipe.features/1"
PARTIAL_SUFFIX = ".partial"
# Provenance fields that identify the *content* of a store. Versions are recorded but not keyed, so upgrading
# coopipe or open_clip does not silently invalidate every cache (the reader still sees them in `cache info`).
_UNKEYED = {"coopipe_version", "open_clip_version", "created", "complete", "n_rows", "skipped"}



def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def provenance_key(provenance: Mapping[str, Any]) -> str:
    """12-hex digest of the keyed provenance fields: the suffix of the store's directory name."""
    keyed = {k: v for k, v in provenance.items() if k not in _UNKEYED}
    return hashlib.sha256(canonical_json(keyed).encode()).hexdigest()[:12]


_SLUG_CHARS = 48  # five components and a key stay far below a file system's 255-byte name limit


def _slug(text: object) -> str:
    """A safe, short file-name component: ASCII letters, digits, ``-``, ``+`` and inner ``.`` only (never
    ``.``/``..``); a long text keeps its start and gets a hash of the whole, so distinct names stay distinct."""
    keep = [c if (c.isascii() and c.isalnum()) or c in "-.+" else "-" for c in str(text)]
    slug = "".join(keep).strip("-.") or "x"
    if len(slug) > _SLUG_CHARS:
        slug = slug[: _SLUG_CHARS - 9].rstrip("-.") + "-" + hashlib.sha256(str(text).encode()).hexdigest()[:8]
    return slug


def confined(root: str | os.PathLike[str], path: Path) -> Path:
    """``path`` if it lies inside ``root`` (after resolving ``..`` and links), else :class:`UnsafePathError`."""
    base = Path(root).resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"refusing path {path}: it resolves outside {root}")
    return path


def weights_slug(weights_id: str) -> str:
    """Short, file-name-safe form of a weights identity, for store names."""
    kind, _, rest = weights_id.partition(":")
    if kind == "sha256":
        return _slug(f"sha256-{rest[:10]}")
    if kind == "random-init":
        return "random"
    if kind == "local-dir":  # local-dir:<file>@sha256:<hex>
        return f"sha256-{rest.rpartition(':')[2][:10]}"
    if kind == "hf-hub":  # hf-hub:<org>/<repo>@<revision>
        repo, _, revision = rest.partition("@")
        return _slug(f"{repo.split('/')[-1]}-{revision[:10]}")
    return _slug(rest.split("/")[-1] if "/" in rest else rest)


def dataset_folder(cache_dir: str | os.PathLike[str], dataset: str) -> Path:
    """The folder of ``dataset``'s stores under ``cache_dir``."""
    return Path(cache_dir) / _slug(dataset)


def store_path(cache_dir: str | os.PathLike[str], provenance: Mapping[str, Any]) -> Path:
    """``cache_dir/<dataset>/<split>_<model>_<weights>_<views>_<key>.zarr`` for the given provenance."""
    views = provenance["views"]
    label = "center" if views["n_aug"] == 0 else f"center+aug{views['n_aug']}"
    subset = "" if provenance.get("rows", "all") == "all" else "_subset"
    name = "_".join(
        [
            _slug(provenance["split"]),
            _slug(provenance["model"]),
            weights_slug(provenance["weights"]),
            _slug(label + subset),
            provenance_key(provenance),
        ]
    )
    # Provenance may come from an imported file: every component is slugged and the result confined.
    folder = dataset_folder(cache_dir, provenance["dataset"])
    return confined(folder, folder / f"{name}.zarr")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def diff_provenance(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Names (dotted) of expected fields whose stored value differs; fields not in ``expected`` are ignored."""
    diffs: list[str] = []
    for key, want in expected.items():
        have = actual.get(key, "<missing>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            diffs += [f"{key}.{sub}" for sub in diff_provenance(want, have)]
        elif canonical_json(want) != canonical_json(have):
            diffs.append(key)
    return diffs


@dataclass
class FeatureStore:
    """A complete store opened for reading. Arrays are zarr arrays: slice them to read only what you need."""

    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.group.attrs["provenance"])

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]  # type: ignore[return-value]

    @property
    def n_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def _small(self, name: str) -> np.ndarray:
        """A whole row array, checked against the digest recorded at write time (it is small: cheap)."""
        try:
            data = np.asarray(self.group[name][:])
        except Exception as exc:  # blosc/zstd raise RuntimeError on garbage bytes
            raise CorruptStoreError(f"store {self.path}: {name} is unreadable ({exc}); {REPAIR_HINT}") from exc
        want = self.attrs.get("checksums", {}).get(name)
        if want is not None and digest_hex(data) != want:
            raise CorruptStoreError(f"store {self.path}: {name} does not match its checksum; {REPAIR_HINT}")
        return data

    def labels(self) -> np.ndarray:
        return self._small("labels").astype(np.int64)

    def index(self) -> np.ndarray:
        return self._small("index").astype(np.int64)

    def paths(self) -> np.ndarray:
        return self._small("paths")

    def valid(self) -> np.ndarray:
        return self._small("valid").astype(bool)

    def classnames(self) -> list[str]:
        return list(self.provenance["classnames"])

    def rows_for(self, split_positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Store rows holding the given split positions (e.g. few-shot indices); error if any is absent."""
        index = self.index()
        order = np.argsort(index)
        wanted = np.asarray(split_positions, dtype=np.int64)
        pos = np.searchsorted(index, wanted, sorter=order)
        pos = np.clip(pos, 0, len(index) - 1)
        rows = order[pos]
        missing = wanted[index[rows] != wanted]
        if missing.size:
            raise StoreError(
                f"store {self.path} does not hold {missing.size} requested image(s) (e.g. split position "
                f"{int(missing[0])}); re-encode the train split with the shots/seeds you train with "
                f"(coopipe encode --shots ... --seeds ...) or without a subset"
            )
        bad = ~self.valid()[rows]
        if bad.any():
            raise StoreError(
                f"store {self.path}: {int(bad.sum())} requested image(s) were skipped as unreadable at encode "
                f"time (e.g. {self.paths()[rows[bad][0]]}); fix the image(s) and re-encode"
            )
        return rows

    def _checksums(self) -> np.ndarray | None:
        return np.asarray(self.group["checksums"][:], dtype=np.uint64) if "checksums" in self.group else None

    def chunk(self, chunk: int, sums: np.ndarray | None = None) -> np.ndarray:
        """Row chunk ``chunk`` of the features as stored (all views), checked against its recorded digest."""
        step = int(self.features.chunks[0])
        sums = self._checksums() if sums is None else sums
        try:
            block = np.asarray(self.features[chunk * step : (chunk + 1) * step])
        except Exception as exc:
            raise CorruptStoreError(f"store {self.path}: features chunk {chunk} is unreadable ({exc}); {REPAIR_HINT}") from exc
        if sums is not None and digest(block) != int(sums[chunk]):
            raise CorruptStoreError(f"store {self.path}: features chunk {chunk} does not match its checksum; {REPAIR_HINT}")
        return block

    def _chunk_run(self, first: int, last: int, sums: np.ndarray | None) -> np.ndarray:
        """Chunks ``first..last`` (inclusive) as stored, each checked; per chunk on a decode error, to name it."""
        step = int(self.features.chunks[0])
        try:
            block = np.asarray(self.features[first * step : (last + 1) * step])
        except Exception:  # noqa: BLE001 - find and name the undecodable chunk
            return np.concatenate([self.chunk(c, sums) for c in range(first, last + 1)])
        if sums is not None:
            for c in range(first, last + 1):
                if digest(block[(c - first) * step : (c - first + 1) * step]) != int(sums[c]):
                    raise CorruptStoreError(
                        f"store {self.path}: features chunk {c} does not match its checksum; {REPAIR_HINT}"
                    )
        return block

    def read(self, rows: Sequence[int] | np.ndarray | None = None, *, view: int | None = 0) -> np.ndarray:
        """Features as float32: (n, D) for one view, or (n, V, D) with ``view=None``. Checks NaN/inf.

        Reads whole chunks (zarr decodes whole chunks anyway) and checks each against the digest recorded
        when it was written, so a truncated or altered chunk is an error, never wrong numbers.
        """
        arr = self.features
        step = int(arr.chunks[0])
        wanted = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(wanted), *(arr.shape[1:] if view is None else arr.shape[2:])), dtype=np.float32)
        chunk_of = wanted // step
        sums = self._checksums()
        if rows is None:  # the common case (evaluation, training sets): one call, no fancy indexing
            block = self._chunk_run(0, -(-self.n_rows // step) - 1, sums)
            out = np.asarray(block if view is None else block[:, view, :], dtype=np.float32)
            if not np.isfinite(out).all():
                raise StoreError(f"store {self.path} holds NaN/inf features; delete it and re-encode (fp32 precision)")
            return out
        for first, last in _runs(np.unique(chunk_of)):
            block = self._chunk_run(first, last, sums)  # one zarr call per run of touched chunks: fast
            sel = (chunk_of >= first) & (chunk_of <= last)
            picked = block[wanted[sel] - first * step]
            out[sel] = picked if view is None else picked[:, view, :]
        if not np.isfinite(out).all():
            raise StoreError(f"store {self.path} holds NaN/inf features; delete it and re-encode (fp32 precision)")
        return out


def _runs(chunks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted chunk numbers -> inclusive (first, last) runs of consecutive chunks."""
    runs: list[tuple[int, int]] = []
    for c in (int(x) for x in chunks):
        if runs and runs[-1][1] == c - 1:
            runs[-1] = (runs[-1][0], c)
        else:
            runs.append((c, c))
    return runs


def open_store(
    path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None, checksums: bool = False
) -> FeatureStore:
    """Open a complete store; raise if it is partial, damaged, not a coopipe store, or built from other inputs.

    Chunk presence is always checked (a missing chunk would read as zeros); ``checksums`` also decodes every
    chunk and compares it with its recorded digest (``coopipe cache verify``, and before an encode reuses it).
    """
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise IncompleteStoreError(
                f"store {path} is still being written or was interrupted ({partial_path(path).name} exists); "
                f"re-run the same `coopipe encode` command to resume it"
            )
        raise StoreError(f"no feature store at {path}; run `coopipe encode` first (see `coopipe cache info`)")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises several unrelated types for a non-store directory
        if (path / "features").is_dir():  # a store that lost its group metadata: encode rebuilds it
            raise CorruptStoreError(f"store {path} lost its group metadata (zarr.json); {REBUILD_HINT}") from exc
        raise StoreError(f"{path} is not a readable zarr store ({exc}); delete it and re-encode") from exc
    if attrs.get("format") != STORE_FORMAT or "provenance" not in attrs:
        raise StoreError(f"{path} is not a coopipe feature store (format {attrs.get('format')!r})")
    if not attrs.get("complete", False):
        raise IncompleteStoreError(f"store {path} is marked incomplete; re-run `coopipe encode` to finish it")
    record = record_damage(attrs)  # before anything in the attributes is believed
    if record:
        raise CorruptStoreError(f"store {path} cannot be checked: {record}; {REBUILD_HINT}")
    checked_provenance(attrs["provenance"], f"store {path}", REBUILD_HINT, READ_FIELDS)
    store = FeatureStore(path=path, group=group)
    if expect:
        diffs = diff_provenance(expect, store.provenance)
        if diffs:
            details = "; ".join(
                f"{d}: store has {_lookup(store.provenance, d)!r}, expected {_lookup(expect, d)!r}" for d in diffs[:4]
            )
            raise ProvenanceMismatchError(
                f"store {path} was built from other inputs ({details}); re-encode with the current settings "
                f"(coopipe encode) or point to the matching store"
            )
    damage = find_damage(path, attrs, checksums=checksums)
    if damage:
        raise CorruptStoreError(f"store {path} is damaged: {damage.summary()}; {REPAIR_HINT}")
    return store


def _lookup(mapping: Mapping[str, Any], dotted: str) -> Any:
    value: Any = mapping
    for part in dotted.split("."):
        value = value.get(part, "<missing>") if isinstance(value, Mapping) else "<missing>"
    return value


def store_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive advisory lock for writing ``path`` (two encodes of one store never interleave)."""
    return exclusive_lock(path.parent / ".locks" / (path.name + ".lock"), f"store {path}")  # out of `ls cache/<ds>`'s way


def find_partials(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Partial stores (``*.zarr.partial``) under ``cache_dir``: interrupted encodes or imports."""
    return sorted(p for p in Path(cache_dir).rglob(f"*.zarr{PARTIAL_SUFFIX}") if p.is_dir())


def find_stores(
    cache_dir: str | os.PathLike[str],
    dataset: str,
    split: str,
    *,
    model: str | None = None,
    weights: str | None = None,
) -> list[FeatureStore]:
    """Complete stores under ``cache_dir`` for ``dataset``/``split`` (optionally one model / weights identity).

    Sorted with the most views first, then the most rows, so callers that want augmented views or the full
    split can take the first one that holds the rows they need.
    """
    folder = dataset_folder(cache_dir, dataset)
    found: list[FeatureStore] = []
    for path in sorted(folder.glob(f"{split}_*.zarr")):
        try:
            store = open_store(path)
        except StoreError as exc:
            logger.warning("ignoring %s: %s", path, exc)
            continue
        prov = store.provenance
        if prov.get("split") != split or prov.get("dataset") != dataset:
            continue
        if (model and prov.get("model") != model) or (weights and prov.get("weights") != weights):
            continue
        found.append(store)
    found.sort(key=lambda s: (-s.n_views, -s.n_rows, s.path.name))
    return found
