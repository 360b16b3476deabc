"""CLIP-Adapter (Gao et al., IJCV 2024): a residual bottleneck MLP on the image feature before zero-shot CLIP's head.

``f' = ratio * A(f) + (1 - ratio) * f`` with ``A(f) = relu(W2 relu(W1 f))`` (``W1``: D -> D / reduction, ``W2``: back
to D, no biases) on the raw image feature, then CLIP's scaled cosine against the hand-crafted prompt's zero-shot
class weights; only ``W1`` and ``W2`` learn (``gaopengcuhk/CLIP-Adapter: clip_adapter.py``, ``Adapter`` and
``CustomCLIP``). The logits depend non-linearly on the image, so there is no single K x D classifier:
the learner is image-conditional and computes its own logits; the zero-shot head (K, D) is computed once per run in
:meth:`CLIPAdapter.prepare` and kept as a frozen parameter.

Paper setting: ratio 0.2 and reduction 4 (``clip_adapter.py``: ``ratio = 0.2``, ``Adapter(1024, 4)``, the input
width being RN50's embedding; here the model's own). The repository ships no optimiser config: its trainer builds
Dassl's optimiser and schedule from the CoOp configs it runs with, so coopipe keeps CoOp's protocol (SGD lr 0.002,
momentum 0.9, weight decay 5e-4, batch 32, one warm-up epoch at 1e-5 then cosine, 50/100/100/200/200 epochs).
``W1``, ``W2`` are drawn as ``nn.Linear``'s default (kaiming-uniform, a = sqrt(5)) from the run's init generator.

Base-to-new and transfer: the adapter is class-agnostic, so a learner rebuilt for other classes keeps the trained
adapter and gets the zero-shot head of its own classes, from the target dataset's hand-crafted prompt
(:meth:`CLIPAdapter.for_classes`; the head is ``class_derived``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.errors import ParamsError
from coopipe.learners import FitData, StepInputs
from coopipe.methods.feature_space import (
    FeatureMethod,
    batched_logits,
    fill_zero_shot,
    frozen_parameter,
    learner_device,
)
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder

__all__ = ["CLIPAdapter", "CLIPAdapterLearner", "CLIPAdapterOptions"]


@dataclasses.dataclass(frozen=True)
class CLIPAdapterOptions:
    ratio: float = 0.2  # the adapted feature's share in the blend
    reduction: int = 4  # bottleneck width D / reduction


def _linear_weight(out_features: int, in_features: int, generator: torch.Generator | None,
                   device: torch.device) -> nn.Parameter:
    """``nn.Linear``'s default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on the CPU from ``generator``."""
    bound = 1.0 / math.sqrt(in_features)
    weight = torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
    return nn.Parameter(weight.to(device))


class CLIPAdapterLearner(nn.Module):
    """``fc1`` (D / reduction, D) and ``fc2`` (D, D / reduction) learned; ``head`` (K, D) frozen zero-shot weights."""

    image_conditional = True

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], options: CLIPAdapterOptions,
                 generator: torch.Generator | None) -> None:
        super().__init__()
        device, dim = learner_device(clip), int(clip.embed_dim)
        hidden = dim // options.reduction
        if hidden < 1:
            raise ParamsError(f"reduction {options.reduction} leaves no hidden unit of a {dim}-wide feature")
        self.classnames, self.n_cls, self.options = list(classnames), len(classnames), options
        self.fc1 = _linear_weight(hidden, dim, generator, device)
        self.fc2 = _linear_weight(dim, hidden, generator, device)
        self.head = frozen_parameter(self.n_cls, dim, device=device)

    def adapted(self, image_features: torch.Tensor) -> torch.Tensor:
        """The blended feature ``ratio * A(f) + (1 - ratio) * f`` of raw features (B, D), not normalised."""
        f = image_features.to(self.fc1.dtype)
        adapted = F.relu(F.relu(f @ self.fc1.t()) @ self.fc2.t())  # (B, D)
        return self.options.ratio * adapted + (1.0 - self.options.ratio) * f

    def logits(self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor,
               **_: Any) -> torch.Tensor:
        """CLIP's scaled cosine (B, K) of the blended feature and the zero-shot head."""
        feature = F.normalize(self.adapted(image_features), dim=-1)
        return logit_scale.exp().to(feature.dtype) * feature @ self.head.t()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def predict_logits(self, encoder: PromptTextEncoder, image_features: torch.Tensor, logit_scale: torch.Tensor, *,
                       batch_size: int = 256, image_chunk: int | None = None,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits (M, K) CPU float32 of many images, in batches, without gradients."""
        scale = logit_scale.to(self.head.device)
        return batched_logits(lambda x: self.logits(encoder, x, scale), image_features, device=self.head.device,
                              batch_size=batch_size, progress=progress)

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        raise ParamsError("CLIP-Adapter adapts each image's feature: there is no single (K, D) classifier of raw "
                          "features; score images through the learner (logits, predict_logits)")

    def config(self) -> dict[str, Any]:
        return {"method": "clipadapter", **dataclasses.asdict(self.options), "classnames": self.classnames}


class CLIPAdapter(FeatureMethod):
    name = "clipadapter"
    title = "CLIP-Adapter"
    paper = "CLIP-Adapter (Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2024)"
    learned = "adapter"
    head_tensors = "adapter fc1, fc2 and the zero-shot head"
    inference = (
        "Image-conditional head (CLIP-Adapter): there is no fixed class matrix. For the raw image feature f, "
        "f' = ratio * relu(relu(f fc1^T) fc2^T) + (1 - ratio) * f (fc1, fc2 in prompt.safetensors; ratio in the "
        "method record), then logits = exp(logit_scale) * normalize(f') @ head^T with the hand-crafted prompt's "
        "zero-shot class weights head (K, D, normalised, in prompt.safetensors). No text tower runs at inference."
    )
    options = CLIPAdapterOptions
    image_conditional = True
    label_prefixes = {"ratio": "r", "reduction": "red"}
    integer_options = ("reduction",)
    class_derived = ("head",)

    def check(self, options: CLIPAdapterOptions) -> list[str]:
        problems = super().check(options)
        if not problems and options.ratio > 1:
            problems.append(f"ratio must lie in (0, 1] (got {options.ratio})")
        return problems

    def transferable(self, options: CLIPAdapterOptions) -> bool:
        return True  # a class-agnostic adapter: other classes get their own zero-shot head

    def prepare(self, learner: CLIPAdapterLearner, data: FitData) -> None:  # type: ignore[override]
        fill_zero_shot(learner.head, data.clip, data.classnames, data.template)

    def for_classes(self, learner: CLIPAdapterLearner, clip: LoadedClip, template: str) -> None:  # type: ignore[override]
        fill_zero_shot(learner.head, clip, learner.classnames, template)

    def build_learner(self, options: CLIPAdapterOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> CLIPAdapterLearner:
        return CLIPAdapterLearner(clip, classnames, options, generator)
