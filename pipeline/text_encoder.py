"""The frozen CLIP text tower, run on tokenised prompts or on a :class:`PromptLearner`'s prompts, exactly and fast.

Why the shortcuts are exact (see the project's CoOp notes): the text transformer is causal, so the output at
the [EOS] position never depends on later positions.

- ``cut``: run each class chunk only up to its longest real prompt (largest [EOS] index + 1) instead of all 77
  positions; the positional embedding and the causal mask are sliced to match.
- ``share_prefix``: with unified context, the first positions ``[SOS] [V]1..[V]M`` (class token at the end) or
  ``[SOS] [V]1..[V]M/2`` (middle) are the same for every class and, being causal, never see the class tokens.
  They are computed once (batch 1) through every layer; each layer's keys/values of that prefix are kept and
  the K class suffixes attend to them plus their own (causally). The blocks are re-implemented by hand from
  open_clip's ``ResidualAttentionBlock`` (``ln_1`` -> packed in-projection -> attention -> ``out_proj`` ->
  ``ls_1`` residual; ``ln_2`` -> ``mlp`` -> ``ls_2`` residual) with ``scaled_dot_product_attention``.
- ``class_chunk``: classes are processed in chunks (1000-class datasets fit); with ``checkpoint_chunks`` each
  chunk's activations are recomputed in the backward pass instead of stored.

The plain path (``cut=False, share_prefix=False``) runs the full sequence through open_clip's own transformer
with the model's ``attn_mask`` passed at call time, like ``encode_text``; it is the reference the shortcuts are
tested against.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_tower import TextTower, resolve_text_tower

logger = logging.getLogger(__name__)

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, heads, P, head_dim) keys and values


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    step = n if size is None else size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, heads, T, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, T, width)


def _block_qkv(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ln_1`` then the packed q/k/v in-projection of ``nn.MultiheadAttention``, split into heads.

    ``block`` is an open_clip ``ResidualAttentionBlock`` (checked by ``TextTower.supports_manual_blocks``).
    """
    attn: nn.MultiheadAttention = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3 * width)
    q, k, v = qkv.chunk(3, dim=-1)  # each (B, T, width), packed in that order as in torch
    return _split_heads(q, attn.num_heads), _split_heads(k, attn.num_heads), _split_heads(v, attn.num_heads)


