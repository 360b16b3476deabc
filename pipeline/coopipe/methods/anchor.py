"""Zero-shot class text features as a fixed anchor for a method's loss (KgCoOp's penalty, ProGrad's teacher).

Why one module: both methods regularise a learned prompt towards CLIP's hand-crafted prompt, and both need its
class text features once per run, not once per step. :meth:`coopipe.methods.Method.prepare` computes them from the
run's :class:`coopipe.learners.FitData` (the dataset's template and the frozen model) and hands them to the learner
with :meth:`AnchoredLearner.set_anchor`. They are an attribute, neither a parameter nor a buffer: the optimiser does
not move them and checkpoints do not store them; a resumed run computes them again (a deterministic text pass of the
frozen tower), so it equals an uninterrupted one.
"""

from __future__ import annotations

import torch

from coopipe.baselines import zero_shot_classifier
from coopipe.errors import ParamsError
from coopipe.learners import FitData

__all__ = ["AnchoredLearner", "zero_shot_anchor"]


def zero_shot_anchor(data: FitData, device: torch.device, *, template: str | None = None) -> torch.Tensor:
    """The hand-crafted prompt's normalised class text features (K, D) on ``device``, in the text tower's precision
    (at least float32): :func:`coopipe.baselines.zero_shot_classifier`, one text pass. ``template``: the method's own
    (ProGrad rewords some datasets'), else the dataset's."""
    return zero_shot_classifier(data.clip, data.classnames, template or data.template, dtype=None).to(device)


class AnchoredLearner:
    """Mixin for a learner whose loss reads the zero-shot class text features of its run."""

    _anchor: torch.Tensor | None = None

    def set_anchor(self, features: torch.Tensor) -> None:
        """Keep ``features`` (K, D) for the loss; called by the method's ``prepare`` once per run."""
        self._anchor = features.detach()

    @property
    def anchor(self) -> torch.Tensor:
        """The zero-shot class text features (K, D); an error before the method's ``prepare`` set them."""
        if self._anchor is None:
            raise ParamsError(f"{type(self).__name__} has no zero-shot text features: train it through "
                              "coopipe.train.train_prompt (the method's prepare computes them)")
        return self._anchor
