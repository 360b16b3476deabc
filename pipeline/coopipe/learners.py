"""The learner interface: what training, evaluation and checkpoints use of any method's trainable module.

Why: training, evaluation and checkpoints should not care which method made a prompt. A method
(:mod:`coopipe.methods`) builds its learner; every learner is an ``nn.Module`` whose parameters, by name, are
exactly what the optimiser moves and what a checkpoint stores (CoOp: ``ctx``; CoCoOp: ``ctx`` and the Meta-Net;
rank prompts: ``ctx`` and the base rank embeddings), with:

- ``image_conditional`` (bool): False when one (K, D) classifier serves every image;
- ``class_text_features(encoder) -> (K, D)``: the normalised class text features (image-independent methods:
  the classifier a run exports; image-conditional ones raise :class:`ParamsError`);
- ``logits(encoder, image_features, logit_scale) -> (B, K)``: logits of raw image features (B, D);
- ``loss(logits, labels, step)``: the training objective (cross-entropy unless the method says otherwise);
  ``step`` (:class:`StepInputs`) gives what else a loss may read: the batch's image features and this step's
  class text features (KgCoOp's distance to the hand-crafted prompt, ProGrad's zero-shot predictions);
- ``config() -> dict``: what (with the model) rebuilds it, including ``classnames``;
- image-conditional learners also ``predict_logits(...)`` (batched, no gradient) and ``loss_backward(...)``
  (loss and logits of a batch, back-propagated chunk by chunk).

:class:`ClassifierLearner` gives an image-independent learner all but ``class_text_features`` and ``config``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.cocoop_text import DEFAULT_IMAGE_CHUNK
from coopipe.errors import CheckpointError
from coopipe.text_encoder import PromptRows, PromptTextEncoder, coop_logits

if TYPE_CHECKING:
    from coopipe.methods.registry import MethodSpec
    from coopipe.models import LoadedClip

logger = logging.getLogger(__name__)

__all__ = ["ClassifierLearner", "FitData", "Learner", "PromptedLearner", "StepInputs", "is_image_conditional",
           "predict_logits", "restore_learner"]


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What a training step's loss may read beyond its logits and labels.

    Why: the field's later methods regularise towards zero-shot CLIP (KgCoOp: learned class text features near the
    hand-crafted prompt's; ProGrad: predictions near zero-shot's), so their loss needs the batch's image features or
    the step's class text features, which a plain ``loss(logits, labels)`` cannot see.
    """

    image: torch.Tensor  # (B, D) raw image features of the batch (the drawn view of each image)
    text: torch.Tensor | None  # (K, D) normalised class text features of this step; None for image-conditional learners
    logit_scale: torch.Tensor  # scalar, log scale


@dataclasses.dataclass(frozen=True)
class FitData:
    """What a method may read once, before training, to set its learner up (:meth:`coopipe.methods.Method.prepare`).

    Why: some methods start from the data rather than from a random draw (Tip-Adapter's cache of the few-shot
    features, LP++'s visual prototypes, CLAP's zero-shot initialisation) or need zero-shot text features for their
    loss, computed once per run rather than once per step. Only the training split and, where the run has one, the
    few-shot validation split are given: nothing a method fits can read the test split.
    """

    train_feats: torch.Tensor  # (N, V, D) raw features, every cached view
    train_labels: torch.Tensor  # (N,)
    val_feats: torch.Tensor | None  # (M, D) raw features of the few-shot validation split, or None
    val_labels: torch.Tensor | None  # (M,)
    classnames: tuple[str, ...]
    template: str  # the dataset's hand-crafted prompt template ("a photo of a {}."), for zero-shot text features
    clip: LoadedClip  # the frozen model (its text tower gives the zero-shot class text features)
    logit_scale: torch.Tensor  # scalar, log scale
    dataset: str | None = None  # the dataset's name, for a method whose published setting differs by dataset
    ordinal: bool = False  # the classes are ranks (ages): a probe picks its regularisation by MAE, not accuracy


