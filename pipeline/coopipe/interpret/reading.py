"""Read a learned context as words: the nearest vocabulary tokens of every context vector (CoOp's reading).

Class-specific context (CSC) is read per class, unified context once. Each reading also yields the
*nearest-word prompt*, every context vector replaced by its nearest token, as a template with the class
placeholder where the learner puts the class token (its accuracy: :mod:`coopipe.interpret.projection`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coopipe.errors import ProvenanceMismatchError
from coopipe.interpret.tokens import Token, decode_token, join_tokens
from coopipe.interpret.vocab_index import VocabIndex
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_tower import resolve_text_tower


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
    # the same, one token per slot: a word piece keeps its continuation mark ("phoenix… kline ... {classname}.")
    tokens_template: str = ""

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
                    "prompt_tokens": reading.tokens_template,
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


def _template(tokens: Sequence[Token], position: str,
              join: Callable[[Sequence[Token]], str] = join_tokens) -> str:
    """The nearest-word prompt with the class placeholder where the learner puts the class token (``join``: as
    the tokenizer decodes the tokens, word pieces glued; or :func:`spaced_tokens`, one token per slot)."""
    if position == "front":
        return f"{{classname}} {join(tokens)}."
    if position == "middle":
        half = len(tokens) // 2
        parts = [join(tokens[:half]), "{classname}", join(tokens[half:])]
        return " ".join(p for p in parts if p) + "."
    return f"{join(tokens)} {{classname}}.".lstrip()


def spaced_tokens(tokens: Sequence[Token]) -> str:
    """One readable token per slot, separated by spaces; a word piece carries its continuation mark (``…``)."""
    return " ".join(t.display for t in tokens)


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
                tokens_template=_template([s.nearest for s in slots], learner.class_token_position, spaced_tokens),
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
