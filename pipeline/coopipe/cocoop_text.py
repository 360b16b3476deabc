"""CoCoOp on the one text path: the B x K conditional prompts of a step through the frozen text tower together.

Why: CoCoOp's prompt for image x and class k is ``[SOS] [V]1(x)..[V]M(x) [CLASS k] . [EOS]``. The reference
loops over the images in Python and runs all K 77-token prompts per image. Here each image is one group of the
text path (:meth:`coopipe.text_encoder.PromptTextEncoder.encode_prompts`): its prefix is ``[SOS] [V]1(x)..[V]M(x)``
(P = 1 + M rows), its class rows are the learner's (the same for every image: the class names do not depend on
x), so the b images of a chunk run as one batch of packed sequences: every GEMM runs once over the b x N real rows.
The result is exact (a causal tower pooled at [EOS]; see :mod:`coopipe.text_encoder`), which the parity tests
check against a per-image loop over open_clip's plain 77-token path, for logits and for the gradients of ``ctx``
and of every Meta-Net parameter.

What is CoCoOp's own here: memory is bounded by chunking over images (``image_chunk``, capped at
:data:`CHUNK_ROWS` text rows), and a training step back-propagates image chunk by image chunk
(:func:`cocoop_backward`), each on the threads its size calls for (:func:`_threads`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from coopipe.errors import ParamsError
from coopipe.text_encoder import PromptTextEncoder, _chunks
from coopipe.threads import step_threads

if TYPE_CHECKING:
    from coopipe.cocoop import CoCoOpLearner

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_ROWS", "DEFAULT_IMAGE_CHUNK", "capped_image_chunk", "cocoop_backward", "cocoop_logits", "cocoop_predict", "cocoop_text_features"]

DEFAULT_IMAGE_CHUNK = 32  # images per chunk in training and evaluation
# At most this many text rows per batched pass (images x their packed rows): a chunk's activations then stay in
# cache. Measured on 2 cores (RN50, fp32, oneDNN), K = 100 (534 rows an image), batch 32: 2-4 images a chunk
# (1,068-2,136 rows) trained at 590-620 ms an image, 8 at 632 ms, 16 at 845 ms. At K = 10 (48 rows) the cap
# leaves the 32-image chunk as it is.
CHUNK_ROWS = 2048


def _rows_per_image(encoder: PromptTextEncoder, learner: CoCoOpLearner) -> int:
    """The most text rows one image puts into a pass: its prefix plus the packed rows of its largest class chunk
    (the plain path: its class chunk's prompts, each cut at the chunk's longest [EOS])."""
    eos = learner.eos_index  # (K,)
    chunks = list(_chunks(learner.n_cls, encoder.class_chunk))
    if encoder.packs:
        n_prefix = learner.shared_length
        return n_prefix + max(int((eos[c] + 1 - n_prefix).clamp(min=1).sum()) for c in chunks)
    return max(int(eos[c].shape[0] * (eos[c].max() + 1)) for c in chunks)


def capped_image_chunk(encoder: PromptTextEncoder, learner: CoCoOpLearner, image_chunk: int | None) -> int | None:
    """``image_chunk`` lowered so a chunk holds at most :data:`CHUNK_ROWS` text rows (never below one image).

    Only speed changes: the chunks' results are concatenated (forward) or their gradients summed (backward)."""
    cap = max(1, CHUNK_ROWS // _rows_per_image(encoder, learner))
    return cap if image_chunk is None else min(image_chunk, cap)


def _threads(encoder: PromptTextEncoder, learner: CoCoOpLearner, images: slice) -> AbstractContextManager[int]:
    """The threads for a pass over the text rows of ``images`` (:func:`coopipe.threads.step_threads`)."""
    return step_threads((images.stop - images.start) * _rows_per_image(encoder, learner), encoder.tower.width)


def cocoop_text_features(
    encoder: PromptTextEncoder,
    learner: CoCoOpLearner,
    image_features: torch.Tensor,
    *,
    image_chunk: int | None = DEFAULT_IMAGE_CHUNK,
) -> torch.Tensor:
    """L2-normalised text features of every (image, class) prompt: raw image features (B, D) -> (B, K, embed_dim).

    Differentiable in ``ctx`` and the Meta-Net. Chunks: ``image_chunk`` images (None = all; at most
    :data:`CHUNK_ROWS` text rows either way) x the encoder's ``class_chunk`` classes; the encoder's ``checkpoint_chunks`` recomputes each chunk in the backward pass.
    """
    if image_chunk is not None and image_chunk < 1:
        raise ParamsError(f"image_chunk must be a positive number of images or None, got {image_chunk}")
    encoder.check_prompts(learner)
    image_features = image_features.to(encoder.device)
    with encoder._autocast():  # the Meta-Net runs under the text path's autocast too
        prefix = learner.conditional_prefix(image_features)  # (B, P, width): one group per image
    return encoder.encode_prompts([learner], prefix, group_chunk=capped_image_chunk(encoder, learner, image_chunk))


def cocoop_logits(
    encoder: PromptTextEncoder,
    learner: CoCoOpLearner,
    image_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_chunk: int | None = DEFAULT_IMAGE_CHUNK,
) -> torch.Tensor:
    """CoCoOp logits (B, K) = ``logit_scale.exp()`` x cos(image, its own K class prompts); raw features (B, D)."""
    text = cocoop_text_features(encoder, learner, image_features, image_chunk=image_chunk)  # (B, K, D)
    image = F.normalize(image_features.to(device=text.device, dtype=text.dtype), dim=-1)  # (B, D)
    return logit_scale.exp().to(text.dtype) * torch.einsum("bd,bkd->bk", image, text)  # (B, K)


def cocoop_backward(
    encoder: PromptTextEncoder,
    learner: CoCoOpLearner,
    image_features: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_chunk: int | None = DEFAULT_IMAGE_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's forward and backward, ``image_chunk`` images at a time: returns the batch's mean
    cross-entropy and its logits (B, K), both detached; the gradients of ``ctx`` and the Meta-Net are accumulated
    into ``.grad`` (zero them first).

    Why: each image's loss needs only its own K prompts, so a chunk's loss (its summed cross-entropy / B) can be
    back-propagated as soon as its logits exist. Memory then holds one image chunk's activations, with no
    recomputation: the same bound as checkpointing every chunk (``checkpoint_chunks``), at two passes through the
    tower instead of three. The gradients equal those of the batch's mean loss up to float summation order.
    """
    if image_chunk is not None and image_chunk < 1:
        raise ParamsError(f"image_chunk must be a positive number of images or None, got {image_chunk}")
    if targets.shape != image_features.shape[:1]:
        raise ParamsError(f"need one target per image: {tuple(targets.shape)} vs {tuple(image_features.shape)}")
    batch = image_features.shape[0]
    losses, outputs = [], []
    for images in _chunks(batch, capped_image_chunk(encoder, learner, image_chunk)):
        with _threads(encoder, learner, images):
            logits = cocoop_logits(encoder, learner, image_features[images], logit_scale, image_chunk=None)  # (b, K)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast -> fp32; fp64 stays
            loss = F.cross_entropy(wide, targets[images].to(logits.device), reduction="sum") / batch
            if loss.requires_grad:
                loss.backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    return torch.stack(losses).sum(), torch.cat(outputs)


def cocoop_predict(
    encoder: PromptTextEncoder,
    learner: CoCoOpLearner,
    image_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    batch_size: int = 256,
    image_chunk: int | None = DEFAULT_IMAGE_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """CoCoOp logits of many test images (M, D) -> (M, K) CPU float32, ``batch_size`` images at a time, no grad.

    Every test image needs its own K-class text pass; memory is bounded by ``image_chunk`` x ``class_chunk``.
    ``progress(n)`` is called after each batch with the number of images it scored (e.g. ``tqdm.update``).
    """
    if batch_size < 1:
        raise ParamsError(f"batch_size must be >= 1, got {batch_size}")
    feats = torch.as_tensor(image_features)
    if feats.ndim != 2:
        raise ParamsError(f"test features must be (M, D), got shape {tuple(feats.shape)}")
    outputs = []
    with torch.no_grad():
        for rows in _chunks(feats.shape[0], batch_size):
            with _threads(encoder, learner, slice(0, min(rows.stop - rows.start, image_chunk or batch_size))):
                logits = cocoop_logits(encoder, learner, feats[rows], logit_scale, image_chunk=image_chunk)
            outputs.append(logits.float().cpu())
            if progress is not None:
                progress(rows.stop - rows.start)
    if not outputs:
        return torch.empty(0, learner.n_cls)
    return torch.cat(outputs)  # (M, K)
