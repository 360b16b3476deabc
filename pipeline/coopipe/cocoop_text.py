"""CoCoOp's batched text path: the B x K conditional prompts of a step through the frozen text tower together.

Why: CoCoOp's prompt for image x and class k is ``[SOS] [V]1(x)..[V]M(x) [CLASS k] . [EOS]``. The reference
loops over the images in Python and runs all K 77-token prompts per image. Here the packed path of
:mod:`coopipe.text_encoder` is extended to many prefixes: for a chunk of b images and a chunk of classes, every
image gets one flat sequence ``[its P = 1 + M prefix rows][class 1's rows .. EOS][class 2's rows .. EOS]...``
(no padding, nothing after [EOS]); the class rows are the same embeddings for every image (the class names do not
depend on x) but attend to that image's prefix, so the b sequences share one :class:`_Packing` (same layout)
and run as a leading batch dimension: every GEMM runs once over the b x N real rows, attention runs on
(b x bins) bins, and the last layer computes queries, ``out_proj`` and the MLP only at the K [EOS] rows. The
result is exact (a causal tower pooled at [EOS]; see :mod:`coopipe.text_encoder`), which the parity tests check
against a per-image loop over open_clip's plain 77-token path, for logits and for the gradients of ``ctx`` and of
every Meta-Net parameter.

Memory is bounded by chunking over images (``image_chunk``) and over classes (the encoder's ``class_chunk``);
with the encoder's ``checkpoint_chunks`` each (image chunk, class chunk) is recomputed in the backward pass.
Towers whose blocks are not plain ``ResidualAttentionBlock`` s (or ``share_prefix=False``) take a batched plain
path: the b x K prompts cut at their longest [EOS], through open_clip's own transformer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from coopipe import text_encoder
from coopipe.errors import ParamsError
from coopipe.frozen_gemm import FrozenGemm
from coopipe.text_encoder import (
    PromptTextEncoder,
    _chunks,
    _heads,
    _in_projection,
    _merge,
    _Packing,
)
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
    if encoder.share_prefix and encoder._manual_blocks:
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


def _attend(block: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over (b * bins) bins with the packing's (bins, 1, Q, S) mask repeated for each image."""
    batch = q.shape[0] // mask.shape[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(batch, 1, 1, 1))


def _batched_block(block: Any, x: torch.Tensor, packing: _Packing, gemm: FrozenGemm) -> torch.Tensor:
    """One ``ResidualAttentionBlock`` on b packed sequences of the same layout: x (b, N, width) -> (b, N, width)."""
    b, _, width = x.shape
    heads = block.attn.num_heads
    qkv = _in_projection(block, block.ln_1(x), 0, 3, gemm)  # (b, N, 3 * width)
    padded = qkv.index_select(1, packing.to_padded).reshape(-1, 3 * width)  # (b * bins * S, 3 * width)
    q, k, v = _heads(padded, b * packing.bins, 3, heads)  # (b * bins, heads, S, head_dim) each
    attended = _merge(_attend(block, q, k, v, packing.mask)).view(b, -1, width)  # (b, bins * S, width)
    x = x + block.ls_1(gemm.layer(block.attn.out_proj, attended.index_select(1, packing.from_padded)))  # (b, N, width)
    return x + block.ls_2(gemm.mlp(block.mlp, block.ln_2(x)))  # type: ignore[no-any-return]


def _batched_last_block(block: Any, x: torch.Tensor, packing: _Packing, gemm: FrozenGemm) -> torch.Tensor:
    """The last block, output only at each class's [EOS]: x (b, N, width) -> (b, n, width)."""
    b, _, width = x.shape
    heads = block.attn.num_heads
    normed = block.ln_1(x)  # (b, N, width)
    kv = _in_projection(block, normed, 1, 2, gemm)  # (b, N, 2 * width)
    k, v = _heads(kv.index_select(1, packing.to_padded).reshape(-1, 2 * width), b * packing.bins, 2, heads)
    q = _in_projection(block, normed.index_select(1, packing.eos_to_padded), 0, 1, gemm)  # (b, bins * E, width)
    (q,) = _heads(q.reshape(-1, width), b * packing.bins, 1, heads)  # (b * bins, heads, E, head_dim)
    attended = _merge(_attend(block, q, k, v, packing.eos_mask)).view(b, -1, width)  # (b, bins * E, width)
    x = x.index_select(1, packing.eos)  # (b, n, width)
    x = x + block.ls_1(gemm.layer(block.attn.out_proj, attended.index_select(1, packing.eos_from_padded)))
    return x + block.ls_2(gemm.mlp(block.mlp, block.ln_2(x)))  # type: ignore[no-any-return]


