"""coopipe: CoOp / CoCoOp prompt learning for CLIP-style models, built as a feature-cache pipeline.

Every image goes through the frozen image encoder once, into chunked zarr stores; training then moves only
the prompt context through the frozen text transformer against the stored features.

The library logs through ``logging.getLogger(__name__)`` only; the CLI configures handlers.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
