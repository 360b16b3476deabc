"""Interpret a learned CoOp context: the nearest vocabulary tokens of every context vector, found with FAISS.

Why: CoOp (Zhou et al.) reads a learned context by the vocabulary words nearest to each context vector in the
token-embedding space (Euclidean distance). That is only meaningful in the vocabulary of the exact model the
context was trained with, so the index is built over *that* model's token-embedding table and cached on disk
keyed by its weights identity (``<cache>/vocab/<model>_<weights>_<metric>.faiss`` plus a JSON sidecar that
records what was indexed, checked on every load).

- Search is exact: a flat FAISS index (``IndexFlatL2``; ``IndexFlatIP`` over L2-normalised vectors for the
  cosine metric), on the GPU when faiss-gpu and CUDA are both present. FAISS returns candidates in float32
  (squared L2 computed as ``|x|^2 + |y|^2 - 2xy``, which is not exactly 0 for identical vectors); the top
  candidates are re-scored exactly in float64, so reported distances are true Euclidean distances (``l2``) or
  ``1 - cosine similarity`` (``cosine``), and a context vector equal to a token embedding is at distance 0.
- Class-specific context (CSC) is read per class; unified context once.
- Tokens are decoded to readable text: CLIP's BPE end-of-word marker ``</w>`` is removed (a piece without it
  continues into the next token and is shown with a trailing ``…``), the byte-level alphabet is mapped back
  to bytes and decoded as UTF-8 (non-Latin scripts kept), undecodable bytes and control characters are shown
  escaped (``\\xe2``), and ``<start_of_text>``/``<end_of_text>`` are flagged as special.
- The *nearest-word prompt* replaces every context vector by its nearest token. Its accuracy is measured two
  ways: ``nearest_tokens`` puts exactly those token embeddings in the context slots (the true projection onto
  the vocabulary), ``nearest_text`` tokenises the readable string ``"<words> {classname}."`` as a user would
  type it (the two agree when the string tokenises back to the same ids: ``text_roundtrip``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coopipe.errors import ParamsError, ProvenanceMismatchError
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.store import weights_slug
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

METRICS = ("l2", "cosine")
INDEX_FORMAT = "coopipe.vocab-index/1"
CONTINUES = "…"  # display suffix of a BPE piece that continues into the next token (no </w>)
_END_OF_WORD = "</w>"
_REFINE_MARGIN = 16  # extra FAISS candidates re-scored exactly in float64


# ---------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Token:
    """One vocabulary entry, decoded for people.

    ``bpe``: the raw vocabulary string (``"photo</w>"``); ``text``: readable text without the end-of-word
    marker, undecodable bytes and control characters escaped; ``end_of_word``: the piece ends a word (CLIP's
    ``</w>``); ``special``: ``<start_of_text>``/``<end_of_text>`` (or another special token); ``raw``: the
    token's bytes (empty for special tokens), used to join pieces into a string.
    """

    id: int
    bpe: str
    text: str
    end_of_word: bool
    special: bool
    raw: bytes = field(default=b"", repr=False)

    @property
    def display(self) -> str:
        """``text``, with a trailing ``…`` when the piece continues into the next token."""
        return self.text if self.end_of_word or self.special else self.text + CONTINUES

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "bpe": self.bpe, "end_of_word": self.end_of_word, "special": self.special}


def _escape_char(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"


def readable_bytes(raw: bytes) -> str:
    """UTF-8 text of ``raw`` with undecodable bytes as ``\\xNN`` and whitespace/control characters escaped.

    A literal backslash is doubled, so the escaped form is unambiguous. Printable non-Latin text is kept as is.
    """
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # a byte that is not valid UTF-8 on its own (part of a multi-byte char)
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isspace() or not ch.isprintable():
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


def decode_token(tokenizer: Any, token_id: int) -> Token:
    """Decode one id of a CLIP BPE tokenizer (open_clip's ``SimpleTokenizer``: ``decoder`` + ``byte_decoder``).

    Other tokenizers fall back to their ``convert_ids_to_tokens`` (Hugging Face) or to the bare id.
    """
    token_id = int(token_id)
    special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if isinstance(decoder, dict) and isinstance(byte_decoder, dict) and token_id in decoder:
        bpe = str(decoder[token_id])
        if token_id in special_ids or (bpe.startswith("<") and bpe.endswith(">") and not bpe.endswith(_END_OF_WORD)):
            return Token(token_id, bpe, bpe, True, True)
        end_of_word = bpe.endswith(_END_OF_WORD)
        core = bpe[: -len(_END_OF_WORD)] if end_of_word else bpe
        try:
            raw = bytes(byte_decoder[c] for c in core)
        except KeyError:  # not a byte-level entry (an added token): keep its text
            return Token(token_id, bpe, readable_bytes(core.encode("utf-8")), end_of_word, False, core.encode("utf-8"))
        return Token(token_id, bpe, readable_bytes(raw), end_of_word, False, raw)
    hf = getattr(getattr(tokenizer, "tokenizer", None), "convert_ids_to_tokens", None)
    if callable(hf):
        text = str(hf(token_id))
        return Token(token_id, text, readable_bytes(text.encode("utf-8")), True, token_id in special_ids, text.encode("utf-8"))
    return Token(token_id, str(token_id), f"<{token_id}>", True, token_id in special_ids)


def join_tokens(tokens: Sequence[Token]) -> str:
    """The tokens as one string, as the BPE tokenizer would decode them (word pieces glued, words spaced).

    Undecodable bytes are escaped (``\\xNN``); special tokens appear as their literal names.
    """
    parts: list[bytes] = []
    for token in tokens:
        parts.append(token.bpe.encode("utf-8") + b" " if token.special else token.raw + (b" " if token.end_of_word else b""))
    text = b"".join(parts).decode("utf-8", errors="backslashreplace")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- the index
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


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    except (OSError, json.JSONDecodeError) as exc:
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
        index = build_flat_index(vectors, metric)
        if path is not None:
            _atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
            sidecar_text = json.dumps(expected, indent=1)
            _atomic_write(_sidecar_path(path), lambda tmp: tmp.write_text(sidecar_text))
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


# ---------------------------------------------------------------------------------------------- reading a context
@dataclass(frozen=True)
class Neighbour:
    rank: int  # 1 = nearest
    token: Token
    distance: float


@dataclass(frozen=True)
class ContextSlot:
    """One context vector: its nearest tokens and, for a word-initialised context, its init word."""

    position: int  # 1-based index among the context vectors
    neighbours: tuple[Neighbour, ...]
    init_token: Token | None = None
    init_distance: float | None = None  # distance (same metric) to the init word's embedding

    @property
    def nearest(self) -> Token:
        return self.neighbours[0].token


@dataclass(frozen=True)
class ContextReading:
    """A whole context read as words: the unified context, or one class's context under CSC."""

    classname: str | None  # None for the unified context
    slots: tuple[ContextSlot, ...]
    template: str  # nearest-word prompt with the placeholder "{classname}", e.g. "a photo of a {classname}."

    @property
    def words(self) -> str:
        """The nearest tokens of all slots as one string, e.g. ``"a photo of a"``."""
        return join_tokens([slot.nearest for slot in self.slots])

    def prompt(self, classname: str) -> str:
        return self.template.replace("{classname}", classname)


@dataclass(frozen=True)
class ProjectionAccuracy:
    """Test accuracy (fractions) of the learned context and of its projection onto vocabulary tokens."""

    n_images: int
    learned: float
    nearest_tokens: float  # context slots filled with the nearest tokens' embeddings (exact projection)
    nearest_text: float  # the readable nearest-word prompt strings, tokenised as typed
    text_roundtrip: bool  # the strings tokenise back to exactly the projected token ids
    source: str | None = None  # where the test features came from (a store path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "learned": self.learned,
            "nearest_tokens": self.nearest_tokens,
            "nearest_text": self.nearest_text,
            "text_roundtrip": self.text_roundtrip,
            "drop_nearest_tokens": self.learned - self.nearest_tokens,
            "source": self.source,
        }


