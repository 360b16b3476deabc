"""Run the frozen image tower: eager PyTorch, or ONNX Runtime on a cached ONNX export (fp32 on the CPU).

Why a module of its own: encoding images is most of a cold run's time, and how the tower runs is a choice with
its own rule, its own cache and its own failure modes; the encoder, the benchmarks and prediction all take the
tower from :func:`build_tower`, so there is one place that runs it.

The rule (:func:`resolve_engine`; measured on a quiet 2-core AMD EPYC with AVX512-BF16, no AMX, batch 32,
docs/performance.md section 3): ONNX Runtime ran fp32 RN50 at 1.57x eager fp32 and ViT-B-32 at 1.30x, with features
equal to eager's (min cosine 0.9999999 per image). So ``auto`` picks ``onnxruntime`` on the CPU at fp32 when the
``onnxruntime`` and ``onnx`` packages import, else ``eager``. bf16/fp16 always run eager: ORT's CPU provider has
no fast bf16, and where bf16 is native (the precision rule's only reason to pick it) eager bf16 beat ORT fp32.

The export is cached as a file keyed by everything that changes the graph or its weights (model name, weights id,
a hash of the tower's state dict, torch version, opset), so random weights and local checkpoints never share a
file; it is written atomically under a lock with a sidecar holding the file's sha256, so parallel encoders and
dask workers never read a half-written or damaged file (a damaged one is exported again). When ``auto`` picked
ONNX Runtime and the export or the session fails, the tower falls back to eager with a warning; the engine that
actually runs is :attr:`Tower.engine`, which is what a store's provenance records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coopipe.atomic import atomic_write, write_text
from coopipe.errors import EngineError
from coopipe.locks import exclusive_lock
from coopipe.models import LoadedClip, sha256_file

logger = logging.getLogger(__name__)

ENGINES = ("auto", "eager", "onnxruntime")
OPSET = 17  # the legacy TorchScript exporter (dynamo=False) measured in benchmarks/engines.py; torch marks it
# deprecated: if a later torch drops it, the export fails and ``auto`` falls back to eager with a warning
CACHE_ENV = "COOPIPE_ENGINE_CACHE"
_INSTALL = "pip install 'coopipe[onnx]'"

__all__ = ["ENGINES", "Tower", "build_tower", "default_export_dir", "export_path", "resolve_engine"]


@dataclass(frozen=True)
class Tower:
    """A built image tower: normalised float32 (B, 3, H, W) -> (B, D) float32 features.

    ``engine`` is the engine that actually runs (``eager`` or ``onnxruntime``, never ``auto``): record it.
    ``device``: where the input batch should be (the tower moves it if it is not).
    """

    engine: str
    precision: str
    device: torch.device
    run: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def _ort_missing() -> str | None:
    """Why ONNX Runtime cannot be used here (a package does not import), or None when it can."""
    for name in ("onnxruntime", "onnx"):
        try:
            __import__(name)
        except ImportError as exc:
            return f"package {name!r} is not installed ({type(exc).__name__})"
    return None


def _choose(requested: str, precision: str, device: str | torch.device) -> tuple[str, str]:
    """(engine, reason) for ``requested``; raises :class:`EngineError` for an explicit engine that cannot run."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {requested!r}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"resolve the precision before the engine (got {precision!r})")
    dev = torch.device(device).type
    if requested == "eager":
        return "eager", "explicit"
    problem = None
    if dev != "cpu":
        problem = f"device {dev}: ONNX Runtime runs the CPU tower only"
    elif precision != "fp32":
        problem = f"precision {precision}: ONNX Runtime's CPU provider has no fast bf16/fp16, eager autocast does"
    else:
        missing = _ort_missing()
        if missing:
            problem = f"{missing}; {_INSTALL} for the faster fp32 CPU encoder"
    if requested == "onnxruntime":
        if problem is None:
            return "onnxruntime", "explicit"
        fix = {
            "cpu": f"use --engine eager or auto (or {_INSTALL})",
            "precision": "use --precision fp32 with --engine onnxruntime, or --engine eager",
        }
        hint = fix["cpu"] if dev != "cpu" or precision == "fp32" else fix["precision"]
        raise EngineError(f"--engine onnxruntime cannot run here: {problem}; {hint}")
    if problem is not None:
        return "eager", problem
    return "onnxruntime", "fp32 on the CPU: ONNX Runtime measured 1.3-1.6x eager with equal features"


