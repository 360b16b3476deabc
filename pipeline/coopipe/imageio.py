"""Decode image files into RGB PIL images, with errors that name the file.

Grayscale, palette, CMYK and alpha images are converted to RGB exactly as open_clip's own preprocessing does
(``Image.convert("RGB")``: alpha is dropped), so cached features equal what ``open_clip``'s transform gives.
Truncated or corrupt files raise :class:`~coopipe.errors.BadImageError`; the encoder's ``on_bad_image`` policy
decides whether that stops the run or the image is skipped and reported.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from coopipe.errors import BadImageError, MissingFileError


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Fully decode ``path`` and return an RGB image (raises BadImageError / MissingFileError)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # force decoding now: truncated files fail here, not later in a worker
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except FileNotFoundError as exc:
        raise MissingFileError(f"image {path} is missing; restore it or fix the split/manifest that lists it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(
            f"cannot decode image {path} ({exc}); replace the file, or run with --on-bad-image skip to skip it"
        ) from exc
