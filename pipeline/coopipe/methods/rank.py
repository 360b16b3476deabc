"""Rank prompts (OrdinalCLIP, Li et al., NeurIPS 2022): a unified context plus ``n_base_ranks`` learned base rank
embeddings, linearly interpolated to every rank (class); the loss adds OrdinalCLIP's rank-wise KL term.

Options: M (``n_ctx``) or init words (``ctx_init``), ``n_base_ranks``. Paper setting (``xk-huang/OrdinalCLIP:
configs/``): M = 16, 3 base ranks, 100 epochs at every number of shots. The optimiser stays CoOp's SGD and schedule
(the cache's protocol, so that methods compare at the same optimiser; OrdinalCLIP's own runs use Adam).
The learner is :class:`coopipe.rank_prompt.RankPromptLearner`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch

from coopipe.methods.context import PAPER_N_CTX, ContextMethod
from coopipe.methods.registry import epochs_for
from coopipe.models import LoadedClip
from coopipe.rank_prompt import RankPromptLearner

__all__ = ["RANK_BASE_RANKS", "RANK_EPOCHS", "RankOptions", "RankPrompts"]

RANK_BASE_RANKS = 3  # OrdinalCLIP's config
RANK_EPOCHS = 100  # OrdinalCLIP's configs, at every number of shots


@dataclasses.dataclass(frozen=True)
class RankOptions:
    n_ctx: int | None = PAPER_N_CTX
    ctx_init: str | None = None
    n_base_ranks: int = RANK_BASE_RANKS


class RankPrompts(ContextMethod):
    name = "rank"
    title = "Rank prompts (OrdinalCLIP)"
    options = RankOptions
    stackable = True
    ordered_labels = True  # rank embeddings are interpolated between neighbouring classes

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return RANK_EPOCHS

    def check(self, options: RankOptions) -> list[str]:
        problems = super().check(options)
        n = options.n_base_ranks
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            problems.append(f"n_base_ranks must be an integer >= 2 (got {n!r})")
        return problems

    def transferable(self, options: RankOptions) -> bool:
        return False  # the learned rank embeddings are the classes

    def transfer_refusal(self, options: RankOptions) -> str:
        return "its learned rank embeddings are its training classes"

    def label_parts(self, options: RankOptions) -> list[str]:
        bases = [f"b{options.n_base_ranks}"] if options.n_base_ranks != RANK_BASE_RANKS else []
        return super().label_parts(options) + bases

    def parse_part(self, part: str) -> dict[str, Any]:
        if re.fullmatch(r"b[1-9][0-9]*", part):
            return {"n_base_ranks": int(part[1:])}
        return super().parse_part(part)

    def readable_parts(self, options: RankOptions) -> list[str]:
        bases = [f"{options.n_base_ranks} base ranks"] if options.n_base_ranks != RANK_BASE_RANKS else []
        return super().readable_parts(options) + bases

    def build_learner(self, options: RankOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> RankPromptLearner:
        return RankPromptLearner(clip, len(classnames), n_ctx=options.n_ctx or PAPER_N_CTX, ctx_init=options.ctx_init,
                                 n_base_ranks=options.n_base_ranks, generator=generator)
