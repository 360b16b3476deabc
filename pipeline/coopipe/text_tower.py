"""A uniform view of an open_clip text tower, whichever class holds it.

Why: open_clip's ``CLIP`` keeps the text tower's parts as attributes of the model itself (``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``, ``text_pool_type``),
while ``CustomTextCLIP`` keeps them on ``model.text`` (a ``TextTransformer``). The prompt learner and the text
encoder only need these parts, so they read them through :class:`TextTower` and never care which class it was.

CoOp's shortcuts (cutting the sequence, sharing the prefix) are exact only for a causal tower pooled at the EOS
token, so :func:`resolve_text_tower` refuses anything else with a clear message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from coopipe.errors import ParamsError

logger = logging.getLogger(__name__)

_EOS_POOLS = ("argmax", "eos")
_T = TypeVar("_T")


def _checked(part: object, kind: type[_T], name: str) -> _T:
    """``part`` typed as ``kind``, or :class:`ParamsError`: a text tower whose part is something else is not open_clip's."""
    if not isinstance(part, kind):
        raise ParamsError(f"the text tower's {name} is a {type(part).__name__}, not a {kind.__name__}: not an open_clip "
                          f"CLIP text tower")
    return part


@dataclass(frozen=True)
class TextTower:
    """The frozen parts of a CLIP text tower that CoOp runs its prompts through.

    The parts are read live from ``holder`` (the model, or ``model.text``) on every access, so the view stays
    right after ``model.to(device)`` or ``model.double()`` (which replace buffers such as ``attn_mask``).
    """

    holder: nn.Module
    pool_type: str  # "argmax" or "eos"
    eos_id: int | None

    def _part(self, name: str, kind: type[_T]) -> _T:
        """``holder.<name>``, checked to be a ``kind`` (an ``nn.Module`` attribute is typed as a module or tensor)."""
        return _checked(getattr(self.holder, name), kind, name)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._part("token_embedding", nn.Embedding)

    @property
    def positional_embedding(self) -> torch.Tensor:  # (context_length, width)
        return self._part("positional_embedding", torch.Tensor)

    @property
    def transformer(self) -> Any:  # open_clip.transformer.Transformer (duck-typed: resblocks, get_cast_dtype)
        return self.holder.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self._part("ln_final", nn.Module)

    @property
    def text_projection(self) -> torch.Tensor | nn.Module | None:  # (width, embed_dim) or nn.Linear
        return getattr(self.holder, "text_projection", None)

    @property
    def attn_mask(self) -> torch.Tensor:  # (context_length, context_length) additive causal mask
        return self._part("attn_mask", torch.Tensor)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.token_embedding.weight.shape[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return _checked(self.transformer.resblocks, nn.ModuleList, "transformer.resblocks")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype open_clip casts embeddings to before the transformer (its ``get_cast_dtype``)."""
        return _checked(self.transformer.get_cast_dtype(), torch.dtype, "transformer.get_cast_dtype()")

    @property
    def device(self) -> torch.device:
        return torch.device(self.token_embedding.weight.device)

    def eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (EOS) token of each row of ``tokens`` (n, L), as open_clip's pooling finds it."""
        if self.pool_type == "eos" and self.eos_id is not None:
            return (tokens == self.eos_id).int().argmax(dim=-1)  # (n,)
        return tokens.argmax(dim=-1)  # (n,) the EOT id is the largest id in CLIP's vocabulary

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Apply the text projection to pooled features (n, width) -> (n, embed_dim)."""
        proj = self.text_projection
        if proj is None:
            return pooled
        if isinstance(proj, nn.Module):
            return _checked(proj(pooled), torch.Tensor, "text_projection(pooled)")
        return pooled @ proj

    def supports_manual_blocks(self) -> bool:
        """True when every block is open_clip's plain ``ResidualAttentionBlock`` (packed in-projection, self-attention).

        The shared-prefix path re-implements exactly that block by hand; custom blocks (qk-norm, scaled cosine
        attention, ...) are run only through open_clip's own transformer.
        """
        for block in self.blocks:
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                return False
            if attn.bias_k is not None or hasattr(block, "ln_1_kv"):
                return False
            if not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
                return False
        return True


def resolve_text_tower(model: Any) -> TextTower:
    """Return the :class:`TextTower` of an open_clip ``CLIP`` or ``CustomTextCLIP`` model.

    Raises :class:`ParamsError` for towers CoOp cannot be run on exactly (Hugging Face text towers, no causal mask,
    a class-token embedding, pooling other than at the EOS token).
    """
    holder = model
    pool_type = getattr(model, "text_pool_type", None)
    eos_id = getattr(model, "text_eos_id", None)
    if not hasattr(model, "token_embedding") and hasattr(model, "text"):
        holder = model.text
        pool_type = getattr(holder, "pool_type", None)
        eos_id = getattr(holder, "eos_id", None)
    missing = [
        name
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        if not hasattr(holder, name)
    ]
    if missing:
        raise ParamsError(
            f"{type(model).__name__} has no open_clip text transformer (missing {', '.join(missing)}); CoOp needs a "
            f"CLIP-style text tower (e.g. RN50, ViT-B-32, ViT-B-16)"
        )
    if getattr(holder, "cls_emb", None) is not None:
        raise ParamsError(f"{type(model).__name__}'s text tower appends a class embedding; CoOp does not support it")
    if holder.attn_mask is None:
        raise ParamsError(
            f"{type(model).__name__}'s text tower is bidirectional (no causal mask); CoOp's prompt layout needs a "
            f"causal text transformer"
        )
    pool = pool_type or "argmax"
    if pool not in _EOS_POOLS:
        raise ParamsError(f"text pooling {pool!r} is not supported; CoOp pools at the EOS token ({_EOS_POOLS})")
    return TextTower(holder=holder, pool_type=pool, eos_id=eos_id)
