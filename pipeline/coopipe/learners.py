"""The learner interface: one place that turns a :class:`MethodSpec` into a trainable prompt module.

Why: training, evaluation and checkpoints should not care which method made a prompt. Every learner is an
``nn.Module`` whose parameters are exactly what the optimiser moves (CoOp: ``ctx``; CoCoOp: ``ctx`` and the
Meta-Net; rank prompts: ``ctx`` and the base rank embeddings), with:

- ``image_conditional`` (bool): False when one (K, D) classifier serves every image;
- ``ctx``: the context parameter (checkpoints store it under that name; other parameters under their
  ``named_parameters`` names);
- ``class_text_features(encoder) -> (K, D)``: the normalised class text features (image-independent methods;
  raises :class:`ParamsError` for image-conditional ones);
- ``logits(encoder, image_features, logit_scale) -> (B, K)``: logits of raw image features (B, D); for an
  image-independent learner this is ``coop_logits(image_features, class_text_features(encoder), logit_scale)``;
- ``config() -> dict``: what (with the model) rebuilds it, including ``classnames``.

A new method adds a branch to :func:`build_learner` and a class with these members.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from coopipe.cocoop import CoCoOpLearner
from coopipe.cocoop_text import DEFAULT_IMAGE_CHUNK, cocoop_predict
from coopipe.errors import CheckpointError, ParamsError
from coopipe.method import MethodSpec
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_encoder import PromptTextEncoder, coop_logits

logger = logging.getLogger(__name__)

__all__ = ["CoOpLearner", "Learner", "build_learner", "is_image_conditional", "learner_state", "predict_logits", "restore_learner"]


class Learner(Protocol):
    """What training and evaluation use of a learner (an ``nn.Module``; see the module docstring)."""

    image_conditional: bool
    ctx: nn.Parameter
    n_cls: int

    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **options: Any
    ) -> torch.Tensor: ...

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...


class CoOpLearner(PromptLearner):
    """CoOp's :class:`PromptLearner` with the learner interface (one classifier for every image)."""

    image_conditional = False

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        """Normalised class text features (K, D), differentiable in ``ctx``."""
        return encoder(self)

    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        return coop_logits(image_features, self.class_text_features(encoder), logit_scale)  # (B, K)

    def config(self) -> dict[str, Any]:
        return super().config()  # no "method" key: CoOp's records stay as they were


def build_learner(
    spec: MethodSpec, clip: LoadedClip, classnames: Sequence[str], *, generator: torch.Generator | None = None
) -> Learner:
    """A fresh learner for ``spec`` on ``clip``'s text tower device, initialised from ``generator``."""
    if spec.method == "coop":
        return CoOpLearner(
            clip,
            classnames,
            n_ctx=spec.n_ctx,
            ctx_init=spec.ctx_init,
            csc=spec.csc,
            class_token_position=spec.class_token_position,
            generator=generator,
        )
    if spec.method == "cocoop":
        return CoCoOpLearner(clip, classnames, spec, generator=generator)
    if spec.method == "rank":
        from coopipe.rank_prompt import build_rank_learner  # the class names are the ranks

        return build_rank_learner(clip, spec, len(classnames), generator=generator)  # type: ignore[return-value]
    raise ParamsError(f"method {spec.method!r} has no learner in this build of coopipe (available: coop, cocoop, rank)")


def is_image_conditional(learner: Learner | nn.Module) -> bool:
    return bool(getattr(learner, "image_conditional", False))


def learner_state(learner: Learner) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``learner`` by name (``ctx``, ``meta_net.linear1.weight``, ...), CPU copies."""
    return {name: p.detach().cpu().clone() for name, p in learner.named_parameters()}


def restore_learner(
    spec: MethodSpec, clip: LoadedClip, classnames: Sequence[str], tensors: Mapping[str, torch.Tensor]
) -> Learner:
    """Rebuild ``spec``'s learner for ``classnames`` and load its trained tensors (``ctx`` and the others by name).

    The class names may differ from the training ones (transfer) for methods whose prompt is not tied to its
    classes; extra tensors in ``tensors`` (resume state) are ignored.
    """
    learner = build_learner(spec, clip, classnames, generator=torch.Generator())  # its draw is overwritten
    params = dict(learner.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"the saved prompt lacks {', '.join(missing)} needed by a {spec.label()} learner; re-train")
    with torch.no_grad():
        for name, param in params.items():
            saved = tensors[name]
            if tuple(saved.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"saved {name} has shape {tuple(saved.shape)}, a {spec.label()} learner for {len(classnames)} "
                    f"classes needs {tuple(param.shape)}; use the checkpoint's model and method"
                )
            param.copy_(saved.to(param.device, param.dtype))
    return learner


def predict_logits(
    learner: Learner,
    encoder: PromptTextEncoder,
    image_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    batch_size: int = 256,
    image_chunk: int | None = DEFAULT_IMAGE_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Logits (M, K) CPU float32 of raw test features (M, D) for any learner, without gradients.

    Image-independent learners: one text pass, then a matrix product. Image-conditional ones (CoCoOp): one K-class
    text pass per image, ``batch_size`` images per call, memory bounded by ``image_chunk`` x ``class_chunk``;
    ``progress(n)`` after each batch.
    """
    feats = torch.as_tensor(image_features)
    if is_image_conditional(learner):
        if not isinstance(learner, CoCoOpLearner):
            raise ParamsError(f"no batched evaluation for image-conditional learner {type(learner).__name__}")
        return cocoop_predict(
            encoder, learner, feats, logit_scale, batch_size=batch_size, image_chunk=image_chunk, progress=progress
        )
    with torch.no_grad():
        text = learner.class_text_features(encoder)
        logits = coop_logits(feats.to(text.device), text, logit_scale).float().cpu()
    if progress is not None:
        progress(feats.shape[0])
    return logits
