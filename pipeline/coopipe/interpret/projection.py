"""Accuracy of the nearest-word prompt: how much of a learned context survives projection onto the vocabulary.

Measured two ways: ``nearest_tokens`` puts exactly the nearest tokens' embeddings in the context slots (the true
projection onto the vocabulary), ``nearest_text`` tokenises the readable string ``"<words> {classname}."`` as a
user would type it (the two agree when the string tokenises back to the same ids: ``text_roundtrip``).
"""

from __future__ import annotations

import numpy as np
import torch

from coopipe.errors import ParamsError, ProvenanceMismatchError
from coopipe.interpret.reading import Interpretation, ProjectionAccuracy
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.text_tower import resolve_text_tower


def projected_context(nearest_ids: torch.Tensor, clip: LoadedClip) -> torch.Tensor:
    """The context with every vector replaced by its nearest token's embedding: ids (...) -> (..., width)."""
    tower = resolve_text_tower(clip.model)
    with torch.no_grad():
        return tower.token_embedding(nearest_ids.to(tower.device))


def nearest_prompt_tokens(learner: PromptLearner, nearest_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (n_cls, L) of the discrete prompts whose context slots hold ``nearest_ids``, in the learner's layout."""
    ids = nearest_ids.to(learner.tokenized_prompts.device)
    ctx_ids = ids.unsqueeze(0).expand(learner.n_cls, -1) if ids.ndim == 1 else ids  # (n_cls, n_ctx)
    tokens = learner.tokenized_prompts  # (n_cls, L): "[SOS] X..X name . [EOS]" (end layout)
    bank = torch.cat([tokens[:, :1], ctx_ids, tokens[:, 1 + learner.n_ctx :]], dim=1)  # (n_cls, L) end layout
    if learner.class_token_position == "end":
        return bank
    return torch.gather(bank, 1, learner.order)  # (n_cls, L)


def _accuracy(text_features: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> float:
    pred = coop_logits(features.to(text_features.device), text_features, logit_scale).argmax(dim=-1).cpu()  # (N,)
    return float((pred == labels).float().mean())


def evaluate_projection(
    interpretation: Interpretation,
    learner: PromptLearner,
    clip: LoadedClip,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    source: str | None = None,
    encoder: PromptTextEncoder | None = None,
) -> ProjectionAccuracy:
    """Test accuracy of the learned context and of its nearest-word projections on cached features.

    ``features``: raw image features (N, D) (view 0 of a test store); ``labels``: (N,) indices into
    ``learner.classnames``. The learner's ``ctx`` is restored afterwards.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != y.shape[0] or feats.shape[0] == 0:
        raise ParamsError(f"expected features (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(y.shape)}")
    if feats.shape[1] != clip.embed_dim:
        raise ProvenanceMismatchError(
            f"test features have dimension {feats.shape[1]} but {clip.name} embeds to {clip.embed_dim}: they come from another model"
        )
    if int(y.min()) < 0 or int(y.max()) >= learner.n_cls:
        raise ProvenanceMismatchError(f"test labels {int(y.min())}..{int(y.max())} do not fit {learner.n_cls} classes")
    encoder = encoder or PromptTextEncoder(clip)
    logit_scale = clip.model.logit_scale.detach()
    nearest = interpretation.nearest_ids
    saved = learner.ctx.detach().clone()
    try:
        with torch.no_grad():
            learned = _accuracy(encoder(learner), feats, y, logit_scale)
            learner.ctx.copy_(projected_context(nearest, clip).to(learner.ctx.dtype))  # same shape as ctx
            tokens_acc = _accuracy(encoder(learner), feats, y, logit_scale)
    finally:
        with torch.no_grad():
            learner.ctx.copy_(saved)
    if learner.csc:
        texts = [reading.prompt(name) for reading, name in zip(interpretation.contexts, learner.classnames)]
    else:
        texts = [interpretation.contexts[0].prompt(name) for name in learner.classnames]
    typed = torch.as_tensor(clip.tokenizer(texts), dtype=torch.long)  # (n_cls, L)
    with torch.no_grad():
        text_acc = _accuracy(encoder.encode_tokens(typed), feats, y, logit_scale)
    roundtrip = bool(torch.equal(typed.cpu(), nearest_prompt_tokens(learner, nearest).cpu()))
    return ProjectionAccuracy(
        n_images=int(y.shape[0]), learned=learned, nearest_tokens=tokens_acc, nearest_text=text_acc,
        text_roundtrip=roundtrip, source=source,
    )