def _block_finish(block: Any, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of ``ResidualAttentionBlock.forward`` after attention: both residual branches."""
    x = x + block.ls_1(block.attn.out_proj(_merge_heads(attended)))  # (B, T, width)
    return x + block.ls_2(block.mlp(block.ln_2(x)))  # type: ignore[no-any-return]


class PromptTextEncoder:
    """Runs the frozen text tower of ``clip`` on token ids or on a prompt learner's prompts.

    Options (keyword-only): ``cut`` and ``share_prefix`` (the exact shortcuts, both on by default),
    ``class_chunk`` (classes per chunk, None = all at once), ``checkpoint_chunks`` (recompute each chunk in the
    backward pass), ``autocast_bf16`` (``torch.autocast`` to bfloat16 on the tower's device). Computation happens on
    the device of the model's weights; token ids are moved there, a prompt learner must already live there.
    """

    def __init__(
        self,
        clip: LoadedClip,
        *,
        cut: bool = True,
        share_prefix: bool = True,
        class_chunk: int | None = None,
        checkpoint_chunks: bool = False,
        autocast_bf16: bool = False,
    ) -> None:
        if class_chunk is not None and class_chunk < 1:
            raise ParamsError(f"class_chunk must be a positive number of classes or None, got {class_chunk}")
        self.tower: TextTower = resolve_text_tower(clip.model)
        self.tokenizer = clip.tokenizer
        self.cut = cut
        self.share_prefix = share_prefix
        self.class_chunk = class_chunk
        self.checkpoint_chunks = checkpoint_chunks
        self.autocast_bf16 = autocast_bf16
        self._manual_blocks = self.tower.supports_manual_blocks()
        if share_prefix and not self._manual_blocks:
            logger.info("text blocks are not plain ResidualAttentionBlocks: prefix sharing disabled")

    @property
    def device(self) -> torch.device:
        return self.tower.device

    # ---------------------------------------------------------------- shared pieces
    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _run_chunk(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        if self.checkpoint_chunks and wants_grad:
            return checkpoint(fn, *args, use_reentrant=False)  # type: ignore[no-any-return]
        return fn(*args)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """ln_final -> text projection -> L2 normalisation of the pooled [EOS] rows: (n, width) -> (n, embed_dim)."""
        return F.normalize(self.tower.project(self.tower.ln_final(pooled)), dim=-1)

    def _forward_full(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """open_clip's own transformer on (n, T, width) embeddings with the model's causal mask sliced to T."""
        tower = self.tower
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(x.dtype)  # (n, T, width)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])  # (n, T, width)
        return self._head(x[torch.arange(x.shape[0], device=x.device), eos])  # (n, embed_dim)

    def _prefix_keys_values(self, prefix: torch.Tensor) -> KeysValues:
        """Run the shared prefix (1, P, width) through every block, keeping each block's keys and values."""
        x = prefix + self.tower.positional_embedding[: prefix.shape[1]].to(prefix.dtype)  # (1, P, width)
        blocks = self.tower.blocks
        keys_values: KeysValues = []
        for i, block in enumerate(blocks):
            q, k, v = _block_qkv(block, x)  # (1, heads, P, head_dim)
            keys_values.append((k, v))
            if i + 1 < len(blocks):  # the last block's output is never read: only its keys/values are
                x = _block_finish(block, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return keys_values

    def _forward_suffix(self, x: torch.Tensor, eos: torch.Tensor, *flat_kv: torch.Tensor) -> torch.Tensor:
        """Run class suffixes (n, R, width) after a shared prefix whose per-block keys/values are ``flat_kv``.

        ``eos`` indexes into the suffix. Suffix position r (absolute P + r) attends to all P prefix positions and
        to suffix positions <= r: the causal mask restricted to these rows.
        """
        n, length, _ = x.shape
        n_prefix = flat_kv[0].shape[2]
        x = x + self.tower.positional_embedding[n_prefix : n_prefix + length].to(x.dtype)  # (n, R, width)
        allowed = torch.ones(length, n_prefix + length, dtype=torch.bool, device=x.device).tril(n_prefix)  # (R, P+R)
        for layer, block in enumerate(self.tower.blocks):
            k_prefix, v_prefix = flat_kv[2 * layer], flat_kv[2 * layer + 1]  # (1, heads, P, head_dim)
            q, k, v = _block_qkv(block, x)  # (n, heads, R, head_dim)
            k = torch.cat([k_prefix.expand(n, -1, -1, -1).to(k.dtype), k], dim=2)  # (n, heads, P + R, head_dim)
            v = torch.cat([v_prefix.expand(n, -1, -1, -1).to(v.dtype), v], dim=2)
            x = _block_finish(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
        return self._head(x[torch.arange(n, device=x.device), eos])  # (n, embed_dim)

    # ---------------------------------------------------------------- public API
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of token ids (n, L) -> (n, embed_dim); equals ``encode_text(normalize=True)``.

        Uses ``cut`` and ``class_chunk`` (rows per chunk); for zero-shot prompts and prompt ensembles.
        """
        tower = self.tower
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ParamsError(f"expected token ids of shape (n >= 1, context_length), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        outputs = []
        with self._autocast():
            for rows in _chunks(tokens.shape[0], self.class_chunk):
                chunk = tokens[rows]  # (n, L)
                eos = tower.eos_positions(chunk)  # (n,)
                length = int(eos.max()) + 1 if self.cut else chunk.shape[1]
                x = tower.token_embedding(chunk[:, :length]).to(tower.dtype)  # (n, T, width)
                outputs.append(self._forward_full(x, eos))
        return torch.cat(outputs).to(tower.dtype)  # (n, embed_dim)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise ``texts`` with the model's tokenizer and encode them: (n, embed_dim)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_tokens(torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long))

    def __call__(self, learner: PromptLearner) -> torch.Tensor:
        """L2-normalised text features of every class of ``learner``: (n_cls, embed_dim), differentiable in ctx."""
        if learner.ctx.device != self.device:
            raise ParamsError(
                f"prompt learner is on {learner.ctx.device} but the text tower on {self.device}; move one of them"
            )
        if learner.context_length != self.tower.context_length:
            raise ParamsError("prompt learner was built for another model (context lengths differ)")
        n_prefix = learner.shared_length
        share = self.share_prefix and self._manual_blocks and n_prefix > 1
        outputs = []
        with self._autocast():
            flat_kv: list[torch.Tensor] = []
            if share:
                for k, v in self._prefix_keys_values(learner.shared_prefix_embeddings().to(self.tower.dtype)):
                    flat_kv += [k, v]
            for classes in _chunks(learner.n_cls, self.class_chunk):
                eos = learner.eos_index[classes]  # (n,)
                length = int(eos.max()) + 1 if self.cut else learner.context_length
                x = learner.prompt_embeddings(classes, length=length).to(self.tower.dtype)  # (n, T, width)
                if share:
                    outputs.append(self._run_chunk(self._forward_suffix, x[:, n_prefix:], eos - n_prefix, *flat_kv))
                else:
                    outputs.append(self._run_chunk(self._forward_full, x, eos))
        return torch.cat(outputs).to(self.tower.dtype)  # (n_cls, embed_dim)


def coop_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP/CoOp logits: ``logit_scale.exp()`` times the cosine of image (B, D) and text (K, D) features -> (B, K).

    ``logit_scale`` is CLIP's log-scale parameter (``model.logit_scale``); image features are normalised here
    (cached features are stored unnormalised), text features come normalised from :class:`PromptTextEncoder`.
    """
    image = F.normalize(image_features.to(text_features.dtype), dim=-1)  # (B, D)
    return logit_scale.exp().to(text_features.dtype) * image @ text_features.t()  # (B, K)