class Learner(Protocol):
    """What training and evaluation use of a learner (an ``nn.Module``; see the module docstring)."""

    image_conditional: bool
    n_cls: int

    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **options: Any
    ) -> torch.Tensor: ...

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...


@runtime_checkable
class PromptedLearner(Learner, PromptRows, Protocol):
    """A learner whose classifier is prompts through the frozen text tower (CoOp, CoCoOp, the rank prompts and the
    methods built on them): it declares what the text path reads (:class:`coopipe.text_encoder.PromptRows`), so its
    runs can share a text pass (:mod:`coopipe.stacked_text`). Feature-space learners are not."""


class ClassifierLearner:
    """Mixin for an ``nn.Module`` learner whose classifier does not depend on the image: logits are CLIP's
    scaled cosine against :meth:`class_text_features`, the loss is cross-entropy."""

    image_conditional = False

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        raise NotImplementedError

    def logits(
        self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        return coop_logits(image_features, self.class_text_features(encoder), logit_scale)  # (B, K)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels)


def is_image_conditional(learner: Learner | nn.Module) -> bool:
    return bool(getattr(learner, "image_conditional", False))


def restore_learner(
    spec: MethodSpec, clip: LoadedClip, classnames: Sequence[str], tensors: Mapping[str, torch.Tensor]
) -> Learner:
    """Rebuild ``spec``'s learner for ``classnames`` and load its trained tensors (every parameter by name).

    The class names may differ from the training ones (transfer) for methods whose prompt is not tied to its
    classes; extra tensors in ``tensors`` are ignored. Parameters a learner lists in ``data_shaped`` take the saved
    shape (their size comes from the training data, e.g. Tip-Adapter's cache: one key per training image). Those
    the method lists in ``class_derived`` (computed from the class names, e.g. a zero-shot head) may be absent from
    ``tensors``: they then stay for :meth:`coopipe.methods.Method.for_classes` to fill.
    """
    learner = spec.build_learner(clip, classnames, generator=torch.Generator())  # its draw is overwritten
    params = dict(learner.named_parameters())
    with torch.no_grad():
        rows = {}
        for name in getattr(learner, "data_shaped", ()):
            if name in tensors and name in params:
                stored, built = tuple(tensors[name].shape), tuple(params[name].shape)
                if len(stored) != len(built) or stored[1:] != built[1:]:  # only the row count comes from the data
                    raise CheckpointError(f"saved {name} has shape {stored}, a {spec.label()} learner for "
                                          f"{len(classnames)} classes needs (rows, {', '.join(map(str, built[1:]))})")
                rows[name] = stored[0]
                params[name].data = torch.empty(stored, dtype=params[name].dtype, device=params[name].device)
        if len(set(rows.values())) > 1:
            raise CheckpointError(f"saved {', '.join(rows)} disagree on their number of rows ({rows})")
    missing = sorted(set(params) - set(tensors) - set(spec.definition.class_derived))
    if missing:
        raise CheckpointError(f"the saved prompt lacks {', '.join(missing)} needed by a {spec.label()} learner; re-train")
    with torch.no_grad():
        for name, param in params.items():
            if name not in tensors:
                continue  # class-derived: filled for these classes by the method
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

    Image-independent learners: one text pass, then a matrix product. Image-conditional ones: the learner's own
    batched ``predict_logits`` (CoCoOp: one K-class text pass per image, ``batch_size`` images per call, memory
    bounded by ``image_chunk`` x ``class_chunk``); ``progress(n)`` after each batch.
    """
    feats = torch.as_tensor(image_features)
    if is_image_conditional(learner):
        return learner.predict_logits(  # type: ignore[attr-defined, no-any-return]
            encoder, feats, logit_scale, batch_size=batch_size, image_chunk=image_chunk, progress=progress)
    with torch.no_grad():
        text = learner.class_text_features(encoder)
        logits = coop_logits(feats.to(text.device), text, logit_scale).float().cpu()
    if progress is not None:
        progress(feats.shape[0])
    return logits
