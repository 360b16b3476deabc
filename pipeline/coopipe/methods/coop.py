"""CoOp (Zhou et al., IJCV 2022): a learned context before (or around) the class name, through the frozen text tower.

Options: M context tokens (``n_ctx``; random N(0, 0.02) init) or init words (``ctx_init``; M = their tokens),
unified or class-specific (``csc``), class token at the ``end``, ``middle`` or ``front``. Paper setting: M = 16,
random init, unified, class token at the end; SGD lr 0.002 (momentum 0.9, weight decay 5e-4), batch 32, one
warm-up epoch at 1e-5 then cosine; 50/100/100/200/200 epochs by shots (ImageNet 50)
(``KaiyangZhou/CoOp: configs/trainers/CoOp/rn50_ep*.yaml``, ``scripts/coop/main.sh``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from coopipe.learners import ClassifierLearner
from coopipe.methods.context import PAPER_N_CTX, ContextMethod
from coopipe.methods.rank import ORDINALCLIP_INIT
from coopipe.models import LoadedClip
from coopipe.prompt import CLASS_TOKEN_POSITIONS, PromptLearner
from coopipe.text_encoder import PromptTextEncoder

__all__ = ["NAMED_INITS", "CoOp", "CoOpLearner", "CoOpOptions"]

# CoOp rows of other papers' tables, told apart in the report: CoCoOp's base-to-new table used CoOp's
# vit_b16_ctxv1 config (M = 4 from "a photo of a"); CoOp from OrdinalCLIP's words keeps the rank names frozen and
# trains with cross-entropy, unlike OrdinalCLIP's own CoOp row (the ``ordcoop`` method).
NAMED_INITS = {"a photo of a": "ctxv1, CoCoOp's base-to-new row", ORDINALCLIP_INIT: "rank names frozen, cross-entropy"}


@dataclasses.dataclass(frozen=True)
class CoOpOptions:
    n_ctx: int | None = PAPER_N_CTX
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"


class CoOpLearner(ClassifierLearner, PromptLearner):
    """CoOp's :class:`PromptLearner` with the learner interface (one classifier for every image)."""

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        """Normalised class text features (K, D), differentiable in ``ctx``."""
        return encoder(self)


class CoOp(ContextMethod):
    name = "coop"
    title = "CoOp"
    paper = "CoOp (Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022)"
    options = CoOpOptions
    stackable = True

    def check(self, options: CoOpOptions) -> list[str]:
        problems = super().check(options)
        if options.class_token_position not in CLASS_TOKEN_POSITIONS:
            problems.append(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS} "
                            f"(got {options.class_token_position!r})")
        if not isinstance(options.csc, bool):
            problems.append(f"csc must be true or false (got {options.csc!r})")
        return problems

    def transferable(self, options: CoOpOptions) -> bool:
        return not options.csc  # a class-specific context belongs to its classes

    def transfer_refusal(self, options: CoOpOptions) -> str:
        return "a class-specific context (CSC) belongs to its training classes: drop --csc for a unified context"

    def label_parts(self, options: CoOpOptions) -> list[str]:
        return self._layout(options) + super().label_parts(options)

    def parse_part(self, part: str) -> dict[str, Any]:
        if part == "csc":
            return {"csc": True}
        if part in CLASS_TOKEN_POSITIONS:
            return {"class_token_position": part}
        return super().parse_part(part)

    def readable_parts(self, options: CoOpOptions) -> list[str]:
        parts = [p.upper() if p == "csc" else p for p in self._layout(options)] + super().readable_parts(options)
        known = NAMED_INITS.get(options.ctx_init or "") if not self._layout(options) else None
        return parts + ([known] if known else [])

    @staticmethod
    def _layout(options: CoOpOptions) -> list[str]:
        parts = ["csc"] if options.csc else []
        return parts + ([options.class_token_position] if options.class_token_position != "end" else [])

    def build_learner(self, options: CoOpOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> CoOpLearner:
        return CoOpLearner(clip, classnames, n_ctx=options.n_ctx or PAPER_N_CTX, ctx_init=options.ctx_init,
                           csc=options.csc, class_token_position=options.class_token_position, generator=generator)
