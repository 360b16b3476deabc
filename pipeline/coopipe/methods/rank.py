"""Rank prompts (OrdinalCLIP, Li et al., NeurIPS 2022): a unified context plus ``n_base_ranks`` learned base rank
embeddings, linearly interpolated to every rank (class); the loss adds OrdinalCLIP's rank-wise KL term.

Options: M (``n_ctx``) or init words (``ctx_init``), ``n_base_ranks``. Paper setting, OrdinalCLIP's MORPH run
(``xk-huang/OrdinalCLIP: configs/meta_cfgs/morph_compare.yaml`` and the files it includes, on
``configs/default.yaml``): the context from "age estimation: the age of the person is" (``init-context-morph``),
3 base ranks with linear interpolation, one token per rank; cross-entropy + KL with weights 1 and 1
(``loss_weights``); RAdam, lr 1e-4 for context and ranks, weight decay 5e-4, cosine decay over 100 epochs with
no warm-up (``warmup_epoch: 0``), batch 32, at every number of shots. :class:`OrdinalCLIPSetting` holds that
training setting, which OrdinalCLIP's CoOp row (:mod:`coopipe.methods.ordinal_coop`) shares.
The learner is :class:`coopipe.rank_prompt.RankPromptLearner`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from coopipe.methods.context import PAPER_N_CTX, ContextMethod
from coopipe.methods.registry import Optimization, epochs_for
from coopipe.models import LoadedClip
from coopipe.rank_prompt import RankPromptLearner

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ORDINALCLIP_INIT", "RANK_BASE_RANKS", "RANK_EPOCHS", "OrdinalCLIPSetting", "RankOptions", "RankPrompts"]

ORDINALCLIP_INIT = "age estimation: the age of the person is"  # init-context-morph: 10 tokens
RANK_BASE_RANKS = 3  # num-base-rank-3, rank-interp-linear
RANK_EPOCHS = 100  # lr_decay_cosine_max_epochs_100, at every number of shots
ORDINALCLIP_TRAINING = {"lr": 1e-4, "weight_decay": 5e-4, "warmup_epoch": 0}  # radam, tune-ctx-rank, weight_decay_5e-4


class OrdinalCLIPSetting(ContextMethod):
    """OrdinalCLIP's training setting: 100 epochs at every number of shots, RAdam (lr 1e-4, weight decay 5e-4,
    cosine, no warm-up); the labels must be ranks; the learned rank (name) embeddings are the classes, so the
    prompt does not transfer to other class names.

    RAdam as OrdinalCLIP's optimiser builder gives it (Dassl's, after Liu et al.): weight decay decoupled from
    the gradient and scaled by the lr, plain momentum steps while the variance is not yet tractable; torch's
    ``RAdam(decoupled_weight_decay=True)`` is that update.
    """

    ordered_labels = True  # rank embeddings are interpolated between neighbouring classes; the KL term pairs ranks

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return RANK_EPOCHS

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), **ORDINALCLIP_TRAINING}

    def optimizer(self, params: Mapping[str, nn.Parameter], opt: Optimization) -> torch.optim.Optimizer:
        return torch.optim.RAdam(list(params.values()), lr=opt.lr, weight_decay=opt.weight_decay,
                                 decoupled_weight_decay=True)

    def transferable(self, options: Any) -> bool:
        return False  # the learned rank embeddings are the classes

    def transfer_refusal(self, options: Any) -> str:
        return "its learned rank embeddings are its training classes"


@dataclasses.dataclass(frozen=True)
class RankOptions:
    n_ctx: int | None = None  # M: the init words' tokens
    ctx_init: str | None = ORDINALCLIP_INIT
    n_base_ranks: int = RANK_BASE_RANKS


class RankPrompts(OrdinalCLIPSetting):
    name = "rank"
    title = "Rank prompts (OrdinalCLIP)"
    paper = ("OrdinalCLIP (Li et al., OrdinalCLIP: Learning Rank Prompts for Language-Guided Ordinal Regression, "
             "NeurIPS 2022)")
    options = RankOptions
    stackable = True

    def check(self, options: RankOptions) -> list[str]:
        problems = super().check(options)
        n = options.n_base_ranks
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            problems.append(f"n_base_ranks must be an integer >= 2 (got {n!r})")
        return problems

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