def resolve_engine(requested: str, precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``onnxruntime`` on the CPU at (resolved) fp32 when its packages import, else ``eager``.

    An explicit engine is kept; ``onnxruntime`` where it cannot run raises :class:`EngineError` naming the fix.
    Logs the choice and why.
    """
    engine, reason = _choose(requested, precision, device)
    if requested == "auto":
        logger.info("engine auto -> %s (%s)", engine, reason)
    else:
        logger.info("engine %s (%s)", engine, reason)
    return engine


def default_export_dir() -> Path:
    """``$COOPIPE_ENGINE_CACHE`` or ``~/.cache/coopipe/engines``: shared by every feature cache (and test)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "coopipe" / "engines"


def _state_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes): tells weights apart, memory format aside."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def export_path(clip: LoadedClip, export_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached ONNX file of ``clip``'s image tower (keyed by model, weights, state, torch version, opset)."""
    key = {
        "model": clip.name,
        "weights": clip.weights_id,
        "state": _state_hash(clip.model.visual),
        "image_size": clip.preprocess.image_size,
        "torch": torch.__version__,
        "opset": OPSET,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in clip.name)
    folder = Path(export_dir) if export_dir is not None else default_export_dir()
    return folder / f"{slug}-visual-{digest}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_intact(path: Path) -> bool:
    """The file exists and matches the sha256 written after it (a truncated or altered file does not)."""
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        return side.read_text(encoding="utf-8").strip() == sha256_file(path)
    except UnicodeDecodeError:  # a damaged sidecar: the export is made again
        return False


def _export(visual: torch.nn.Module, image_size: int, path: Path) -> None:
    """Write the ONNX export of ``visual`` (dynamic batch) to ``path`` atomically, then its sha256 sidecar."""
    example = torch.zeros(2, 3, image_size, image_size)
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX export (ViT)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fixed size
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice (see OPSET)
            atomic_write(path, lambda tmp: torch.onnx.export(
                visual, (example,), str(tmp), input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            ))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    write_text(_sidecar(path), sha256_file(path) + "\n")


def _ensure_export(clip: LoadedClip, export_dir: str | os.PathLike[str] | None) -> Path:
    """The intact cached export of ``clip``'s tower, exporting it first (once, under a lock) if needed."""
    path = export_path(clip, export_dir)
    if _is_intact(path):
        return path
    with exclusive_lock(path.with_name(path.name + ".lock"), f"ONNX export {path.name}", wait=True):
        if _is_intact(path):  # another process exported it while this one waited
            return path
        for stale in path.parent.glob(f".{path.name}.*"):  # temporaries of an export killed mid-way (lock held)
            stale.unlink(missing_ok=True)
        if path.exists():
            logger.warning("cached ONNX export %s is damaged or incomplete: exporting it again", path)
        logger.info("exporting %s's image tower to ONNX (once per model and weights): %s", clip.name, path)
        visual = clip.model.visual.to("cpu").eval()
        _export(visual, clip.preprocess.image_size, path)
    return path


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_tower(clip: LoadedClip, export_dir: str | os.PathLike[str] | None) -> Tower:
    path = _ensure_export(clip, export_dir)
    try:
        session = _session(path)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own (non-Python) exception types
        logger.warning("cannot load %s (%s): exporting it again", path, str(exc).splitlines()[0] if str(exc) else exc)
        _sidecar(path).unlink(missing_ok=True)
        session = _session(_ensure_export(clip, export_dir))

    def run(x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()  # (B, 3, H, W)
        return torch.from_numpy(session.run(["y"], {"x": batch})[0])  # (B, D)

    logger.info("image tower: ONNX Runtime on %s (%d threads)", path.name, torch.get_num_threads())
    return Tower("onnxruntime", "fp32", torch.device("cpu"), run)


def _eager_tower(clip: LoadedClip, precision: str, device: str | torch.device) -> Tower:
    """open_clip's ``encode_image`` in inference mode, channels_last, under autocast for bf16/fp16."""
    dev = torch.device(device)
    clip.model.visual.to(device=dev, memory_format=torch.channels_last)  # helps CPU and CUDA convolutions
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), autocast:
            return clip.model.encode_image(x).float()

    return Tower("eager", precision, dev, run)


def build_tower(
    clip: LoadedClip,
    engine: str,
    precision: str,
    device: str | torch.device = "cpu",
    *,
    export_dir: str | os.PathLike[str] | None = None,
) -> Tower:
    """``clip``'s image tower run by ``engine`` at the (resolved) ``precision``; see the module docstring.

    ``engine`` may be ``auto`` (resolved here; an ONNX Runtime failure falls back to eager with a warning) or
    explicit (an ONNX Runtime failure raises). ``export_dir``: where the ONNX export is cached
    (default :func:`default_export_dir`).
    """
    chosen, _ = _choose(engine, precision, device)
    if chosen == "eager":
        return _eager_tower(clip, precision, device)
    try:
        return _ort_tower(clip, export_dir)
    except Exception as exc:
        if engine != "auto":
            raise EngineError(
                f"--engine onnxruntime failed to export or load {clip.name}'s image tower "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); use --engine eager or auto"
            ) from exc
        logger.warning("engine auto: ONNX Runtime failed (%s: %s); running the eager tower instead",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return _eager_tower(clip, precision, device)
