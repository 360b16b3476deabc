"""TaskRes (Yu et al., CVPR 2023): a learned residual on zero-shot CLIP's class weights, ``t' = t + alpha * x``.

The base ``t`` (K, D) is the text feature of the dataset's hand-crafted prompt for each class, computed once per run
(:meth:`TaskRes.prepare`) and kept as a frozen parameter, so the checkpoint stores it and evaluation needs no
template; the residual ``x`` (K, D) starts at zero, so training starts from zero-shot CLIP. The classifier is
``normalize(t + alpha * x)`` with CLIP's scaled-cosine logits and cross-entropy, one K x D classifier for every image
(``geekyutao/TaskRes: trainers/taskres.py``, ``TaskResLearner`` and ``CustomCLIP``).

Paper setting (regular base, the text-only TaskRes):
- alpha 0.5 (1.0 for Flowers102: label ``taskres_alpha1``) (``train_regular.sh``, the scale argument of
  ``scripts/taskres/main.sh``);
- Adam (Dassl's: betas 0.9 / 0.999, weight decay 5e-4, Dassl's default), lr 2e-3 (ImageNet 2e-4), batch 256, one
  warm-up epoch at a constant 1e-5, then cosine (``configs/trainers/TaskRes/adam_lr2e-3_B256_ep100.yaml``,
  ``adam_lr2e-4_B256_ep200.yaml``);
- 100 epochs at 1, 2 and 4 shots, 200 at 8 and 16 (``train_regular.sh``: ``ep100`` / ``ep200`` configs).
The reference's base is the single dataset template (ImageNet: plus its 7 selected templates, an ensemble coopipe
does not reproduce: coopipe uses the dataset's one template everywhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.learners import ClassifierLearner, FitData
from coopipe.methods.feature_space import FeatureMethod, fill_zero_shot, frozen_parameter, learner_device
from coopipe.methods.registry import Optimization, epochs_for
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder

__all__ = ["TaskRes", "TaskResLearner", "TaskResOptions"]


@dataclasses.dataclass(frozen=True)
class TaskResOptions:
    alpha: float = 0.5  # the residual's scale


class TaskResLearner(ClassifierLearner, nn.Module):
    """``base`` (K, D, frozen: zero-shot class weights) plus ``alpha * residual`` (K, D, learned), normalised."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], alpha: float) -> None:
        super().__init__()
        device = learner_device(clip)
        self.classnames, self.n_cls, self.alpha = list(classnames), len(classnames), float(alpha)
        self.base = frozen_parameter(self.n_cls, clip.embed_dim, device=device)
        self.residual = nn.Parameter(torch.zeros(self.n_cls, clip.embed_dim, device=device))

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        """``normalize(base + alpha * residual)`` (K, D), differentiable in the residual (no text pass)."""
        return F.normalize(self.base + self.alpha * self.residual, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"method": "taskres", "alpha": self.alpha, "classnames": self.classnames}


class TaskRes(FeatureMethod):
    name = "taskres"
    title = "TaskRes"
    paper = "TaskRes (Yu et al., Task Residual for Tuning Vision-Language Models, CVPR 2023)"
    learned = "class-weight residual"
    options = TaskResOptions
    batch_size = 256
    label_prefixes = {"alpha": "alpha"}
    class_bound = "TaskRes learns one residual per training class, which other classes do not have"

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return 100 if shots <= 4 else 200

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        imagenet = dataset is not None and dataset.lower() == "imagenet"
        return {**super().train_setting(shots, dataset), "lr": 2e-4 if imagenet else 2e-3, "weight_decay": 5e-4,
                "warmup_epoch": 1}

    def optimizer(self, params: Mapping[str, nn.Parameter], opt: Optimization) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(params.values()), lr=opt.lr, betas=(0.9, 0.999), weight_decay=opt.weight_decay)

    def prepare(self, learner: TaskResLearner, data: FitData) -> None:  # type: ignore[override]
        fill_zero_shot(learner.base, data.clip, data.classnames, data.template)

    def build_learner(self, options: TaskResOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> TaskResLearner:
        return TaskResLearner(clip, classnames, options.alpha)
