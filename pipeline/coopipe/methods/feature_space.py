"""What the feature-space methods (TaskRes, CLIP-Adapter, Tip-Adapter) share: zero-shot class weights held as a
frozen parameter, batched prediction without gradients, and :class:`FeatureMethod` (positive numeric options
written as label parts; a prompt tied to its training classes unless the method says otherwise).

Why frozen parameters: these methods start from what :meth:`coopipe.methods.Method.prepare` computes once per run
from the data (the hand-crafted prompt's zero-shot class weights, a cache of the few-shot features). Held as
parameters with ``requires_grad`` False, the checkpoint stores them with the learned tensors (the optimiser never
sees them), so evaluation and ``predict`` rebuild the learner from the checkpoint alone, without the dataset's
template or the training split, and a resume loads the saved values over what ``prepare`` recomputed (equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from coopipe.baselines import zero_shot_classifier
from coopipe.errors import ParamsError
from coopipe.methods.registry import Method
from coopipe.text_tower import resolve_text_tower

if TYPE_CHECKING:
    from coopipe.models import LoadedClip

__all__ = ["FeatureMethod", "batched_logits", "fill_zero_shot", "frozen_parameter", "learner_device"]


def learner_device(clip: LoadedClip) -> torch.device:
    """Where a learner lives: the device of ``clip``'s text tower (where the training loop computes)."""
    return resolve_text_tower(clip.model).device


def frozen_parameter(*shape: int, device: torch.device) -> nn.Parameter:
    """A float32 parameter of zeros that the optimiser never moves (``prepare`` fills it; the checkpoint stores it)."""
    return nn.Parameter(torch.zeros(shape, device=device), requires_grad=False)


@torch.no_grad()
def fill_zero_shot(head: nn.Parameter, clip: LoadedClip, classnames: Sequence[str], template: str) -> None:
    """``head`` (K, D) := the L2-normalised text features of the hand-crafted prompt ``template`` for each class (one
    text pass per run: :func:`coopipe.baselines.zero_shot_classifier`)."""
    weights = zero_shot_classifier(clip, classnames, template)  # (K, D)
    head.copy_(weights.to(head.device, head.dtype))


def batched_logits(
    logits: Callable[[torch.Tensor], torch.Tensor],
    image_features: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """``logits(batch)`` over ``image_features`` (M, D) in batches, without gradients: (M, K) CPU float32."""
    feats = torch.as_tensor(image_features)
    out = []
    with torch.no_grad():
        for start in range(0, feats.shape[0], max(batch_size, 1)):
            batch = feats[start : start + batch_size].to(device)
            out.append(logits(batch).float().cpu())
            if progress is not None:
                progress(batch.shape[0])
    return torch.cat(out) if out else torch.zeros(0, 0)


def numeric_parts(options: Any, prefixes: Mapping[str, str]) -> list[str]:
    """Label parts of the numeric options that depart from their default: ``{prefix}{value:g}`` (``alpha1``)."""
    defaults = type(options)()
    return [f"{prefix}{getattr(options, name):g}" for name, prefix in prefixes.items()
            if getattr(options, name) != getattr(defaults, name)]


def readable_numeric_parts(options: Any, names: Sequence[str]) -> list[str]:
    """The report's words for the numeric options that depart from their default: ``alpha=1``."""
    defaults = type(options)()
    return [f"{name}={getattr(options, name):g}" for name in names if getattr(options, name) != getattr(defaults, name)]


def parse_numeric_part(options: type, part: str, prefixes: Mapping[str, str]) -> dict[str, Any]:
    """The option one label part names (inverse of :func:`numeric_parts`); :class:`ParamsError` when none."""
    types = {f.name: f.type for f in dataclasses.fields(options)}
    for name, prefix in sorted(prefixes.items(), key=lambda kv: -len(kv[1])):  # longest prefix first
        if part.startswith(prefix) and len(part) > len(prefix):
            text = part[len(prefix):]
            try:
                return {name: int(text) if _integer(types[name]) else float(text)}
            except ValueError:
                break
    raise ParamsError(f"no option is written {part!r}")


def _integer(annotation: Any) -> bool:
    """Whether an option's annotation is an integer (``int``, or ``int | None`` for an option that may be unset)."""
    return annotation is int or (isinstance(annotation, str) and annotation.split("|")[0].strip() == "int")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_floats(options: Any, names: tuple[str, ...]) -> Any:
    """``options`` with the integer values of ``names`` as floats (``alpha: 1`` and ``alpha: 1.0`` are one setting)."""
    ints = {n: float(getattr(options, n)) for n in names if _number(getattr(options, n))
            and isinstance(getattr(options, n), int)}
    return dataclasses.replace(options, **ints) if ints else options


def positive_problems(options: Any, names: tuple[str, ...], *, integers: tuple[str, ...] = ()) -> list[str]:
    """One phrase per option of ``names`` that is not a positive number (of ``integers``: not a positive integer)."""
    problems = []
    for name in names:
        value = getattr(options, name)
        if not _number(value) or not value > 0 or (name in integers and not isinstance(value, int)):
            kind = "integer" if name in integers else "number"
            problems.append(f"{name} must be a positive {kind} (got {value!r})")
    return problems


class FeatureMethod(Method):
    """A method whose options are positive numbers, each written in a run label as ``{prefix}{value:g}`` when it
    departs from the paper's setting (``label_prefixes``: option -> prefix; ``integer_options`` must be integers),
    and whose learner serves only its training classes unless it says otherwise (``class_bound``: why, one phrase)."""

    label_prefixes: ClassVar[dict[str, str]] = {}
    integer_options: ClassVar[tuple[str, ...]] = ()
    class_bound: ClassVar[str] = ""

    def check(self, options: Any) -> list[str]:
        return positive_problems(options, tuple(self.label_prefixes), integers=self.integer_options)

    def normalize(self, options: Any) -> Any:
        return as_floats(options, tuple(n for n in self.label_prefixes if n not in self.integer_options))

    def transferable(self, options: Any) -> bool:
        return False

    def transfer_refusal(self, options: Any) -> str:
        return self.class_bound

    def label_parts(self, options: Any) -> list[str]:
        return numeric_parts(options, self.label_prefixes)

    def parse_part(self, part: str) -> dict[str, Any]:
        try:
            return parse_numeric_part(self.options, part, self.label_prefixes)
        except ParamsError:
            raise ParamsError(f"{self.name} has no option written {part!r}") from None

    def readable_parts(self, options: Any) -> list[str]:
        return readable_numeric_parts(options, list(self.label_prefixes))
