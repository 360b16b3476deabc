"""OrdinalCLIP's CoOp row: CoOp's unified context with each rank's name tokens learned too, trained with OrdinalCLIP's
objective (cross-entropy + KL) and setting.

Why a method of its own: the CoOp baseline OrdinalCLIP compares against is not CoOp's paper setting. Its MORPH
config (``xk-huang/OrdinalCLIP: configs/meta_cfgs/morph_compare.yaml``, entry ``coop``) builds a
``PlainPromptLearner`` with the context from "age estimation: the age of the person is" and the rank names
initialised from their words (``init-rank-morph``: the class names), learns both (``tune-ctx-rank``), with the
runner's loss (cross-entropy + KL, weights 1 and 1) and the rank prompts' training setting (RAdam lr 1e-4, weight
decay 5e-4, cosine over 100 epochs, no warm-up; :class:`coopipe.methods.rank.OrdinalCLIPSetting`). CoOp with the
age words and frozen names (``coop_init-age-estimation:-the-age-of-the-person-is``, CoOp's SGD and cross-entropy)
stays available under its own label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from coopipe.methods.coop import CoOpLearner
from coopipe.methods.context import PAPER_N_CTX
from coopipe.methods.rank import ORDINALCLIP_INIT, OrdinalCLIPSetting
from coopipe.models import LoadedClip
from coopipe.ordinal import rank_loss

if TYPE_CHECKING:
    from coopipe.learners import StepInputs

__all__ = ["OrdinalCoOp", "OrdinalCoOpLearner", "OrdinalCoOpOptions"]


@dataclasses.dataclass(frozen=True)
class OrdinalCoOpOptions:
    n_ctx: int | None = None  # M: the init words' tokens
    ctx_init: str | None = ORDINALCLIP_INIT


class OrdinalCoOpLearner(CoOpLearner):
    """CoOp's learner with learned name embeddings (``ctx`` and ``name_embeds``) and OrdinalCLIP's loss."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        """OrdinalCLIP's objective: cross-entropy + rank-wise KL, weights 1 and 1."""
        return rank_loss(logits, labels)


class OrdinalCoOp(OrdinalCLIPSetting):
    name = "ordcoop"
    title = "CoOp (OrdinalCLIP's row: learned rank names, CE + KL)"
    paper = ("CoOp as OrdinalCLIP compares against it (Li et al., OrdinalCLIP: Learning Rank Prompts for "
             "Language-Guided Ordinal Regression, NeurIPS 2022)")
    options = OrdinalCoOpOptions
    stackable = True

    def build_learner(self, options: OrdinalCoOpOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> OrdinalCoOpLearner:
        return OrdinalCoOpLearner(clip, classnames, n_ctx=options.n_ctx or PAPER_N_CTX, ctx_init=options.ctx_init,
                                  learn_names=True, generator=generator)