@dataclass
class Interpretation:
    """Nearest vocabulary tokens of every context vector of a prompt learner."""

    model: str
    weights_id: str
    metric: str
    topk: int
    variant: dict[str, Any]  # n_ctx, ctx_init, csc, class_token_position
    classnames: tuple[str, ...]
    contexts: list[ContextReading]  # one (unified) or one per class (CSC)
    nearest_ids: torch.Tensor  # (n_ctx,) or (n_cls, n_ctx) int64: the nearest token of every context vector
    index_path: Path | None = None
    index_built: bool = True
    index_on_gpu: bool = False
    accuracy: ProjectionAccuracy | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights_id,
            "metric": self.metric,
            "distance": "euclidean" if self.metric == "l2" else "1 - cosine similarity",
            "topk": self.topk,
            "variant": dict(self.variant),
            "classnames": list(self.classnames),
            "index": {"path": None if self.index_path is None else str(self.index_path), "built": self.index_built, "gpu": self.index_on_gpu},
            "contexts": [
                {
                    "class": reading.classname,
                    "words": reading.words,
                    "prompt": reading.template,
                    "slots": [
                        {
                            "position": slot.position,
                            "init": None if slot.init_token is None else slot.init_token.to_dict(),
                            "init_distance": slot.init_distance,
                            "neighbours": [{"rank": n.rank, "distance": n.distance, **n.token.to_dict()} for n in slot.neighbours],
                        }
                        for slot in reading.slots
                    ],
                }
                for reading in self.contexts
            ],
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
        }

    def rows(self) -> Iterator[dict[str, Any]]:
        """One flat record per (context, slot, rank): the TSV rows."""
        for reading in self.contexts:
            for slot in reading.slots:
                for n in slot.neighbours:
                    yield {
                        "class": "" if reading.classname is None else reading.classname,
                        "position": slot.position,
                        "rank": n.rank,
                        "token_id": n.token.id,
                        "token": n.token.display,
                        "bpe": n.token.bpe,
                        "distance": n.distance,
                        "init_token": "" if slot.init_token is None else slot.init_token.display,
                        "init_distance": "" if slot.init_distance is None else slot.init_distance,
                    }


