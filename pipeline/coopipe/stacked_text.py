"""One text pass for R image-independent learners at once: the R x K prompts of stacked runs through the tower.

Why: runs that share a model, class list and prompt variant (they differ in seed or shots) each need one K-class
text pass per step; at K = 10 a pass is too small to fill a GPU (or all cores), so stacking the R runs' prompts on
a leading axis runs every GEMM once over R x the rows. The runs stay independent: every layer acts row-wise
(LayerNorm, projections, MLP) or within one sequence (attention, per (run, bin)), so run r's features depend on
run r's parameters only, and the gradient of a sum of per-run losses with respect to run r's parameters is run
r's own gradient (up to float rounding of the larger GEMMs; the stacked tests bound it).

The packed path reuses CoCoOp's batched blocks (:mod:`coopipe.cocoop_text`): there b images share one class-row
layout with their own prefixes; here R runs share the layout (same class list and variant, so the same
:class:`~coopipe.text_encoder._Packing`) with their own prefixes AND their own class rows (class-specific or
middle/front context, rank embeddings). Other towers (or ``share_prefix=False``) take the plain path: the R x K
prompts cut at the longest [EOS] through open_clip's own transformer. One learner takes the learner's own path,
so a run alone computes exactly what it always did.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from coopipe import text_encoder
from coopipe.cocoop_text import _forward_packed
from coopipe.errors import ParamsError
from coopipe.learners import Learner, is_image_conditional
from coopipe.text_encoder import PromptTextEncoder, _chunks, _Packing

logger = logging.getLogger(__name__)

__all__ = ["check_stackable", "stacked_text_features"]


def check_stackable(learners: Sequence[Learner]) -> None:
    """Raise :class:`ParamsError` unless the learners can share one text pass (same layout, image-independent)."""
    first = learners[0]
    for learner in learners:
        if is_image_conditional(learner):
            raise ParamsError(
                f"{type(learner).__name__} is image-conditional (CoCoOp): its prompts need a text pass per image, "
                f"so its runs cannot share a text pass; train them unstacked (max_stack=1, or sweep --stack off)"
            )
        same = (type(learner) is type(first) and learner.config() == first.config()
                and torch.equal(learner.eos_index, first.eos_index))  # type: ignore[attr-defined]
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
    first = learners[0]
    stack, dtype = len(learners), encoder.tower.dtype
    outputs = []
    with encoder._autocast():
        if encoder.share_prefix and encoder._manual_blocks:
            n_prefix = first.shared_length  # type: ignore[attr-defined]
            prefix = torch.stack([l.shared_prefix_embeddings()[0] for l in learners]).to(dtype)  # type: ignore[attr-defined]  # (R, P, width)
            for classes in _chunks(first.n_cls, encoder.class_chunk):
                packed = [l.packed_embeddings(classes, n_prefix) for l in learners]  # type: ignore[attr-defined]
                _, positions, lengths = packed[0]  # the same layout for every run
                suffix = torch.stack([rows for rows, _, _ in packed]).to(dtype)  # (R, N_s, width)
                packing = _Packing.build(n_prefix, positions, lengths, text_encoder.BIN_ROWS)
                forward = functools.partial(_forward_packed, encoder, packing)
                outputs.append(encoder._run_chunk(forward, prefix, suffix))  # (R, n, embed_dim)
        else:
            for classes in _chunks(first.n_cls, encoder.class_chunk):
                eos = first.eos_index[classes]  # type: ignore[attr-defined]  # (n,)
                length = int(eos.max()) + 1 if encoder.cut else first.context_length  # type: ignore[attr-defined]
                x = torch.cat([l.prompt_embeddings(classes, length=length) for l in learners]).to(dtype)  # type: ignore[attr-defined]  # (R * n, T, width)
                feats = encoder._run_chunk(functools.partial(encoder._forward_full, eos=eos.repeat(stack)), x)
                outputs.append(feats.view(stack, eos.shape[0], -1))  # (R, n, embed_dim)
    return list(torch.cat(outputs, dim=1).to(dtype).unbind(0))  # R x (K, embed_dim)
