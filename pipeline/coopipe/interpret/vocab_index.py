"""An exact FAISS index over one model's token-embedding table, cached on disk and checked on every load.

Why: a learned context is only meaningful in the vocabulary of the exact model it was trained with, so the index
is built over *that* model's token-embedding table and cached keyed by its weights identity
(``<cache>/vocab/<model>_<weights>_<metric>.faiss`` plus a JSON sidecar that records what was indexed).

Search is exact: a flat FAISS index (``IndexFlatL2``; ``IndexFlatIP`` over L2-normalised vectors for the cosine
metric), on the GPU when faiss-gpu and CUDA are both present. FAISS returns candidates in float32 (squared L2
computed as ``|x|^2 + |y|^2 - 2xy``, which is not exactly 0 for identical vectors); the top candidates are
re-scored exactly in float64, so reported distances are true Euclidean distances (``l2``) or ``1 - cosine
similarity`` (``cosine``), and a context vector equal to a token embedding is at distance 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coopipe.atomic import atomic_write, write_json
from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.store import weights_slug
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

METRICS = ("l2", "cosine")
INDEX_FORMAT = "coopipe.vocab-index/1"
_REFINE_MARGIN = 16  # extra FAISS candidates re-scored exactly in float64


def vocab_embeddings(clip: LoadedClip) -> np.ndarray:
    """The model's token-embedding table as float32 on the CPU: (vocab, width)."""
    weight = resolve_text_tower(clip.model).token_embedding.weight
    return np.ascontiguousarray(weight.detach().float().cpu().numpy())


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ParamsError(f"metric must be one of {METRICS}, got {metric!r}")


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def build_flat_index(vectors: np.ndarray, metric: str) -> Any:
    """An exact CPU FAISS index over ``vectors`` (vocab, width): L2 on the raw vectors, or inner product on the
    normalised ones for ``cosine`` (``vectors`` must already be normalised for cosine; see :func:`index_vectors`)."""
    import faiss

    _check_metric(metric)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatL2(vectors.shape[1]) if metric == "l2" else faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def index_vectors(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """The vectors the index holds for ``metric``: the embeddings (l2) or their L2-normalised rows (cosine)."""
    _check_metric(metric)
    return np.ascontiguousarray(embeddings, dtype=np.float32) if metric == "l2" else _normalise(embeddings)


def gpu_available() -> bool:
    """True when both a faiss build with GPU support and a CUDA device are present."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


@dataclass
class VocabIndex:
    """A FAISS index over one model's vocabulary, with the vectors it holds (for exact re-scoring).

    ``path`` is the cached index file (None when not cached), ``built`` whether it was built by this call (False:
    loaded from the cache), ``on_gpu`` whether searches run on the GPU.
    """

    index: Any  # faiss.Index
    vectors: np.ndarray  # (vocab, width) float32: raw (l2) or normalised (cosine) token embeddings
    metric: str
    model: str
    weights_id: str
    path: Path | None = None
    built: bool = True
    on_gpu: bool = False
    _resources: Any = field(default=None, repr=False)  # faiss.StandardGpuResources kept alive with the index

    @property
    def vocab_size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest tokens of each query row (n, width): distances (n, k) float64, ids (n, k) int64.

        Distances are Euclidean (``l2``) or ``1 - cosine similarity`` (``cosine``), ascending; ties broken by
        the smaller id. FAISS proposes ``k + 16`` candidates, which are re-scored exactly in float64.
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.width))
        if not 1 <= k <= self.vocab_size:
            raise ParamsError(f"topk must lie in 1..{self.vocab_size} (the vocabulary size), got {k}")
        if not np.isfinite(q).all():
            raise ParamsError("context vectors hold NaN/inf values: the checkpoint is corrupt or training diverged")
        if self.metric == "cosine":
            q = _normalise(q)
        n_candidates = min(self.vocab_size, k + _REFINE_MARGIN)
        _, candidates = self.index.search(q, n_candidates)  # (n, c) int64, -1 where FAISS found fewer
        candidates = np.where(candidates < 0, 0, candidates).astype(np.int64)
        vecs = self.vectors[candidates].astype(np.float64)  # (n, c, width)
        q64 = q.astype(np.float64)[:, None, :]  # (n, 1, width)
        if self.metric == "l2":
            exact = np.sqrt(((vecs - q64) ** 2).sum(-1))  # (n, c)
        else:
            exact = 1.0 - (vecs * q64).sum(-1)  # (n, c): both sides normalised (in float32, as indexed)
        order = np.lexsort((candidates, exact), axis=-1)[:, :k]  # by distance, then id
        return np.take_along_axis(exact, order, -1), np.take_along_axis(candidates, order, -1)


def vocab_index_path(cache_dir: str | os.PathLike[str], model: str, weights_id: str, metric: str) -> Path:
    """``<cache>/vocab/<model>_<weights-slug>-<id-hash>_<metric>.faiss`` (the JSON sidecar sits next to it)."""
    _check_metric(metric)
    key = hashlib.sha256(weights_id.encode()).hexdigest()[:8]
    safe_model = "".join(c if c.isalnum() or c in "-." else "-" for c in model)
    return Path(cache_dir) / "vocab" / f"{safe_model}_{weights_slug(weights_id)}-{key}_{metric}.faiss"


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _sidecar(clip: LoadedClip, metric: str, embeddings: np.ndarray, vectors: np.ndarray, path: Path) -> dict[str, Any]:
    import faiss

    return {
        "format": INDEX_FORMAT,
        "model": clip.name,
        "weights": clip.weights_id,
        "metric": metric,
        "index_type": "IndexFlatL2" if metric == "l2" else "IndexFlatIP(normalised)",
        "vocab_size": int(embeddings.shape[0]),
        "width": int(embeddings.shape[1]),
        "embedding_sha256": _sha256(embeddings),
        "vectors_sha256": _sha256(vectors),
        "index_file": path.name,
        "faiss_version": str(faiss.__version__),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_KEYED = ("format", "model", "weights", "metric", "vocab_size", "width", "embedding_sha256", "vectors_sha256")


def _read_cached(path: Path, expected: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
    """The cached index and its vectors if the sidecar and the file match ``expected``; None otherwise."""
    import faiss

    sidecar = _sidecar_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
        logger.warning("vocabulary index sidecar %s is unreadable (%s): rebuilding", sidecar, exc)
        return None
    diffs = [k for k in _KEYED if meta.get(k) != expected[k]]
    if diffs:
        logger.warning("vocabulary index %s was built from other inputs (%s): rebuilding", path, ", ".join(diffs))
        return None
    try:
        index = faiss.read_index(str(path))
        vectors = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
    except (RuntimeError, OSError) as exc:
        logger.warning("vocabulary index %s is unreadable (%s): rebuilding", path, exc)
        return None
    if vectors.shape != (expected["vocab_size"], expected["width"]) or _sha256(vectors) != expected["vectors_sha256"]:
        logger.warning("vocabulary index %s does not hold the vectors its sidecar names: rebuilding", path)
        return None
    return index, vectors


def load_vocab_index(
    clip: LoadedClip,
    *,
    metric: str = "l2",
    cache_dir: str | os.PathLike[str] | None = None,
    gpu: bool | None = None,
) -> VocabIndex:
    """The FAISS index over ``clip``'s token-embedding table, from ``<cache_dir>/vocab`` when cached there.

    Built once per (model, weights identity, metric) and written atomically with a JSON sidecar; a cached file
    is used only if its sidecar names the same model, weights, metric and embedding-table hash and the file
    holds exactly those vectors (else it is rebuilt). ``cache_dir=None`` builds in memory only. ``gpu``: None
    uses a GPU index when faiss-gpu and CUDA are present, False never, True requires one.
    """
    import faiss

    _check_metric(metric)
    embeddings = vocab_embeddings(clip)  # (vocab, width)
    vectors = index_vectors(embeddings, metric)
    path = None if cache_dir is None else vocab_index_path(cache_dir, clip.name, clip.weights_id, metric)
    index = None
    built = True
    expected: dict[str, Any] = {}
    if path is not None:
        expected = _sidecar(clip, metric, embeddings, vectors, path)
        cached = _read_cached(path, expected)
        if cached is not None:
            index, vectors = cached
            built = False
            logger.info("vocabulary index: %s (cached)", path)
    if index is None:
        index = built_index = build_flat_index(vectors, metric)
        if path is not None:
            atomic_write(path, lambda tmp: faiss.write_index(built_index, str(tmp)))
            write_json(_sidecar_path(path), expected)
            logger.info("vocabulary index: built %s (%d tokens x %d)", path, *vectors.shape)
    resources = None
    on_gpu = False
    if gpu is None or gpu:
        if gpu_available():
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            on_gpu = True
        elif gpu:
            raise ParamsError("a GPU index was requested but faiss has no GPU support or CUDA is unavailable")
    return VocabIndex(
        index=index, vectors=vectors, metric=metric, model=clip.name, weights_id=clip.weights_id,
        path=path, built=built, on_gpu=on_gpu, _resources=resources,
    )
