"""Reading an HDF5 file that may come from anyone (``coopipe cache import``) without trusting it.

Why: HDF5 can point outside the file (external raw storage: a dataset whose bytes are any local file; external
and soft links; virtual datasets mapping other files), and it declares array shapes and chunk sizes that h5py
allocates before it reads a byte. A crafted few-KB file could copy ``/etc/passwd`` into a store or ask for
terabytes. So everything here is decided from the file's metadata before any array data is read:

- every array is reached through a hard link and keeps its bytes inside the file (no external or virtual storage);
- only the filters ``cache export`` and common tools use are accepted (deflate, shuffle, fletcher32, lzf);
- the bytes an array declares must fit the file's real size: contiguous storage at most the file's size,
  chunked storage with every chunk present (a missing chunk would read as the fill value) and no more than
  deflate's best ratio (about 1032:1) above the stored bytes, one chunk at most :data:`MAX_CHUNK_BYTES`;
- strings are converted to bounded fixed-length bytes by HDF5 itself (never a variable-length blow-up).

Failures are :class:`~coopipe.errors.StoreError` (or :class:`~coopipe.errors.UnsafePathError` for data that
lives elsewhere) naming the file and the array.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from coopipe.errors import CoopipeError, StoreError, UnsafePathError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_RATIO = 1100  # deflate's best case is ~1032:1; anything claiming more is a bomb
MAX_CHUNK_BYTES = 32 << 20  # one chunk decoded at a time: bounded memory
MAX_PATH_BYTES = 1024  # a relative image path longer than this is not one coopipe wrote
_ALLOWED_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
_STRING_BLOCK = 4096  # rows of paths converted at once (4 MiB)
REEXPORT = "export the store again with `coopipe cache export`"


@contextmanager
def open_untrusted(src: Path) -> Iterator[tuple[h5py.File, int]]:
    """Open ``src`` read-only as HDF5 and yield it with its size; any read failure becomes one line."""
    try:
        size = src.stat().st_size
        with open(src, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
    except OSError as exc:
        raise StoreError(f"cannot read {src} ({exc.strerror or exc}); check the path") from exc
    if not src.is_file() or head != HDF5_SIGNATURE:
        raise StoreError(f"{src} is not an HDF5 file (no HDF5 signature); import only files from `coopipe cache export`")
    try:
        with h5py.File(src, "r", locking=False) as h5:
            yield h5, size
    except CoopipeError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise StoreError(f"cannot read {src} ({type(exc).__name__}: {exc}); the file is truncated or damaged: "
                         f"{REEXPORT}") from exc


def checked_dataset(h5: h5py.File, name: str, src: Path, file_size: int) -> h5py.Dataset:
    """Array ``name`` of the file, refused unless its data lies inside the file and fits the file's size."""
    link = h5.get(name, getlink=True)
    if link is None:
        raise StoreError(f"{src} has no '{name}' array; it was not written by `coopipe cache export`")
    if not isinstance(link, h5py.HardLink):
        raise UnsafePathError(f"{src}: '{name}' is an HDF5 {type(link).__name__} (data outside the array); "
                              f"links are never followed on import: {REEXPORT}")
    obj = h5[name]
    if not isinstance(obj, h5py.Dataset):
        raise StoreError(f"{src}: '{name}' is not an array; it was not written by `coopipe cache export`")
    if obj.is_virtual or obj.external:
        raise UnsafePathError(f"{src}: '{name}' keeps its data in other files (HDF5 external or virtual storage); "
                              f"refusing to read them: {REEXPORT}")
    plist = obj.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in _ALLOWED_FILTERS:
            raise StoreError(f"{src}: '{name}' uses HDF5 filter {code}, which import does not accept "
                             f"(only {', '.join(sorted(_ALLOWED_FILTERS.values()))}): {REEXPORT}")
    _check_size(obj, name, src, file_size)
    return obj


def _check_size(obj: h5py.Dataset, name: str, src: Path, file_size: int) -> None:
    itemsize = 16 if h5py.check_string_dtype(obj.dtype) else obj.dtype.itemsize  # a string: one 16-byte reference
    declared = math.prod(int(s) for s in obj.shape) * itemsize  # Python ints: no overflow
    stored = int(obj.id.get_storage_size())
    too_big = StoreError(f"{src}: '{name}' declares shape {obj.shape} ({declared:,} bytes) but the file holds "
                         f"{file_size:,} bytes; the file is crafted or damaged: {REEXPORT}")
    if stored > file_size:
        raise too_big
    if obj.chunks is None:
        if stored < declared:
            raise too_big
        return
    chunk_bytes = math.prod(int(c) for c in obj.chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise StoreError(f"{src}: '{name}' has chunks of {chunk_bytes:,} bytes (at most {MAX_CHUNK_BYTES:,} are "
                         f"read at once): {REEXPORT}")
    expected = math.prod(-(-int(s) // int(c)) for s, c in zip(obj.shape, obj.chunks, strict=True))
    present = int(obj.id.get_num_chunks()) if expected else 0
    if present != expected:
        raise StoreError(f"{src}: '{name}' stores {present} of its {expected:,} chunks (the rest would read as "
                         f"zeros); the file is crafted or damaged: {REEXPORT}")
    if declared > max(stored, 1) * MAX_RATIO:
        raise too_big


def read_strings(obj: h5py.Dataset, name: str, src: Path, file_size: int) -> list[str]:
    """A 1-D string array as ``str`` (UTF-8, undecodable bytes escaped), each at most :data:`MAX_PATH_BYTES`.

    HDF5 converts the variable-length strings to fixed-length bytes one more than the limit, block by block,
    so memory stays bounded whatever lengths the file declares; repeated references to one long string (a
    way to multiply memory) are caught by the total, which cannot exceed the file's size for real strings.
    """
    if h5py.check_string_dtype(obj.dtype) is None or obj.ndim != 1:
        raise StoreError(f"{src}: '{name}' must be a 1-D string array, got {obj.dtype} {obj.shape}: {REEXPORT}")
    width = MAX_PATH_BYTES + 1
    out: list[str] = []
    total = 0
    for start in range(0, obj.shape[0], _STRING_BLOCK):
        block = obj.astype(f"S{width}")[start : start + _STRING_BLOCK]
        lengths = np.char.str_len(block)
        total += int(lengths.sum())
        if (lengths >= width).any() or total > file_size:
            raise StoreError(f"{src}: '{name}' holds strings longer than {MAX_PATH_BYTES} bytes: {REEXPORT}")
        out += [b.decode("utf-8", "backslashreplace") for b in block.tolist()]
    return out
