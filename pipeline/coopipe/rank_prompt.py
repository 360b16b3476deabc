"""OrdinalCLIP's rank prompts: a learned context plus a few learned base rank embeddings interpolated to every rank.

Why (Li et al., NeurIPS 2022, ``ordinalclip/models/prompt_leaners/rank_prompt_learner.py``): ages are ordered,
so instead of one free word per age the prompt of rank r is ``[SOS] [V]1..[V]M [R_r] . [EOS]`` where the rank
embedding ``R_r = sum_b w[r, b] * B_b`` mixes ``n_base_ranks`` learned base embeddings ``B_b`` (N(0, 0.02) init,
one token per rank as its config). The weights are the reference's "linear" interpolation: base b sits at rank
``c_b = linspace(0, K - 1, n_base)[b]``, ``w[r, b] = 1 - |r - c_b| / (K - 1)``, normalised over b. The context is
unified (one for all ranks), random N(0, 0.02) of ``n_ctx`` tokens or initialised from words.

The classifier does not depend on the image, so one text pass per step serves the whole batch. The learner
declares what the text path reads (:class:`coopipe.text_encoder.PromptRows`: the prefix shared by every rank, the
packed rows per rank), so the exact packed text path runs it as it runs CoOp's: every rank prompt has the same
length, and only the last three rows (rank token, '.', [EOS]) differ between ranks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.ordinal import rank_loss
from coopipe.prompt import CTX_INIT_STD, _tokenize
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.text_tower import resolve_text_tower

if TYPE_CHECKING:
    from coopipe.learners import StepInputs

logger = logging.getLogger(__name__)

__all__ = ["RankPromptLearner", "interpolation_weights"]

RANK_INIT_STD = 0.02  # OrdinalCLIP: nn.init.normal_(rank_embeds, std=0.02)
_PLACEHOLDER = "X"


def interpolation_weights(n_ranks: int, n_base: int) -> torch.Tensor:
    """OrdinalCLIP's linear interpolation weights (n_ranks, n_base), float64, each row summing to 1."""
    if n_ranks < 2 or n_base < 2:
        raise ParamsError(f"rank prompts need >= 2 ranks and >= 2 base ranks (got {n_ranks}, {n_base})")
    ranks = torch.arange(n_ranks, dtype=torch.float64).unsqueeze(1)  # (K, 1)
    centres = torch.linspace(0, n_ranks - 1, n_base, dtype=torch.float64).unsqueeze(0)  # (1, n_base)
    weights = 1.0 - (ranks - centres).abs() / (n_ranks - 1)  # (K, n_base)
    return weights / weights.sum(dim=1, keepdim=True)


