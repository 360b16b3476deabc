"""ProGrad: its loss and projected gradient against the paper's rule, recomputed here on the plain open_clip path in
float64 (``tests/prompt_reference.py``) with the gradients conflicting (projection active) and agreeing (none), its
template init, paper setting and labels (its CLI run and sweep: ``tests/test_kgcoop.py``).

The rule, from ``BeierZhu/Prompt-align`` (``ProGradLoss`` in ``ProGrad.public/trainers/prograd.py``,
``prograd_backward_and_update`` in ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``): ``a`` the gradient of the
cross-entropy, ``b`` that of ``T^2 mean_b sum_k -softmax(z0/T) log_softmax(z/T)`` with ``z0`` zero-shot CLIP's
logits; if ``cos(a, b) < 0`` the update is ``a - lambda (a . b^) b^`` (``b^ = b / |b|``), else ``a``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from prompt_reference import context_text_features, fit_data, float64_text_tower, hand_crafted_features

from coopipe.errors import ParamsError
from coopipe.learners import StepInputs
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "golden retriever", "x y", "boat"]
TEMPLATE = "a photo of a {}."
M = 6  # two zero tokens before the template's four words
TIGHT = 1e-10  # float64


@pytest.fixture(scope="module")
def clip64(rn50: LoadedClip) -> LoadedClip:
    return float64_text_tower(rn50, layers=2)


def _reference(clip: LoadedClip, ctx: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, lam: float,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """ProGrad's cross-entropy, the gradient its update uses, cos(a, b) and the logits, written from the reference
    code."""
    ctx = ctx.detach().clone().requires_grad_(True)
    t = context_text_features(clip, ctx, NAMES, " ".join(["X"] * M))
    t0 = hand_crafted_features(clip, NAMES, TEMPLATE)
    x = images / images.norm(dim=-1, keepdim=True)
    scale = clip.model.logit_scale.exp()
    logits, teacher = scale * x @ t.T, scale * x @ t0.T
    xe = F.cross_entropy(logits, labels)
    kl = (-F.softmax(teacher / temperature, dim=-1) * F.log_softmax(logits / temperature, -1) * temperature**2).sum(1).mean()
    (b,) = torch.autograd.grad(kl, ctx, retain_graph=True)
    (a,) = torch.autograd.grad(xe, ctx)
    b_hat = b / torch.linalg.norm(b)
    cos = float(torch.dot((a / torch.linalg.norm(a)).flatten(), b_hat.flatten()))
    grad = a - lam * torch.dot(a.flatten(), b_hat.flatten()) * b_hat if cos < 0 else a
    return xe.detach(), grad, cos, logits.detach()


@pytest.mark.parametrize(("case", "lam", "temperature"), [("agree", 1.0, 1.0), ("conflict", 1.0, 1.0),
                                                           ("conflict", 0.5, 2.0)])
def test_loss_and_projected_gradient_follow_the_paper(clip64: LoadedClip, case: str, lam: float,
                                                      temperature: float) -> None:
    spec = MethodSpec.of("prograd", n_ctx=M, prograd_lambda=lam, prograd_temperature=temperature)
    learner = spec.build_learner(clip64, NAMES, generator=torch.Generator())
    spec.definition.prepare(learner, fit_data(clip64, NAMES, TEMPLATE))
    words = torch.as_tensor(clip64.tokenizer(["a photo of a"]))[0, 1:5]
    init = torch.cat([torch.zeros(2, learner.ctx.shape[1], dtype=torch.float64),
                      clip64.model.token_embedding.weight[words]])
    assert torch.equal(learner.ctx.detach(), init)  # the template's words in the last tokens, zeros before
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from zero-shot CLIP, so that the KL term has a gradient
        learner.ctx.add_(0.5 * torch.randn(learner.ctx.shape, generator=gen, dtype=torch.float64))
    images = 3.0 * torch.randn(6, clip64.embed_dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        teacher = coop_logits(images, hand_crafted_features(clip64, NAMES, TEMPLATE), clip64.model.logit_scale)
    labels = teacher.argmax(dim=-1) if case == "agree" else teacher.argmin(dim=-1)
    scale = clip64.model.logit_scale

    text = learner.class_text_features(PromptTextEncoder(clip64))
    production = coop_logits(images, text, scale)  # the loop's logits of the learner's class text features
    loss = learner.loss(production, labels, StepInputs(image=images, text=text, logit_scale=scale))
    (grad,) = torch.autograd.grad(loss, learner.ctx)

    ref_loss, ref_grad, cos, ref_logits = _reference(clip64, learner.ctx, images, labels, lam, temperature)
    torch.testing.assert_close(production.detach(), ref_logits, rtol=TIGHT, atol=TIGHT * float(ref_logits.abs().max()))
    assert (cos < 0) == (case == "conflict"), cos
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=TIGHT, atol=TIGHT)  # its value: the cross-entropy
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=TIGHT * float(ref_grad.abs().max()))


def test_template_init_needs_room_and_keeps_the_draw_without_words(clip64: LoadedClip) -> None:
    spec = MethodSpec.of("prograd", n_ctx=3)
    learner = spec.build_learner(clip64, NAMES, generator=torch.Generator())
    with pytest.raises(ParamsError, match="4 tokens.*n_ctx=3"):
        spec.definition.prepare(learner, fit_data(clip64, NAMES, TEMPLATE))
    drawn = learner.ctx.detach().clone()
    spec.definition.prepare(learner, fit_data(clip64, NAMES, "{} texture."))  # CoOp's DTD template: no words before
    assert torch.equal(learner.ctx.detach(), drawn)


def test_paper_setting_and_labels() -> None:
    for shots, epochs in ((1, 50), (2, 100), (4, 100), (8, 200), (16, 200)):
        config = TrainConfig.for_method("prograd", shots)
        assert (config.max_epoch, config.batch_size, config.lr, config.warmup_epoch) == (epochs, 32, 0.002, 1)
    spec = MethodSpec.parse("prograd_m8_randinit_lambda0.8_temp2")
    assert (spec.n_ctx, spec.template_init, spec.prograd_lambda, spec.prograd_temperature) == (8, False, 0.8, 2.0)
    assert spec.readable() == "ProGrad (M=8, random init, lambda=0.8, T=2)"
    assert MethodSpec.of("prograd", prograd_lambda=1).label() == "prograd" and MethodSpec("prograd").transferable
    assert not MethodSpec("prograd").definition.stackable  # each run's two gradients would cost a stacked backward
    with pytest.raises(ParamsError, match="prograd_temperature must be"):
        MethodSpec.of("prograd", prograd_temperature=0.0)



# ProGrad.public/trainers/prograd.py, CUSTOM_TEMPLATES, as written there (keys: Dassl's dataset names)
REFERENCE_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}


def test_prograd_uses_its_own_templates_for_every_dataset_the_reference_names(rn50: LoadedClip) -> None:
    from coopipe.datasets.coop import COOP_SPECS
    from coopipe.methods.prograd import prograd_template

    fit_data_stub = fit_data(rn50, NAMES, TEMPLATE)
    covered = 0
    for spec in COOP_SPECS:
        if spec.coop_name in REFERENCE_TEMPLATES:
            data = dataclasses.replace(fit_data_stub, dataset=spec.name, template=spec.template)
            assert prograd_template(data) == REFERENCE_TEMPLATES[spec.coop_name], spec.name
            covered += 1
    assert covered == len(REFERENCE_TEMPLATES)
    reworded = [s.name for s in COOP_SPECS if REFERENCE_TEMPLATES.get(s.coop_name, s.template) != s.template]
    assert len(reworded) == 5  # OxfordPets, OxfordFlowers, FGVCAircraft, DTD, Food101
    # a dataset the reference does not name keeps its own template
    other = dataclasses.replace(fit_data_stub, dataset="utkface", template="age estimation: a photo of a {}.")
    assert prograd_template(other) == "age estimation: a photo of a {}."


def test_oxford_pets_anchor_and_init_are_prograds_template(clip64: LoadedClip) -> None:
    """On OxfordPets the zero-shot teacher and the context init come from ProGrad's "a type of pet, a photo of a {}."
    (recomputed here through open_clip's encode_text), not from CoOp's "a photo of a {}, a type of pet."."""
    spec = MethodSpec.of("prograd", n_ctx=12)
    learner = spec.build_learner(clip64, NAMES, generator=torch.Generator())
    coop = "a photo of a {}, a type of pet."
    data = dataclasses.replace(fit_data(clip64, NAMES, coop), dataset="oxford_pets")
    spec.definition.prepare(learner, data)
    ours = REFERENCE_TEMPLATES["OxfordPets"]
    torch.testing.assert_close(learner.anchor, hand_crafted_features(clip64, NAMES, ours), rtol=TIGHT, atol=TIGHT)
    assert not torch.allclose(learner.anchor, hand_crafted_features(clip64, NAMES, coop))
    words = torch.as_tensor(clip64.tokenizer(["a type of pet, a photo of a"]))[0]
    n = int((words != 0).sum()) - 2  # the words' tokens between [SOS] and [EOS]
    expected = torch.cat([torch.zeros(12 - n, learner.ctx.shape[1], dtype=torch.float64),
                          clip64.model.token_embedding.weight[words[1:1 + n]]])
    assert n == 9 and torch.equal(learner.ctx.detach(), expected)
