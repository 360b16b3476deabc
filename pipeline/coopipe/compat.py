"""Compatibility shim that lets ``open_clip`` import next to a torchvision whose C extension cannot load.

Why: on machines where the only torchvision wheel is a CUDA build and torch is a CPU build, torchvision's
``_C.so`` fails to load, and ``torchvision/_meta_registrations.py`` then dies at import time with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake kernels for the
``torchvision::nms`` and ``torchvision::qnms`` operators without checking that they exist. open_clip imports
torchvision (for its transforms), so ``import open_clip`` fails too.

The fix: before torchvision is imported, try to load its extension exactly as torchvision would; only if that
fails, define the two operator *schemas* with ``torch.library`` so the fake-kernel registration succeeds.
No kernel is registered, so calling ``torchvision.ops.nms`` still raises a clear "no kernel" error: the shim
never pretends detection ops work. coopipe only uses torchvision's pure-Python image transforms.

Everything in coopipe that needs open_clip gets it through :func:`import_open_clip`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import types

import torch

logger = logging.getLogger(__name__)

_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_extension_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                return os.path.join(folder, name)
    return None


@functools.lru_cache(maxsize=None)
def ensure_torchvision_ops() -> torch.library.Library | None:
    """Make ``import torchvision`` work; return the shim's library handle, or None when none was needed.

    Cached, so it runs once per process and the returned ``torch.library.Library`` stays referenced (the
    schemas it defined vanish if the handle is garbage-collected).
    """
    path = _torchvision_extension_path()
    if path is None:
        return None  # no torchvision installed: nothing to fix
    try:
        torch.ops.load_library(path)
        return None
    except (OSError, ImportError, RuntimeError) as exc:
        logger.debug("torchvision C extension unavailable (%s); defining nms/qnms schemas", exc)
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined by another loader already
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _OP_SCHEMAS:
        lib.define(schema)
    return lib


def import_open_clip() -> types.ModuleType:
    """Return the ``open_clip`` module, applying the torchvision shim first if needed."""
    ensure_torchvision_ops()
    import open_clip

    return open_clip