TSV_COLUMNS = ("class", "position", "rank", "token_id", "token", "bpe", "distance", "init_token", "init_distance")


def _tsv_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def format_tsv(interpretation: Interpretation) -> str:
    """The neighbours as tab-separated text with a header (tabs/newlines inside fields escaped)."""
    lines = ["\t".join(TSV_COLUMNS)]
    for row in interpretation.rows():
        lines.append("\t".join(_tsv_field(row[c]) for c in TSV_COLUMNS))
    return "\n".join(lines) + "\n"


def _init_tokens(learner: PromptLearner, clip: LoadedClip) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Ids (n_ctx,) and embeddings (n_ctx, width) of the init words, when the context was initialised from words."""
    if not learner.ctx_init:
        return None
    tower = resolve_text_tower(clip.model)
    tokens = torch.as_tensor(clip.tokenizer([learner.ctx_init]), dtype=torch.long)  # (1, L)
    ids = tokens[0, 1 : 1 + learner.n_ctx]  # (n_ctx,)
    with torch.no_grad():
        emb = tower.token_embedding(ids.to(tower.device)).float().cpu()  # (n_ctx, width)
    return ids, emb


def _distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise distance of (n, width) and (n, width) in float64: Euclidean or 1 - cosine."""
    a, b = a.double(), b.double()
    if metric == "l2":
        return (a - b).norm(dim=-1)
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _template(tokens: Sequence[Token], position: str) -> str:
    """The nearest-word prompt with the class placeholder where the learner puts the class token."""
    if position == "front":
        return f"{{classname}} {join_tokens(tokens)}."
    if position == "middle":
        half = len(tokens) // 2
        parts = [join_tokens(tokens[:half]), "{classname}", join_tokens(tokens[half:])]
        return " ".join(p for p in parts if p) + "."
    return f"{join_tokens(tokens)} {{classname}}.".lstrip()