def _forward_packed(
    encoder: PromptTextEncoder, packing: _Packing, prefix: torch.Tensor, suffix: torch.Tensor
) -> torch.Tensor:
    """Per-sequence prefixes (b, P, width) and class rows (N_s, width) shared by all b, or (b, N_s, width) each its
    own (stacked runs, :mod:`coopipe.stacked_text`) -> (b, n, embed_dim) normalised."""
    tower = encoder.tower
    if suffix.ndim == 2:
        suffix = suffix.unsqueeze(0).expand(prefix.shape[0], -1, -1)  # (b, N_s, width)
    x = torch.cat([prefix, suffix], dim=1)  # (b, N, width)
    x = x + tower.positional_embedding[packing.positions].to(x.dtype)  # (b, N, width)
    *blocks, last = tower.blocks
    for block in blocks:
        x = _batched_block(block, x, packing, encoder.gemm)
    pooled = _batched_last_block(last, x, packing, encoder.gemm)  # (b, n, width)
    return F.normalize(tower.project(tower.ln_final(pooled)), dim=-1)  # (b, n, embed_dim)


def _forward_plain(
    encoder: PromptTextEncoder, learner: CoCoOpLearner, classes: slice, prefix: torch.Tensor
) -> torch.Tensor:
    """The b x n prompts as padded sequences cut at the longest [EOS], through open_clip's transformer."""
    eos = learner.eos_index[classes]  # (n,)
    length = int(eos.max()) + 1 if encoder.cut else learner.context_length
    b, n_prefix, width = prefix.shape
    suffix = learner.token_suffix[classes, : length - n_prefix].to(prefix.dtype)  # (n, T - P, width)
    n = suffix.shape[0]
    prompts = torch.cat(
        [prefix.unsqueeze(1).expand(-1, n, -1, -1), suffix.unsqueeze(0).expand(b, -1, -1, -1)], dim=2
    )  # (b, n, T, width)
    feats = encoder._forward_full(prompts.reshape(b * n, length, width), eos.repeat(b))  # (b * n, embed_dim)
    return feats.view(b, n, -1)


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
    if learner.ctx.device != encoder.device:
        raise ParamsError(f"CoCoOp learner is on {learner.ctx.device} but the text tower on {encoder.device}; move one")
    if learner.context_length != encoder.tower.context_length:
        raise ParamsError("CoCoOp learner was built for another model (context lengths differ)")
    dtype = encoder.tower.dtype
    image_features = image_features.to(encoder.device)
    packed = encoder.share_prefix and encoder._manual_blocks
    n_prefix = learner.shared_length  # 1 + M
    packings: list[tuple[slice, Callable[..., torch.Tensor], torch.Tensor]] = []
    if packed:
        for classes in _chunks(learner.n_cls, encoder.class_chunk):
            suffix, positions, lengths = learner.packed_embeddings(classes, n_prefix)  # (N_s, width), (N_s,), (n,)
            packing = _Packing.build(n_prefix, positions, lengths, text_encoder.BIN_ROWS)
            packings.append((classes, functools.partial(_forward_packed, encoder, packing), suffix.to(dtype)))
    outputs = []
    with encoder._autocast():
        for images in _chunks(image_features.shape[0], capped_image_chunk(encoder, learner, image_chunk)):
            prefix = learner.conditional_prefix(image_features[images]).to(dtype)  # (b, P, width)
            if packed:
                row = [encoder._run_chunk(forward, prefix, suffix) for _, forward, suffix in packings]
            else:
                row = [
                    encoder._run_chunk(functools.partial(_forward_plain, encoder, learner, classes), prefix)
                    for classes in _chunks(learner.n_cls, encoder.class_chunk)
                ]
            outputs.append(torch.cat(row, dim=1))  # (b, K, embed_dim)
    return torch.cat(outputs).to(dtype)  # (B, K, embed_dim)


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
