"""CoCoOp's learner: CoOp's unified context plus a Meta-Net that shifts it by a function of each image.

Why this shape (Zhou et al., CVPR 2022, reference ``trainers/cocoop.py``): the Meta-Net
``linear1: Linear(D, D // 16) -> ReLU -> linear2: Linear(D // 16, width)`` maps the L2-normalised image feature
(D = the image embedding dimension) to one vector ``h(x)`` that is added to every context token,
``v_m(x) = v_m + h(x)``; the class token sits at the end. Context and Meta-Net are trained together.

:class:`CoCoOpLearner` *is* a :class:`~coopipe.prompt.PromptLearner` (unified, class token at the end) with a
``meta_net`` submodule: the frozen [SOS] / class-name / [EOS] buffers, the packed suffix rows and ``ctx`` are
CoOp's, so the batched text path (:mod:`coopipe.cocoop_text`) only adds the per-image prefix
``[SOS] [V]1(x)..[V]M(x)``. Its ``state_dict`` is ``ctx`` plus the Meta-Net's four tensors.

Initialisation is deterministic from one explicit generator: the context (random init, or the token embeddings
of ``ctx_init``, CoCoOp's "a photo of a") first, then the Meta-Net's weights and biases, drawn as
``nn.Linear``'s default does (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for both: kaiming-uniform with a = sqrt(5)),
in float32 on the CPU so that a seed gives the same learner on every device.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from coopipe.cocoop_text import cocoop_backward, cocoop_logits, cocoop_predict
from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_tower import resolve_text_tower

if TYPE_CHECKING:
    from coopipe.learners import StepInputs
    from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = ["META_NET_REDUCTION", "CoCoOpLearner", "build_meta_net"]

META_NET_REDUCTION = 16  # hidden width D // 16, as the reference


def _init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default init (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))), from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for param in (layer.weight, layer.bias):
            drawn = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            param.copy_(drawn.to(param.dtype))


def build_meta_net(
    embed_dim: int,
    ctx_dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """The reference Meta-Net ``linear1 (D -> D // 16) -> relu -> linear2 (D // 16 -> ctx_dim)``, initialised from ``generator``."""
    hidden = embed_dim // META_NET_REDUCTION
    if hidden < 1:
        raise ParamsError(f"image embedding dimension {embed_dim} is too small for a Meta-Net (needs >= 16)")
    # skip_init: nn.Linear's own init would draw from (and advance) the global RNG
    linear1 = skip_init(nn.Linear, embed_dim, hidden)
    linear2 = skip_init(nn.Linear, hidden, ctx_dim)
    _init_linear(linear1, generator)
    _init_linear(linear2, generator)
    net = nn.Sequential(OrderedDict([("linear1", linear1), ("relu", nn.ReLU()), ("linear2", linear2)]))
    return net.to(device=device, dtype=dtype)


class CoCoOpLearner(PromptLearner):
    """CoCoOp: unified context ``ctx`` (M, width) plus ``meta_net`` (the method: :mod:`coopipe.methods.cocoop`).

    ``image_conditional`` tells the training loop that logits need the image (one text pass per image).
    """

    image_conditional = True

    def __init__(
        self,
        clip: LoadedClip,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            csc=False,
            class_token_position="end",
            generator=generator,
        )
        tower = resolve_text_tower(clip.model)
        weight = tower.token_embedding.weight
        self.embed_dim = int(clip.embed_dim)
        self.meta_net = build_meta_net(
            self.embed_dim, tower.width, generator=generator, dtype=weight.dtype, device=weight.device
        )
        logger.debug("CoCoOp meta-net: %d -> %d -> %d", self.embed_dim, self.embed_dim // META_NET_REDUCTION, tower.width)

    # ---------------------------------------------------------------- the conditional prompt
    def shifts(self, image_features: torch.Tensor) -> torch.Tensor:
        """Meta-Net output ``h(x)`` of raw image features (B, D) -> (B, width); the input is L2-normalised first."""
        if image_features.ndim != 2 or image_features.shape[1] != self.embed_dim:
            raise ParamsError(
                f"CoCoOp needs image features of shape (B, {self.embed_dim}), got {tuple(image_features.shape)}"
            )
        x = F.normalize(image_features.to(self.ctx.dtype), dim=-1)  # (B, D)
        return self.meta_net(x)  # type: ignore[no-any-return]

    def conditional_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's ``[SOS] [V]1(x)..[V]M(x)`` embeddings (no positional embedding): (B, 1 + M, width)."""
        shift = self.shifts(image_features)  # (B, width)
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, M, width)
        sos = self.token_prefix[:1].expand(ctx.shape[0], -1, -1)  # (B, 1, width)
        return torch.cat([sos, ctx], dim=1)  # (B, 1 + M, width)

    # ---------------------------------------------------------------- the learner interface
    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """CoCoOp logits (B, K) of raw image features (B, D) through the batched text path (options: image_chunk)."""
        return cocoop_logits(encoder, self, image_features, logit_scale, **options)

    def loss_backward(
        self,
        encoder: PromptTextEncoder,
        image_features: torch.Tensor,
        targets: torch.Tensor,
        logit_scale: torch.Tensor,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and logits of a training batch, back-propagated chunk by chunk as they are computed
        (:func:`coopipe.cocoop_text.cocoop_backward`; options: image_chunk); both returned detached."""
        return cocoop_backward(encoder, self, image_features, targets, logit_scale, **options)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        """Cross-entropy (the training loop calls :meth:`loss_backward`, which computes it chunk by chunk)."""
        return F.cross_entropy(logits, labels)

    def predict_logits(
        self,
        encoder: PromptTextEncoder,
        image_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        batch_size: int = 256,
        image_chunk: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits (M, K) of many test images without gradients (:func:`coopipe.cocoop_text.cocoop_predict`)."""
        return cocoop_predict(encoder, self, image_features, logit_scale, batch_size=batch_size,
                              image_chunk=image_chunk, progress=progress)

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        """Refused: CoCoOp's class text features depend on the image; use :meth:`logits`."""
        raise ParamsError(
            "CoCoOp prompts depend on the image: there is no single (K, D) classifier; evaluate with "
            "coopipe.cocoop_text.cocoop_predict (one text pass per test image)"
        )

    def config(self) -> dict[str, Any]:
        return {"method": "cocoop", **super().config()}

    def extra_repr(self) -> str:
        return f"cocoop, {super().extra_repr()}, embed_dim={self.embed_dim}"