def interpret_prompt(learner: PromptLearner, clip: LoadedClip, index: VocabIndex, *, topk: int = 5) -> Interpretation:
    """Read every context vector of ``learner`` (holding the learned ``ctx``) as its ``topk`` nearest tokens."""
    if index.model != clip.name or index.weights_id != clip.weights_id:
        raise ProvenanceMismatchError(
            f"vocabulary index is for {index.model} ({index.weights_id}) but the prompt belongs to {clip.name} "
            f"({clip.weights_id}); build the index from the prompt's own model"
        )
    ctx = learner.ctx.detach().float().cpu()  # (n_ctx, width) or (n_cls, n_ctx, width)
    if ctx.shape[-1] != index.width:
        raise ProvenanceMismatchError(f"context width {ctx.shape[-1]} does not match the vocabulary width {index.width}")
    contexts3 = ctx.unsqueeze(0) if ctx.ndim == 2 else ctx  # (n_contexts, n_ctx, width)
    n_contexts, n_ctx, width = contexts3.shape
    distances, ids = index.search(contexts3.reshape(-1, width), topk)  # (n_contexts * n_ctx, k)
    distances, ids = distances.reshape(n_contexts, n_ctx, topk), ids.reshape(n_contexts, n_ctx, topk)

    init = _init_tokens(learner, clip)
    decoded: dict[int, Token] = {}

    def token(i: int) -> Token:
        if i not in decoded:
            decoded[i] = decode_token(clip.tokenizer, i)
        return decoded[i]

    readings = []
    for c in range(n_contexts):
        init_dist = None if init is None else _distances(contexts3[c], init[1], index.metric).tolist()
        slots = tuple(
            ContextSlot(
                position=m + 1,
                neighbours=tuple(
                    Neighbour(rank=r + 1, token=token(int(ids[c, m, r])), distance=float(distances[c, m, r])) for r in range(topk)
                ),
                init_token=None if init is None else token(int(init[0][m])),
                init_distance=None if init_dist is None else float(init_dist[m]),
            )
            for m in range(n_ctx)
        )
        readings.append(
            ContextReading(
                classname=learner.classnames[c] if learner.csc else None,
                slots=slots,
                template=_template([s.nearest for s in slots], learner.class_token_position),
            )
        )
    nearest = torch.as_tensor(ids[..., 0], dtype=torch.long)  # (n_contexts, n_ctx)
    return Interpretation(
        model=clip.name,
        weights_id=clip.weights_id,
        metric=index.metric,
        topk=topk,
        variant={k: v for k, v in learner.config().items() if k != "classnames"},
        classnames=tuple(learner.classnames),
        contexts=readings,
        nearest_ids=nearest if learner.csc else nearest[0],
        index_path=index.path,
        index_built=index.built,
        index_on_gpu=index.on_gpu,
    )


# ---------------------------------------------------------------------------------------------- accuracy
def projected_context(nearest_ids: torch.Tensor, clip: LoadedClip) -> torch.Tensor:
    """The context with every vector replaced by its nearest token's embedding: ids (...) -> (..., width)."""
    tower = resolve_text_tower(clip.model)
    with torch.no_grad():
        return tower.token_embedding(nearest_ids.to(tower.device))