class RankPromptLearner(nn.Module):
    """Unified context ``ctx`` (n_ctx, width) and base rank embeddings ``rank_embeds`` (n_base, width).

    ``logits``/``class_text_features``/``loss`` are the method seam's learner interface; the other members are the
    text path's :class:`~coopipe.text_encoder.PromptRows` (``shared_length``, ``packed_embeddings``, ...).
    """

    image_conditional = False
    token_prefix: torch.Tensor
    token_tail: torch.Tensor
    weights: torch.Tensor
    eos_index: torch.Tensor

    def __init__(
        self,
        clip: LoadedClip,
        n_ranks: int,
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        n_base_ranks: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tower = resolve_text_tower(clip.model)
        length = tower.context_length
        embedding = tower.token_embedding
        weight = embedding.weight  # (vocab, width)
        if ctx_init is not None and ctx_init.strip():
            prefix_words = " ".join(ctx_init.replace("_", " ").split())
            init_tokens = _tokenize(clip.tokenizer, [prefix_words], length)  # (1, L)
            n_ctx = int(tower.eos_positions(init_tokens)[0]) - 1
            if n_ctx < 1:
                raise ParamsError(f"ctx_init {ctx_init!r} gives no tokens; give words or leave it out")
            with torch.no_grad():
                ctx = embedding(init_tokens.to(weight.device))[0, 1 : 1 + n_ctx].float().cpu().clone()  # (M, width)
        else:
            if n_ctx < 1:
                raise ParamsError(f"n_ctx must be >= 1, got {n_ctx}")
            prefix_words = " ".join([_PLACEHOLDER] * n_ctx)
            ctx = torch.empty(n_ctx, tower.width).normal_(0.0, CTX_INIT_STD, generator=generator)  # (M, width)
        base = torch.empty(n_base_ranks, tower.width).normal_(0.0, RANK_INIT_STD, generator=generator)  # (n_base, w)
        self.ctx = nn.Parameter(ctx.to(device=weight.device, dtype=weight.dtype))
        self.rank_embeds = nn.Parameter(base.to(device=weight.device, dtype=weight.dtype))

        tokens = _tokenize(clip.tokenizer, [f"{prefix_words} {_PLACEHOLDER}."], length)  # (1, L)
        eos = int(tower.eos_positions(tokens)[0])
        if eos != n_ctx + 3:  # [SOS] ctx rank '.' [EOS]
            raise ParamsError(f"rank prompt tokenises to [EOS] at {eos}, expected {n_ctx + 3}; use other ctx_init words")
        with torch.no_grad():
            embeds = embedding(tokens.to(weight.device))  # (1, L, width)
        self.register_buffer("token_prefix", embeds[:, :1].clone(), persistent=False)  # (1, 1, width) [SOS]
        self.register_buffer("token_tail", embeds[:, n_ctx + 2 :].clone(), persistent=False)  # (1, L-M-2, w) '.' ...
        self.register_buffer(
            "weights", interpolation_weights(n_ranks, n_base_ranks).to(device=weight.device, dtype=weight.dtype),
            persistent=False,
        )  # (K, n_base)
        self.register_buffer(
            "eos_index", torch.full((n_ranks,), eos, dtype=torch.long, device=weight.device), persistent=False
        )  # (K,)
        self.n_cls = n_ranks
        self.n_ctx = n_ctx
        self.n_base_ranks = n_base_ranks
        self.ctx_init = prefix_words if ctx_init is not None else None
        self.context_length = length
        logger.debug("rank prompt learner: %d ranks, n_ctx=%d, %d base ranks, init=%s", n_ranks, n_ctx,
                     n_base_ranks, self.ctx_init or "random")

    # ---------------------------------------------------------------- prompts
    def rank_embeddings(self, classes: slice = slice(None)) -> torch.Tensor:
        """The interpolated rank token embeddings of ``classes``: (n, width)."""
        return self.weights[classes] @ self.rank_embeds  # (n, width)

    @property
    def shared_length(self) -> int:
        """[SOS] and the context: the positions every rank prompt shares."""
        return 1 + self.n_ctx

    def prompt_embeddings(self, classes: slice = slice(None), *, length: int | None = None) -> torch.Tensor:
        """Prompt token embeddings (no positional embedding) of ``classes``: (n, length or L, width)."""
        length = self.context_length if length is None else length
        ranks = self.rank_embeddings(classes).unsqueeze(1)  # (n, 1, width)
        n = ranks.shape[0]
        parts = [
            self.token_prefix.expand(n, -1, -1),  # (n, 1, width)
            self.ctx.unsqueeze(0).expand(n, -1, -1),  # (n, M, width)
            ranks,
            self.token_tail.expand(n, -1, -1),  # (n, L - M - 2, width)
        ]
        return torch.cat(parts, dim=1)[:, :length]  # (n, length, width)

    def shared_prefix_embeddings(self) -> torch.Tensor:
        """(1, 1 + M, width): [SOS] and the context."""
        return torch.cat([self.token_prefix, self.ctx.unsqueeze(0)], dim=1)

    def packed_embeddings(self, classes: slice, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions ``start .. eos`` of every rank of ``classes``, packed rank after rank (see ``PromptLearner``).

        Returns the rows (N, width), each row's position in its prompt (N,), and the rows per rank (n,).
        """
        if not 1 <= start <= self.shared_length:
            raise ParamsError(f"packing must start after [SOS] and within the shared prefix, got start={start}")
        eos = int(self.eos_index[0])
        rows = self.prompt_embeddings(classes, length=eos + 1)[:, start:]  # (n, T, width)
        n, count, width = rows.shape
        positions = torch.arange(start, eos + 1, device=rows.device).repeat(n)  # (N,)
        lengths = torch.full((n,), count, dtype=torch.long, device=rows.device)  # (n,)
        return rows.reshape(n * count, width), positions, lengths

    # ---------------------------------------------------------------- the method seam
    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        """L2-normalised text features of every rank: (K, D), differentiable in ctx and the base ranks."""
        return encoder(self)

    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        """CLIP logits of raw image features (B, D) against every rank: (B, K)."""
        return coop_logits(image_features, self.class_text_features(encoder), logit_scale)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        """OrdinalCLIP's objective: cross-entropy + rank-wise KL, weights 1 and 1."""
        return rank_loss(logits, labels)

    def config(self) -> dict[str, Any]:
        """What is needed (with the same model) to rebuild this learner before loading its ``state_dict``."""
        return {"n_ranks": self.n_cls, "n_ctx": self.n_ctx, "ctx_init": self.ctx_init,
                "n_base_ranks": self.n_base_ranks}

    def extra_repr(self) -> str:
        return f"n_ranks={self.n_cls}, n_ctx={self.n_ctx}, n_base_ranks={self.n_base_ranks}, ctx_init={self.ctx_init!r}"

