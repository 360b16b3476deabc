"""Decode image files into RGB PIL images, with errors that name the file.

Every mode is converted to RGB exactly as open_clip's own preprocessing does (``Image.convert("RGB")``), so
cached features equal what ``open_clip``'s transform gives for the same file. Where that conversion changes the
picture, the image is still decoded the same way (features must match open_clip's) but a warning names it:

- 16-bit, 32-bit integer and float grayscale (``I;16*``, ``I``, ``F``): PIL clips values to 0..255 (and
  truncates fractions), so a 16-bit scan or a [0, 1] float image comes out white or black; convert such files
  to 8 bits first for a meaningful picture;
- alpha with transparent pixels (``RGBA``, ``LA``, ``PA``, palette with transparency): alpha is dropped, and what
  lies under transparent pixels is arbitrary.

Truncated or corrupt files and decompression bombs (a header claiming more than PIL's pixel limit) raise
:class:`~coopipe.errors.BadImageError`; the encoder's ``on_bad_image`` policy decides whether that stops the run
or the image is skipped and reported. File names are shown with undecodable bytes escaped.
"""

from __future__ import annotations

import logging
import os
import stat
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
        kind = os.stat(path).st_mode  # never open() a FIFO, device or socket: opening one can block for ever
        if not stat.S_ISREG(kind):
            raise BadImageError(
                f"image {name} is not a regular file (a {_file_kind(kind)}); remove it from the folder or list, or "
                f"run with --on-bad-image skip to skip it"
            )
        with warnings.catch_warnings():
            # Above PIL's limit (~89M pixels) PIL only warns; beyond 2x it raises. Both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # force decoding now: truncated files fail here, not later in a worker
                return to_rgb(img, name)
    except BadImageError:
        raise
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


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """RGB copy of a decoded image, as open_clip converts it; a warning when that loses the picture (module doc)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "F" or img.mode in _WIDE_INT_MODES or img.mode.startswith("I;"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255 or (img.mode == "F" and not np.all(arr == np.rint(arr)))):
            logger.warning("image %s (mode %s, values %g..%g) is clipped to 0..255 as open_clip does; convert it to "
                           "8 bits for a meaningful picture", name, img.mode, float(np.nanmin(arr)), float(np.nanmax(arr)))
    elif _has_transparency(img):
        logger.warning("image %s has transparent pixels: alpha dropped as open_clip does", name)
    return img.convert("RGB")


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return bool(np.asarray(img.getchannel("A")).min() < 255)
    return img.mode == "P" and "transparency" in img.info