def nearest_prompt_tokens(learner: PromptLearner, nearest_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (n_cls, L) of the discrete prompts whose context slots hold ``nearest_ids``, in the learner's layout."""
    ids = nearest_ids.to(learner.tokenized_prompts.device)
    ctx_ids = ids.unsqueeze(0).expand(learner.n_cls, -1) if ids.ndim == 1 else ids  # (n_cls, n_ctx)
    tokens = learner.tokenized_prompts  # (n_cls, L): "[SOS] X..X name . [EOS]" (end layout)
    bank = torch.cat([tokens[:, :1], ctx_ids, tokens[:, 1 + learner.n_ctx :]], dim=1)  # (n_cls, L) end layout
    if learner.class_token_position == "end":
        return bank
    return torch.gather(bank, 1, learner.order)  # (n_cls, L)


def _accuracy(text_features: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> float:
    pred = coop_logits(features.to(text_features.device), text_features, logit_scale).argmax(dim=-1).cpu()  # (N,)
    return float((pred == labels).float().mean())


def evaluate_projection(
    interpretation: Interpretation,
    learner: PromptLearner,
    clip: LoadedClip,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    source: str | None = None,
    encoder: PromptTextEncoder | None = None,
) -> ProjectionAccuracy:
    """Test accuracy of the learned context and of its nearest-word projections on cached features.

    ``features``: raw image features (N, D) (view 0 of a test store); ``labels``: (N,) indices into
    ``learner.classnames``. The learner's ``ctx`` is restored afterwards.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != y.shape[0] or feats.shape[0] == 0:
        raise ParamsError(f"expected features (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(y.shape)}")
    if feats.shape[1] != clip.embed_dim:
        raise ProvenanceMismatchError(
            f"test features have dimension {feats.shape[1]} but {clip.name} embeds to {clip.embed_dim}: they come from another model"
        )
    if int(y.min()) < 0 or int(y.max()) >= learner.n_cls:
        raise ProvenanceMismatchError(f"test labels {int(y.min())}..{int(y.max())} do not fit {learner.n_cls} classes")
    encoder = encoder or PromptTextEncoder(clip)
    logit_scale = clip.model.logit_scale.detach()
    nearest = interpretation.nearest_ids
    saved = learner.ctx.detach().clone()
    try:
        with torch.no_grad():
            learned = _accuracy(encoder(learner), feats, y, logit_scale)
            learner.ctx.copy_(projected_context(nearest, clip).to(learner.ctx.dtype))  # same shape as ctx
            tokens_acc = _accuracy(encoder(learner), feats, y, logit_scale)
    finally:
        with torch.no_grad():
            learner.ctx.copy_(saved)
    if learner.csc:
        texts = [reading.prompt(name) for reading, name in zip(interpretation.contexts, learner.classnames)]
    else:
        texts = [interpretation.contexts[0].prompt(name) for name in learner.classnames]
    typed = torch.as_tensor(clip.tokenizer(texts), dtype=torch.long)  # (n_cls, L)
    with torch.no_grad():
        text_acc = _accuracy(encoder.encode_tokens(typed), feats, y, logit_scale)
    roundtrip = bool(torch.equal(typed.cpu(), nearest_prompt_tokens(learner, nearest).cpu()))
    return ProjectionAccuracy(
        n_images=int(y.shape[0]), learned=learned, nearest_tokens=tokens_acc, nearest_text=text_acc,
        text_roundtrip=roundtrip, source=source,
    )


# ---------------------------------------------------------------------------------------------- the table
def _cell(text: str, width: int) -> str:
    return text if len(text) >= width else text + " " * (width - len(text))


def format_table(interpretation: Interpretation, *, max_classes: int | None = None) -> str:
    """A readable terminal table: per context, one line per vector with its nearest tokens and distances."""
    it = interpretation
    distance = "Euclidean distance" if it.metric == "l2" else "cosine distance (1 - cos)"
    v = it.variant
    lines = [
        f"{it.model} ({it.weights_id}): nearest vocabulary tokens of each context vector, top {it.topk} by {distance}",
        f"context: n_ctx={v.get('n_ctx')}, {'class-specific' if v.get('csc') else 'unified'}, class token at the "
        f"{v.get('class_token_position')}, init {v.get('ctx_init')!r}" if v.get("ctx_init") else
        f"context: n_ctx={v.get('n_ctx')}, {'class-specific' if v.get('csc') else 'unified'}, class token at the "
        f"{v.get('class_token_position')}, random init",
    ]
    has_init = any(s.init_token is not None for r in it.contexts for s in r.slots)
    shown = it.contexts if max_classes is None else it.contexts[:max_classes]
    for reading in shown:
        lines.append("")
        if reading.classname is not None:
            lines.append(f"class {reading.classname!r}")
        cells = [[f"{n.token.display} {n.distance:.3f}" for n in s.neighbours] for s in reading.slots]
        widths = [max(len(row[r]) for row in cells) for r in range(it.topk)]
        init_w = max([len(s.init_token.display) for s in reading.slots if s.init_token is not None] + [4])
        header = "  pos  " + (_cell("init", init_w) + "  d(init)  " if has_init else "")
        header += "  ".join(_cell(f"#{r + 1}", widths[r]) for r in range(it.topk))
        lines.append(header.rstrip())
        for slot, row in zip(reading.slots, cells):
            line = f"  {slot.position:>3}  "
            if has_init:
                init_text = slot.init_token.display if slot.init_token is not None else "-"
                init_d = f"{slot.init_distance:.3f}" if slot.init_distance is not None else "-"
                line += _cell(init_text, init_w) + f"  {init_d:>7}  "
            line += "  ".join(_cell(c, widths[r]) for r, c in enumerate(row))
            lines.append(line.rstrip())
        lines.append(f"  nearest-word prompt: \"{reading.template}\"")
    if len(shown) < len(it.contexts):
        lines.append(f"\n... {len(it.contexts) - len(shown)} more classes (see the JSON/TSV output)")
    acc = it.accuracy
    if acc is not None:
        lines.append("")
        lines.append(
            f"test accuracy ({acc.n_images} images): learned prompt {100 * acc.learned:.2f}%, nearest-word prompt "
            f"{100 * acc.nearest_tokens:.2f}% ({100 * (acc.nearest_tokens - acc.learned):+.2f} pts)"
        )
        if not acc.text_roundtrip:
            lines.append(
                f"  the readable prompt text tokenises differently from the nearest tokens; as typed it scores "
                f"{100 * acc.nearest_text:.2f}%"
            )
    return "\n".join(lines)
