"""ProGrad (Zhu et al., ICCV 2023, "Prompt-aligned gradient"): CoOp whose cross-entropy gradient is projected off the
direction that conflicts with the gradient of a KL term towards zero-shot CLIP's predictions.

Per learned tensor (``BeierZhu/Prompt-align: Dassl.ProGrad.pytorch/dassl/engine/trainer.py``,
``prograd_backward_and_update``): ``g_ce`` the gradient of ``CE(logits, y)``, ``g_kl`` the gradient of
``T^2 * mean_b sum_k -softmax(z0_b / T)_k log_softmax(z_b / T)_k`` (``ProGradLoss`` in ``ProGrad.public/trainers/
prograd.py``: KL to zero-shot CLIP's logits ``z0`` up to the teacher's entropy, a constant), ``u = g_kl / |g_kl|``;
when the two conflict (``g_ce . g_kl < 0``) the step uses ``g_ce - lambda (g_ce . u) u``, otherwise ``g_ce``. Zero-shot
CLIP's logits come from the batch's image features and the hand-crafted prompt's class text features, computed once
per run in :meth:`ProGrad.prepare` (:mod:`coopipe.methods.anchor`). The KL term needs only the training classes, so a
learned prompt transfers to new classes (base-to-new) as CoOp's does.

How it fits the one training loop: the loss computes both gradients with ``torch.autograd.grad`` (the text pass's
graph retained), projects, and returns the surrogate ``ce.detach() + (s - s.detach())``, ``s = sum_p <p, g_p>``:
its value is the cross-entropy (what the reference logs as its loss) and its gradient in each learned tensor ``p`` is
the projected ``g_p``, so the loop's ``backward`` and optimiser step (SGD, whose weight decay the reference also adds
after the projection) are the reference's update. Not stackable: in a shared text pass each run's two gradients
would each cost a backward pass of the whole stack.

Paper setting: M = 16 context tokens, unified, class token at the end, initialised from its hand-crafted template
(``CTX_INIT: True`` in ``ProGrad.public/configs/trainers/ProGrad/rn50*.yaml``: the template's words before the class
name fill the last context tokens, the others are zero, ``PromptLearner.__init__``), lambda = 1.0, T = 1.0
(``scripts/prograd.sh``, configs); SGD lr 0.002, batch 32, one warm-up epoch at 1e-5 then cosine, 50 / 100 / 100 /
200 / 200 epochs by shots (``rn50_ep50.yaml``, ``rn50_ep100.yaml``, ``rn50.yaml`` as the README assigns them):
CoOp's schedule. The template, for the zero-shot teacher and the context init alike, is ProGrad's own where it
rewords CoOp's (:data:`PROGRAD_TEMPLATES`, ``CUSTOM_TEMPLATES`` in ``ProGrad.public/trainers/prograd.py``: five
datasets, e.g. "a type of pet, a photo of a {}." for OxfordPets, "a texture of {}." for DTD, so that the class name
ends it), else the dataset's (:attr:`FitData.template`). When the words before the class name are empty (a
template "{} texture.") the context keeps its random draw. Departure: the reference counts the init words, coopipe
their tokens. Its README runs 8 and 16 shots of Flowers102, DTD
and EuroSAT at lambda = 0.8: give ``prograd_lambda`` (label part ``lambda0.8``) for those.

Options beyond CoOp's: ``template_init`` (label part ``randinit`` when off), ``prograd_lambda`` (``lambda<x>``),
``prograd_temperature`` (``temp<x>``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from coopipe.errors import ParamsError
from coopipe.learners import FitData, Learner, StepInputs
from coopipe.methods.anchor import AnchoredLearner, zero_shot_anchor
from coopipe.methods.context import PAPER_N_CTX
from coopipe.methods.coop import CoOp, CoOpLearner
from coopipe.models import LoadedClip
from coopipe.prompt import _tokenize
from coopipe.text_encoder import coop_logits
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

__all__ = ["PROGRAD_TEMPLATES", "ProGrad", "ProGradLearner", "ProGradOptions", "distill_loss", "project_gradient",
           "prograd_template", "template_context"]

PAPER_LAMBDA = 1.0
# ProGrad's zero-shot templates where they differ from CoOp's (the dataset's), by coopipe's dataset name
# (BeierZhu/Prompt-align: ProGrad.public/trainers/prograd.py, CUSTOM_TEMPLATES); on the other datasets they agree
PROGRAD_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}
PAPER_TEMPERATURE = 1.0


@dataclasses.dataclass(frozen=True)
class ProGradOptions:
    n_ctx: int | None = PAPER_N_CTX
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"
    template_init: bool = True  # with no init words: the template's words in the last context tokens, zeros before
    prograd_lambda: float = PAPER_LAMBDA  # how much of the conflicting component is removed
    prograd_temperature: float = PAPER_TEMPERATURE  # T of the KL term


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_b sum_k -softmax(teacher_b / T)_k log_softmax(logits_b / T)_k`` (B, K) -> scalar."""
    target = F.softmax(teacher.to(logits.dtype) / temperature, dim=-1)
    return -(target * F.log_softmax(logits / temperature, dim=-1)).sum(dim=-1).mean() * temperature**2


