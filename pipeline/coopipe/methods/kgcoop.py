"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a penalty keeping the learned class text features near the hand-crafted
prompt's ("knowledge-guided context optimisation").

Loss: ``CE(logits, y) + W * (1 - mean_k cos(t_k, t0_k))``, ``t_k`` the learned prompt's normalised class text
features of this step, ``t0_k`` the hand-crafted prompt's (the dataset's template, e.g. ``a centered satellite photo
of {}.`` for EuroSAT), cosine with eps 1e-7, mean over the K classes (``htyao89/KgCoOp: trainers/kgcoop.py``,
``CustomCLIP.forward`` and ``KgCoOp.forward_backward``; its ``CUSTOM_TEMPLATES`` are CoOp's, which is what a coopipe
dataset's template is, but for DTD: "a photo of a {}, a type of texture." there, CoOp's "{} texture." here, a
departure). The penalty needs only the training classes, so a learned prompt transfers to new classes
(base-to-new) as CoOp's does. The ``t0_k`` are computed once per run in :meth:`KgCoOp.prepare` (see
:mod:`coopipe.methods.anchor`), in the text tower's precision (the reference's copy of CLIP for them is fp16).

Paper setting: context initialised from ``a photo of a`` (M = 4 tokens, ``trainers/kgcoop.py`` uses those words
whenever ``CTX_INIT`` is set; ``scripts/base2new_train.sh``: ``N_CTX 4``), unified, class token at the end, W = 8.0
(``scripts/base2new_train.sh``, ``scripts/run.sh``); SGD lr 0.002 (Dassl's momentum 0.9, weight decay 5e-4), batch
128, 100 epochs, one warm-up epoch at 1e-5 then cosine (``configs/trainers/KgCoOp/rn50_ep100.yaml``,
``vit_b16_ep100_ctxv1.yaml``: the repository's only schedules, used here at every number of shots).

Options beyond CoOp's: ``kg_weight`` (W; label part ``w<W>``, e.g. ``kgcoop_w2``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from coopipe.learners import FitData, Learner, StepInputs
from coopipe.methods.anchor import AnchoredLearner, zero_shot_anchor
from coopipe.methods.context import PAPER_N_CTX
from coopipe.methods.coop import CoOp, CoOpLearner
from coopipe.models import LoadedClip

__all__ = ["KgCoOp", "KgCoOpLearner", "KgCoOpOptions", "knowledge_gap"]

PAPER_WEIGHT = 8.0
PAPER_INIT = "a photo of a"
PAPER_EPOCHS = 100
COS_EPS = 1e-7  # the reference's CosineSimilarity eps


@dataclasses.dataclass(frozen=True)
class KgCoOpOptions:
    n_ctx: int | None = None  # None: the init words' token count
    ctx_init: str | None = PAPER_INIT
    csc: bool = False
    class_token_position: str = "end"
    kg_weight: float = PAPER_WEIGHT  # W, the penalty's weight


def knowledge_gap(text: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``1 - mean_k cos(text_k, anchor_k)`` of class text features (K, D) and the hand-crafted ones (K, D)."""
    dtype = torch.promote_types(text.dtype, torch.float32)
    return 1.0 - F.cosine_similarity(text.to(dtype), anchor.to(text.device, dtype), dim=-1, eps=COS_EPS).mean()


class KgCoOpLearner(AnchoredLearner, CoOpLearner):
    """CoOp's learner whose loss adds W times the knowledge gap to the hand-crafted prompt's features."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], *, weight: float, **prompt: Any) -> None:
        super().__init__(clip, classnames, **prompt)
        self.weight = weight

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        if step is None or step.text is None:
            raise ValueError("KgCoOp's loss needs the step's class text features (StepInputs.text)")
        return F.cross_entropy(logits, labels) + self.weight * knowledge_gap(step.text, self.anchor)

    def config(self) -> dict[str, Any]:
        return {"method": "kgcoop", **super().config()}  # W is in the run's method record (variants hold no floats)


class KgCoOp(CoOp):
    name = "kgcoop"
    title = "KgCoOp"
    paper = ("KgCoOp (Yao et al., Visual-Language Prompt Tuning with Knowledge-guided Context Optimization, "
             "CVPR 2023)")
    options = KgCoOpOptions  # type: ignore[assignment]  # CoOp's options and W
    stackable = True  # each run's penalty reads its own text features; the summed loss gives each its gradient
    batch_size = 128

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        return PAPER_EPOCHS

    def check(self, options: Any) -> list[str]:
        problems = super().check(options)
        w = options.kg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            problems.append(f"kg_weight must be a finite number >= 0 (got {w!r})")
        return problems

    def normalize(self, options: Any) -> Any:
        options = super().normalize(options)
        w = options.kg_weight
        return options if isinstance(w, bool) or not isinstance(w, int) else dataclasses.replace(options, kg_weight=float(w))

    def label_parts(self, options: Any) -> list[str]:
        return super().label_parts(options) + ([f"w{options.kg_weight:g}"] if options.kg_weight != PAPER_WEIGHT else [])

    def parse_part(self, part: str) -> dict[str, Any]:
        if re.fullmatch(r"w[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?", part):
            return {"kg_weight": float(part[1:])}
        return super().parse_part(part)

    def readable_parts(self, options: Any) -> list[str]:
        return super().readable_parts(options) + ([f"W={options.kg_weight:g}"] if options.kg_weight != PAPER_WEIGHT else [])

    def prepare(self, learner: Learner, data: FitData) -> None:
        assert isinstance(learner, KgCoOpLearner)
        learner.set_anchor(zero_shot_anchor(data, learner.ctx.device))

    def build_learner(self, options: Any, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> KgCoOpLearner:
        return KgCoOpLearner(clip, classnames, weight=options.kg_weight, n_ctx=options.n_ctx or PAPER_N_CTX,
                             ctx_init=options.ctx_init, csc=options.csc,
                             class_token_position=options.class_token_position, generator=generator)
