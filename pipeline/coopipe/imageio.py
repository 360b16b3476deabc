"""Decode image files into RGB PIL images, with errors that name the file.

8-bit grayscale, palette, CMYK and alpha images are converted to RGB exactly as open_clip's own preprocessing
does (``Image.convert("RGB")``: alpha is dropped), so cached features equal what ``open_clip``'s transform gives.
Where that conversion would lose the picture, coopipe converts correctly instead:

- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``): PIL clips to 255 (an all-white image); here values
  are scaled from the 16-bit range (``v / 257``), or from the image's own range when it exceeds 16 bits;
- float grayscale (``F``): scaled from [0, 1] when the values lie there, else clipped to [0, 255];
- alpha with transparent pixels (``RGBA``, ``LA``, ``PA``, palette with transparency): kept as open_clip does
  (alpha dropped) but logged, since what lies under transparent pixels is arbitrary.

Truncated or corrupt files and decompression bombs (a header claiming more than PIL's pixel limit) raise
:class:`~coopipe.errors.BadImageError`; the encoder's ``on_bad_image`` policy decides whether that stops the run
or the image is skipped and reported. File names are shown with undecodable bytes escaped.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from coopipe.errors import BadImageError, MissingFileError

logger = logging.getLogger(__name__)

_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` for messages: non-UTF-8 bytes of a file name become ``\\xNN`` (never an encoding error)."""
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Fully decode ``path`` and return an RGB image (raises BadImageError / MissingFileError)."""
    path = Path(path)
    name = shown_path(path)
    try:
        with warnings.catch_warnings():
            # Above PIL's limit (~89M pixels) PIL only warns; beyond 2x it raises. Both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # force decoding now: truncated files fail here, not later in a worker
                return to_rgb(img, name)
    except FileNotFoundError as exc:
        raise MissingFileError(f"image {name} is missing; restore it or fix the split/manifest that lists it") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(
            f"image {name} is too large to decode safely ({exc.args[0].split('.')[0]}; a possible decompression "
            f"bomb); replace the file, or run with --on-bad-image skip to skip it"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(
            f"cannot decode image {name} ({exc}); replace the file, or run with --on-bad-image skip to skip it"
        ) from exc


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """RGB copy of a decoded image; wide grayscale modes scaled to 8 bits instead of clipped (see module doc)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _WIDE_INT_MODES or img.mode.startswith("I;"):
        arr = np.asarray(img).astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        low = float(arr.min()) if arr.size else 0.0
        if low < 0 or top > 65535:
            logger.warning("image %s holds values %g..%g outside 16 bits: scaled by its own range", name, low, top)
            arr = (arr - low) / max(top - low, 1.0) * 255.0
        else:
            arr = arr / 257.0
        return _gray8(arr)
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            arr = arr * 255.0
        elif finite.size and (finite.min() < 0 or finite.max() > 255):
            logger.warning("float image %s has values outside [0, 255]: clipped", name)
        return _gray8(np.nan_to_num(arr))
    if _has_transparency(img):
        logger.warning("image %s has transparent pixels: alpha dropped as open_clip does", name)
    return img.convert("RGB")


def _gray8(arr: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # 2-D uint8 -> mode L


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return bool(np.asarray(img.getchannel("A")).min() < 255)
    return img.mode == "P" and "transparency" in img.info
