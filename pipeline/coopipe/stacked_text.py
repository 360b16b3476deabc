"""One text pass for R image-independent learners at once: the R x K prompts of stacked runs through the tower.

Why: runs that share a model, class list and prompt variant (they differ in seed or shots) each need one K-class
text pass per step; at K = 10 a pass is too small to fill a GPU (or all cores), so stacking the R runs' prompts on
a leading axis runs every GEMM once over R x the rows. The runs stay independent: every layer acts row-wise
(LayerNorm, projections, MLP) or within one sequence (attention, per (run, bin)), so run r's features depend on
run r's parameters only, and the gradient of a sum of per-run losses with respect to run r's parameters is run
r's own gradient (up to float rounding of the larger GEMMs; the exactness tests bound it).

Each run is one group of the text path (:meth:`coopipe.text_encoder.PromptTextEncoder.encode_prompts`): its own
prefix and its own class rows (class-specific or middle/front context, rank embeddings), in the layout every run
shares (same class list and variant). Only learners with prompts (:class:`coopipe.learners.PromptedLearner`) stack.
One learner takes the learner's own path, so a run alone computes exactly what it always did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from coopipe.errors import ParamsError
from coopipe.learners import Learner, PromptedLearner, is_image_conditional
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = ["check_stackable", "stacked_text_features"]


def _prompted(learner: Learner) -> PromptedLearner:
    """``learner`` as a learner with prompts, or :class:`ParamsError` (a feature-space learner has no text pass)."""
    if not isinstance(learner, PromptedLearner):
        raise ParamsError(f"{type(learner).__name__} has no prompts for the text tower (a feature-space method): its "
                          f"runs cannot share a text pass; train them unstacked (max_stack=1, or sweep --stack off)")
    return learner


def check_stackable(learners: Sequence[Learner]) -> None:
    """Raise :class:`ParamsError` unless the learners can share one text pass (same layout, image-independent)."""
    for learner in learners:
        if is_image_conditional(learner):
            raise ParamsError(
                f"{type(learner).__name__} is image-conditional (CoCoOp): its prompts need a text pass per image, "
                f"so its runs cannot share a text pass; train them unstacked (max_stack=1, or sweep --stack off)"
            )
    if len(learners) == 1:
        return
    first = _prompted(learners[0])
    for learner in map(_prompted, learners):
        same = (type(learner) is type(first) and learner.config() == first.config()
                and torch.equal(learner.eos_index, first.eos_index))
        if not same:
            raise ParamsError(
                f"runs stacked in one text pass need the same learner, class list and variant; got "
                f"{first.config()} and {learner.config()}: stack them in separate groups"
            )


def stacked_text_features(encoder: PromptTextEncoder, learners: Sequence[Learner]) -> list[torch.Tensor]:
    """Normalised class text features (K, D) of each learner, from one text pass; differentiable in each learner.

    ``learners`` must pass :func:`check_stackable` (the caller checks once, not every step).
    """
    if len(learners) == 1:
        return [learners[0].class_text_features(encoder)]
    return list(encoder.encode_prompts([_prompted(learner) for learner in learners]).unbind(0))  # R x (K, embed_dim)