def project_gradient(ce_grad: torch.Tensor, kl_grad: torch.Tensor, lam: float) -> torch.Tensor:
    """ProGrad's rule for one tensor: ``ce_grad`` less ``lam`` times its component along ``kl_grad`` when they conflict.

    The reference tests the cosine of the two; its sign is that of the dot product, which is also 0 (no projection)
    where either gradient is zero, where the reference's cosine is NaN (no projection either).
    """
    dot = torch.dot(ce_grad.flatten(), kl_grad.flatten())
    if not dot < 0:
        return ce_grad
    unit = kl_grad / torch.linalg.norm(kl_grad)
    return ce_grad - lam * torch.dot(ce_grad.flatten(), unit.flatten()) * unit


def prograd_template(data: FitData) -> str:
    """ProGrad's hand-crafted template for the run's dataset: its own where it rewords CoOp's, else the dataset's."""
    return PROGRAD_TEMPLATES.get((data.dataset or "").lower(), data.template)


def template_context(clip: LoadedClip, template: str, n_ctx: int) -> torch.Tensor | None:
    """ProGrad's initial context (n_ctx, width): the template's words before the class name in the last tokens,
    zeros before them; None when there are no such words. A :class:`ParamsError` when they need more than n_ctx."""
    words = " ".join(template.split("{}")[0].replace("_", " ").split())
    if not words:
        return None
    tower = resolve_text_tower(clip.model)
    tokens = _tokenize(clip.tokenizer, [words], tower.context_length)  # (1, L)
    n = int(tower.eos_positions(tokens)[0]) - 1
    if n > n_ctx:
        raise ParamsError(f"ProGrad's template init puts {words!r} ({n} tokens) in the context, more than n_ctx={n_ctx}: "
                          f"give n_ctx >= {n}, or template_init false (label part randinit)")
    weight = tower.token_embedding.weight  # (vocab, width)
    ctx = torch.zeros(n_ctx, weight.shape[1], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        ctx[n_ctx - n :] = tower.token_embedding(tokens.to(weight.device))[0, 1 : 1 + n]
    return ctx


class ProGradLearner(AnchoredLearner, CoOpLearner):
    """CoOp's learner whose loss back-propagates ProGrad's projected cross-entropy gradient (see the module docstring)."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], *, template_init: bool, lam: float,
                 temperature: float, **prompt: Any) -> None:
        super().__init__(clip, classnames, **prompt)
        self.template_init, self.lam, self.temperature = template_init, lam, temperature

    def init_from_template(self, clip: LoadedClip, template: str) -> None:
        """Set the context to ProGrad's template init (every class's, with a class-specific context)."""
        ctx = template_context(clip, template, self.n_ctx)
        if ctx is None:
            logger.info("template %r has no words before the class name: ProGrad's context keeps its random draw",
                        template)
            return
        with torch.no_grad():
            self.ctx.copy_(ctx.expand_as(self.ctx))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        if not ce.requires_grad:
            return ce
        if step is None:
            raise ValueError("ProGrad's loss needs the batch's image features (StepInputs.image)")
        with torch.no_grad():
            teacher = coop_logits(step.image, self.anchor, step.logit_scale)  # (B, K) zero-shot CLIP
        kl = distill_loss(logits, teacher, self.temperature)
        params = [p for p in self.parameters() if p.requires_grad]
        ce_grads = torch.autograd.grad(ce, params, retain_graph=True)
        kl_grads = torch.autograd.grad(kl, params, retain_graph=True)
        s = sum(((p * project_gradient(a, b, self.lam)).sum() for p, a, b in zip(params, ce_grads, kl_grads)),
                torch.zeros((), dtype=ce.dtype, device=ce.device))
        return ce.detach() + (s - s.detach())  # value: the cross-entropy; gradient: the projected one

    def config(self) -> dict[str, Any]:
        # lambda and T are in the run's method record (variants hold no floats)
        return {"method": "prograd", **super().config(), "template_init": self.template_init}


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class ProGrad(CoOp):
    name = "prograd"
    title = "ProGrad"
    paper = "ProGrad (Zhu et al., Prompt-aligned Gradient for Prompt Tuning, ICCV 2023)"
    options = ProGradOptions  # type: ignore[assignment]  # CoOp's options and ProGrad's own
    stackable = False

    def check(self, options: Any) -> list[str]:
        problems = super().check(options)
        if not isinstance(options.template_init, bool):
            problems.append(f"template_init must be true or false (got {options.template_init!r})")
        if not _number(options.prograd_lambda) or options.prograd_lambda < 0:
            problems.append(f"prograd_lambda must be a finite number >= 0 (got {options.prograd_lambda!r})")
        if not _number(options.prograd_temperature) or options.prograd_temperature <= 0:
            problems.append(f"prograd_temperature must be a finite number > 0 (got {options.prograd_temperature!r})")
        return problems

    def normalize(self, options: Any) -> Any:
        options = super().normalize(options)
        floats = {k: float(v) for k in ("prograd_lambda", "prograd_temperature") if _number(v := getattr(options, k))}
        if options.ctx_init is not None:
            floats["template_init"] = True  # init words replace the template init: one record for one prompt
        return dataclasses.replace(options, **floats)

    def label_parts(self, options: Any) -> list[str]:
        return super().label_parts(options) + self._own(options, "randinit", "lambda{:g}", "temp{:g}")

    def parse_part(self, part: str) -> dict[str, Any]:
        number = r"[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?"
        if part == "randinit":
            return {"template_init": False}
        if re.fullmatch("lambda" + number, part):
            return {"prograd_lambda": float(part[len("lambda"):])}
        if re.fullmatch("temp" + number, part):
            return {"prograd_temperature": float(part[len("temp"):])}
        return super().parse_part(part)

    def readable_parts(self, options: Any) -> list[str]:
        return super().readable_parts(options) + self._own(options, "random init", "lambda={:g}", "T={:g}")

    @staticmethod
    def _own(options: Any, randinit: str, lam: str, temperature: str) -> list[str]:
        parts = [randinit] if not options.template_init else []
        parts += [lam.format(options.prograd_lambda)] if options.prograd_lambda != PAPER_LAMBDA else []
        return parts + ([temperature.format(options.prograd_temperature)] if options.prograd_temperature != PAPER_TEMPERATURE else [])

    def prepare(self, learner: Learner, data: FitData) -> None:
        assert isinstance(learner, ProGradLearner)
        template = prograd_template(data)
        learner.set_anchor(zero_shot_anchor(data, learner.ctx.device, template=template))
        if learner.template_init and learner.ctx_init is None:
            learner.init_from_template(data.clip, template)

    def build_learner(self, options: Any, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> ProGradLearner:
        return ProGradLearner(clip, classnames, template_init=options.template_init, lam=options.prograd_lambda,
                              temperature=options.prograd_temperature, n_ctx=options.n_ctx or PAPER_N_CTX,
                              ctx_init=options.ctx_init, csc=options.csc,
                              class_token_position=options.class_token_position, generator=generator)
