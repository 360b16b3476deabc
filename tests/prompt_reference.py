"""The plain open_clip path of a learned-context prompt, written independently of coopipe's prompt learner and
packed text path: the reference of the float64 formula tests of the methods built on CoOp (KgCoOp, ProGrad).

``"{init} {name}."`` tokenised with the model's tokenizer, the M context positions after [SOS] replaced by ``ctx``,
the full 77-token sequences through the transformer with the causal mask, ln_final at [EOS], the projection,
normalised: open_clip's ``encode_text`` with the context swapped in (CoOp's ``TextEncoder`` and ``PromptLearner``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch

from coopipe.learners import FitData
from coopipe.models import LoadedClip


def float64_text_tower(clip: LoadedClip, layers: int) -> LoadedClip:
    """A float64 copy of ``clip`` without its image tower, its text tower cut to its first ``layers`` blocks."""
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:layers]
    return dataclasses.replace(clip, model=model.double())


def context_text_features(clip: LoadedClip, ctx: torch.Tensor, names: Sequence[str], init: str) -> torch.Tensor:
    """Normalised class text features (K, D) of the unified context ``ctx`` (M, width), differentiable in it;
    ``init`` is the text whose M tokens the context replaces (the init words, or M placeholders)."""
    model = clip.model
    tokens = torch.as_tensor(clip.tokenizer([f"{init} {name}." for name in names]))  # (K, 77)
    eos = tokens.argmax(dim=-1)  # (K,)
    embeds = model.token_embedding(tokens)  # (K, 77, width)
    m = ctx.shape[0]
    prompts = torch.cat([embeds[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), embeds[:, 1 + m :]], dim=1)
    x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(names)), eos] @ model.text_projection  # (K, D)
    return x / x.norm(dim=-1, keepdim=True)


def hand_crafted_features(clip: LoadedClip, names: Sequence[str], template: str) -> torch.Tensor:
    """Normalised class text features (K, D) of a hand-crafted template, through open_clip's ``encode_text``."""
    with torch.no_grad():
        x = clip.model.encode_text(torch.as_tensor(clip.tokenizer([template.format(n) for n in names])))
    return x / x.norm(dim=-1, keepdim=True)


def fit_data(clip: LoadedClip, names: Sequence[str], template: str) -> FitData:
    """What a method's ``prepare`` sees, for a formula test: the class names, the template and the model (the
    training split is a placeholder: the methods tested here read none of it)."""
    dtype = clip.model.token_embedding.weight.dtype
    return FitData(train_feats=torch.zeros(1, 1, clip.embed_dim, dtype=dtype), train_labels=torch.zeros(1, dtype=torch.long),
                   val_feats=None, val_labels=None, classnames=tuple(names), template=template, clip=clip,
                   logit_scale=clip.model.logit_scale.detach())
