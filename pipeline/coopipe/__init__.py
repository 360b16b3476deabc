"""coopipe: CoOp / CoCoOp prompt learning for CLIP-style models, built as a feature-cache pipeline.

Every image goes through the frozen image encoder once, into chunked zarr stores; training then moves only
the prompt context through the frozen text transformer against the stored features.

Importing the package sets ``GOMP_SPINCOUNT`` where the user has not chosen an OpenMP wait policy
(:mod:`coopipe.threads`: why small steps need it on a shared CPU). The library logs through
``logging.getLogger(__name__)`` only; the CLI configures handlers.
"""

from __future__ import annotations

from coopipe.threads import yielding_waits

yielding_waits()  # before any coopipe module imports torch: waiting OpenMP threads yield a shared core

__version__ = "0.1.0"

__all__ = ["__version__"]
