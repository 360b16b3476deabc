"""Zero-shot CLIP and prompt ensembling as a method: the class text features of hand-crafted prompts, nothing learned.

- Zero-shot CLIP classifies with the text features of one hand-crafted prompt per class (the dataset's template,
  e.g. ``a centered satellite photo of {}.`` for EuroSAT, the age prompt for an age dataset).
- Prompt ensembling (label ``zeroshot_ensemble``; CLIP's ImageNet notebook): each class's normalised text features of
  every template averaged and renormalised, over CLIP's 80 ImageNet templates, or the age prompts
  (:data:`coopipe.regression.AGE_TEMPLATES`) when the dataset's prompt is the age prompt.

Why a method: it then runs where every method runs (``coopipe train``, the sweep, ``eval``, ``predict``, ``export``,
the report) instead of on a track of its own. It reads no training image (``fewshot`` False: one run per dataset,
whatever the shots and seeds), fits in :meth:`ZeroShot.prepare` (one text pass: 0 epochs, no optimiser), and its
classifier is the frozen ``head`` (K, D), exported like a learned prompt's. The head is computed from the class names
(``class_derived``), so the run scores any class list: base-to-new halves and cross-dataset targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from coopipe.baselines import IMAGENET_TEMPLATES, zero_shot_classifier
from coopipe.datasets.ages import AGE_TEMPLATE
from coopipe.errors import ParamsError
from coopipe.learners import ClassifierLearner, FitData
from coopipe.methods.feature_space import frozen_parameter, learner_device
from coopipe.methods.registry import Method
from coopipe.models import LoadedClip
from coopipe.regression import AGE_TEMPLATES
from coopipe.text_encoder import PromptTextEncoder

__all__ = ["TEMPLATE_SEP", "ZeroShot", "ZeroShotLearner", "ZeroShotOptions", "zero_shot_templates"]

ENSEMBLE_PART = "ensemble"
TEMPLATE_SEP = "\n"  # between a user's prompts in the one-string option (a run record holds plain values only)


@dataclasses.dataclass(frozen=True)
class ZeroShotOptions:
    ensemble: bool = False  # prompt ensembling instead of the dataset's one prompt
    templates: str = ""  # the user's own prompts (``coopipe zeroshot --template``), one a line; "" the dataset's


def zero_shot_templates(options: ZeroShotOptions, template: str) -> list[str]:
    """The prompts of a zero-shot run on a dataset whose hand-crafted prompt is ``template``: the user's own, that
    prompt, or the ensemble of its family (the age prompts for the age prompt, CLIP's 80 ImageNet templates else)."""
    if options.templates:
        return options.templates.split(TEMPLATE_SEP)
    if not options.ensemble:
        return [template]
    return list(AGE_TEMPLATES) if template == AGE_TEMPLATE else list(IMAGENET_TEMPLATES)


class ZeroShotLearner(ClassifierLearner, nn.Module):
    """The frozen zero-shot classifier ``head`` (K, D), L2-normalised text features of the prompts."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], options: ZeroShotOptions, *, method: str) -> None:
        nn.Module.__init__(self)
        self.classnames, self.n_cls, self.options, self.method = list(classnames), len(classnames), options, method
        self.head = frozen_parameter(self.n_cls, int(clip.embed_dim), device=learner_device(clip))

    @torch.no_grad()
    def fill(self, clip: LoadedClip, template: str) -> None:
        """``head`` := the zero-shot classifier of this learner's class names with ``template`` (or its ensemble)."""
        weights = zero_shot_classifier(clip, self.classnames, zero_shot_templates(self.options, template))
        self.head.copy_(weights.to(self.head.device, self.head.dtype))

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        return self.head

    def config(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self.options), "classnames": self.classnames}


class ZeroShot(Method):
    name = "zeroshot"
    title = "Zero-shot CLIP"
    paper = ("zero-shot CLIP and prompt ensembling (Radford et al., Learning Transferable Visual Models From Natural "
             "Language Supervision, ICML 2021)")
    learned = "zero-shot classifier"
    options = ZeroShotOptions
    trains = False
    fewshot = False
    class_derived = ("head",)

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        return 0  # any shots (0 included): nothing is trained

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), "views": "center"}

    def check(self, options: ZeroShotOptions) -> list[str]:
        problems = [] if isinstance(options.ensemble, bool) else [f"ensemble must be true or false (got {options.ensemble!r})"]
        if not isinstance(options.templates, str) or (options.templates and not all(
                t.count("{}") == 1 for t in options.templates.split(TEMPLATE_SEP))):
            problems.append("each prompt template must hold exactly one '{}' for the class name")
        return problems

    def normalize(self, options: ZeroShotOptions) -> ZeroShotOptions:
        """Several prompts of the user's are an ensemble."""
        several = isinstance(options.templates, str) and TEMPLATE_SEP in options.templates
        return dataclasses.replace(options, ensemble=options.ensemble or several)

    def record_fields(self, options: ZeroShotOptions, tensors: Any, template: str) -> dict[str, Any]:
        return {"templates": zero_shot_templates(options, template)}

    def label_parts(self, options: ZeroShotOptions) -> list[str]:
        """``ensemble`` or nothing: the report compares one prompt with an ensemble; a user's own prompts are in
        the run's record (``templates``), not in its label."""
        return [ENSEMBLE_PART] if options.ensemble else []

    def parse_part(self, part: str) -> dict[str, Any]:
        if part != ENSEMBLE_PART:
            raise ParamsError(f"{self.name} has no option written {part!r}")
        return {"ensemble": True}

    def prepare(self, learner: ZeroShotLearner, data: FitData) -> None:  # type: ignore[override]
        learner.fill(data.clip, data.template)

    def for_classes(self, learner: ZeroShotLearner, clip: LoadedClip, template: str) -> None:  # type: ignore[override]
        learner.fill(clip, template)

    def build_learner(self, options: ZeroShotOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> ZeroShotLearner:
        return ZeroShotLearner(clip, classnames, options, method=self.name)
