"""Learning checks that need no pretrained weights: a prompt planted in a frozen random-weight text tower, learned
through the production loop (``train_prompt``), with controls in the same test that must fail.

Random-weight CLIP image features carry no class signal, so "CoOp beats zero-shot" on them says little. Here the
signal is planted: a random text tower (ViT-B-32's, its real 512-d embedding; RN50's for the rank prompts) and a
hidden context c* give class text features t_k(c*); a synthetic image of class k is t_k(c*) plus noise (for CoCoOp
the prompt that made it also depends on a hidden image factor, for the rank prompts the hidden prompt is a rank
prompt). Training starts from a random context (and a fresh Meta-Net, fresh base ranks) and must classify
held-out synthetic images. Each control is the same method with a part frozen at its init (``frozen``: the same
learner, loss, optimiser and loop, the part left out of the optimiser), or for CoCoOp also plain CoOp: a learning
test that a control passes shows nothing about that part.

Thresholds, and why:
- CoOp: chance is 1/8. In these random towers all prompts' features are nearly collinear (mean cosine ~0.95), yet
  the planted classes are separable: the Bayes classifier (the hidden prompt itself) scores 100% at this noise. A
  hand-crafted prompt ("a photo of a {}.") is measured, not assumed: the class-name tokens carry part of the class
  direction through any context, so it lands well above chance (58.5% here) but far below the planted prompt; a
  random initial context scores 32-78% depending on its draw (five draws: 0.47, 0.32, 0.78, 0.51, 0.43; the
  control's, frozen, 0.51), for the same reason. The learned prompt must reach >= 90% AND beat the hand-crafted
  prompt by >= 25 points, which neither baseline reaches on 200 held-out images (8 x 25).
- CoCoOp and rank prompts: each test's docstring gives its measured margins.
- a larger learning rate than the paper's (0.5 for SGD, 0.2 for the rank prompts' RAdam; no warm-up, no weight
  decay, a few epochs) keeps each test to seconds; the method, its optimiser and the loop are the library's own,
  only the schedule is shortened.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from coopipe.methods import MethodSpec, get_method, register, unregister
from coopipe.methods.coop import CoOpLearner
from coopipe.models import LoadedClip, load_clip
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

NAMES = ["cat", "dog", "car", "tree", "boat", "house", "bird", "road"]
M = 4
SIGMA = 1.5  # hidden context, per coordinate
NOISE = 0.5  # norm of the isotropic image noise (text features have norm 1)
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 25
LEARNED_MIN, MARGIN_MIN = 0.90, 0.25


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def frozen(method: str, *prefixes: str) -> Iterator[str]:
    """A control: ``method`` registered under another name with its learner's parameters named ``prefixes...``
    frozen (requires_grad False: the production loop leaves them out of the optimiser); yields the name.

    Everything else (learner, loss, optimiser, loop) is the method's own; a learner left with nothing to learn
    gets an optimiser over an empty placeholder, so that the loop runs and its prompt stays the initial one."""
    base = type(get_method(method))

    class Frozen(base):  # type: ignore[valid-type, misc]
        name = f"{method}frozen{'x'.join(p.replace('.', '').replace('_', '') for p in prefixes)}"

        def build_learner(self, options, clip, classnames, *, generator):  # type: ignore[no-untyped-def]
            learner = super().build_learner(options, clip, classnames, generator=generator)
            for name, param in learner.named_parameters():
                if name.startswith(prefixes):
                    param.requires_grad_(False)
            return learner

        def optimizer(self, params, opt):  # type: ignore[no-untyped-def]
            return super().optimizer(params or {"placeholder": torch.nn.Parameter(torch.zeros(0))}, opt)

    control = register(Frozen())
    try:
        yield control.name
    finally:
        unregister(control.name)


@pytest.fixture(scope="module")
def vit() -> LoadedClip:
    return load_clip("ViT-B-32", "none")


def _planted_text(clip: LoadedClip, ctx: torch.Tensor, names: list[str] = NAMES) -> torch.Tensor:
    """Class text features (K, D) of a given context (M, width) through the frozen tower."""
    learner = CoOpLearner(clip, names, n_ctx=M, generator=torch.Generator())
    with torch.no_grad():
        learner.ctx.copy_(ctx)
        return PromptTextEncoder(clip)(learner)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


def _hand_crafted(clip: LoadedClip, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        text = PromptTextEncoder(clip).encode_texts([f"a photo of a {name}." for name in NAMES])
    return _accuracy(coop_logits(images, text, clip.model.logit_scale), labels)


def _noise(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return NOISE * F.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def _planted_problem(clip: LoadedClip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and held-out synthetic images (N, D) and labels (N,) of the hidden context c*; separable."""
    gen = torch.Generator().manual_seed(8)
    hidden = SIGMA * torch.randn(M, clip.model.token_embedding.weight.shape[1], generator=gen)  # c*
    text = _planted_text(clip, hidden)  # (K, D)

    def synth(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(NAMES)).repeat(per_class)
        return text[labels] + _noise(len(labels), clip.embed_dim, gen), labels

    (x_train, y_train), (x_test, y_test) = synth(TRAIN_PER_CLASS), synth(TEST_PER_CLASS)
    assert _accuracy(coop_logits(x_test, text, clip.model.logit_scale), y_test) == 1.0  # separable (Bayes)
    return x_train, y_train, x_test, y_test


def _planted_config(method: MethodSpec, lr: float = 0.5) -> TrainConfig:
    return TrainConfig(max_epoch=6, batch_size=16, method=method, lr=lr, warmup_epoch=0, weight_decay=0.0, seed=1)


@pytest.mark.slow  # about 19 s on a loaded 2-core CPU: two full-depth trainings
def test_coop_finds_a_planted_prompt(vit: LoadedClip) -> None:
    """CoOp from a random context must reach LEARNED_MIN and beat the hand-crafted prompt by MARGIN_MIN; the same
    run with the context frozen (measured 0.51; the learned one 1.0, the hand-crafted prompt 0.585) must not."""
    x_train, y_train, x_test, y_test = _planted_problem(vit)
    hand = _hand_crafted(vit, x_test, y_test)

    def trained(method: str) -> float:
        config = _planted_config(MethodSpec.of(method, n_ctx=M))
        result = train_prompt(x_train, y_train, vit, NAMES, config, val_feats=x_test, val_labels=y_test)
        assert result.history[0].epoch == 1 and result.history[-1].val_acc is not None
        return result.history[-1].val_acc

    learned = trained("coop")
    with frozen("coop", "ctx") as control:
        still = trained(control)  # the context frozen at its random init: the same loop, nothing learns
    assert learned >= LEARNED_MIN, (learned, hand, still)
    assert learned - hand >= MARGIN_MIN, (learned, hand, still)
    assert still < LEARNED_MIN and learned - still >= MARGIN_MIN, (learned, hand, still)


@pytest.mark.slow  # 11-18 s each on a loaded 2-core CPU
@pytest.mark.parametrize("label", ["kgcoop_w2", "prograd_m4"])
def test_zero_shot_regularised_methods_find_a_planted_prompt_and_a_frozen_prompt_does_not(
    vit: LoadedClip, label: str
) -> None:
    """KgCoOp (M = 4 from "a photo of a") and ProGrad (M = 4 from the template's words, lambda = T = 1) pull towards
    the hand-crafted prompt, here the planted problem's "a photo of a {}.", and must still find the hidden one; both
    start AT the hand-crafted prompt. KgCoOp at W = 2, not the paper's 8: the planted prompt lies far from the
    hand-crafted one and W = 8 holds the learned one near it (69% here after 6 epochs), which is the penalty's
    purpose, not a failure to learn (its formula is tested in test_kgcoop.py). 4 epochs (both reach 98-100% at the
    third). Control in the same test: the run with the context frozen (lr 1e-12; one epoch, as nothing moves) stays at
    the hand-crafted prompt's accuracy and fails the thresholds."""
    x_train, y_train, x_test, y_test = _planted_problem(vit)
    hand = _hand_crafted(vit, x_test, y_test)
    accuracy = []
    for lr, epochs in ((0.5, 4), (1e-12, 1)):
        config = dataclasses.replace(_planted_config(MethodSpec.parse(label), lr), max_epoch=epochs)
        result = train_prompt(x_train, y_train, vit, NAMES, config, val_feats=x_test, val_labels=y_test,
                              template="a photo of a {}.")
        accuracy.append(result.history[-1].val_acc)
    learned, frozen_acc = accuracy
    assert learned is not None and frozen_acc is not None
    assert learned >= LEARNED_MIN and learned - hand >= MARGIN_MIN, (learned, hand)
    assert frozen_acc == pytest.approx(hand) and not (frozen_acc >= LEARNED_MIN or frozen_acc - hand >= MARGIN_MIN), (
        frozen_acc, hand)


SHIFT_SIGMA, STYLE = 1.5, 0.5  # CoCoOp's hidden shift before it is fitted (per coordinate), the style component
COCOOP_LAYERS, COCOOP_CLASSES = 2, 4
COCOOP_MIN = 0.77  # measured on 100 held-out images: trained CoCoOp 0.90; frozen Meta-Net 0.49; plain CoOp (4x the
# epochs) 0.63; the classifier of one domain 0.53; the hidden conditional prompt (Bayes) >= 0.95, asserted. The bar
# halves the gap between the trained CoCoOp and the best control


def _opposite_shift(clip: LoadedClip, hidden: torch.Tensor, shift: torch.Tensor, steps: int = 40) -> torch.Tensor:
    """A shift v (width,) for which the class structures of the prompts c* + v and c* - v are opposite.

    Why: with a random v, the two domains' class features share the part the class names bring through any context,
    so one context between them (c*) fits both, and plain CoOp reaches the bar given epochs enough (measured: 0.99
    after 24 epochs). Fitted so that each class's deviation from the class mean at c* + v is minus that at c* - v,
    the part both domains share is gone: a single classifier that is right on one domain is wrong on the other
    (label = domain x structure: an XOR, which no linear classifier separates), while the prompt c* + z v, which
    CoCoOp's Meta-Net can produce from the image's domain, stays exact. Minimises
    ``|dev(+) + dev(-)|^2 / (|dev(+)|^2 + |dev(-)|^2)`` with Adam; the prompt is linear in v, so v's gradient is the
    sum over context tokens of the two learners' context gradients."""
    encoder = PromptTextEncoder(clip)
    plus, minus = (CoOpLearner(clip, NAMES[:COCOOP_CLASSES], n_ctx=M, generator=torch.Generator()) for _ in range(2))
    v = shift.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=0.2)
    for _ in range(steps):
        with torch.no_grad():
            plus.ctx.copy_(hidden + v)
            minus.ctx.copy_(hidden - v)
        plus.zero_grad()
        minus.zero_grad()
        a, b = encoder(plus), encoder(minus)  # (K, D) each
        a, b = a - a.mean(0), b - b.mean(0)
        ((a + b).pow(2).sum() / (a.pow(2).sum() + b.pow(2).sum())).backward()
        optimizer.zero_grad()
        v.grad = plus.ctx.grad.sum(0) - minus.ctx.grad.sum(0)
        optimizer.step()
    return v.detach()


@pytest.mark.slow  # about 16 s on a loaded 2-core CPU: three trainings and the fitted shift
def test_cocoop_finds_a_planted_conditional_prompt(vit: LoadedClip) -> None:
    """Two hidden image "domains" z = +-1: the prompt that made an image is c* + z v (v the same for every context
    token, as a Meta-Net shift is), with v fitted so that no single context fits both domains (see
    :func:`_opposite_shift`); the image carries its domain as a style component z u (u a unit vector) beside
    t_k(c* + z v) and the noise. Trained CoCoOp (context and Meta-Net) must clear COCOOP_MIN; in the same test the
    same CoCoOp with its Meta-Net frozen at init, and plain CoOp trained four times as long, must stay below it.
    Text tower cut to its first COCOOP_LAYERS blocks (random weights, frozen) and 4 classes: CoCoOp runs B x K
    sequences per step, and a full-depth run would not fit the suite's time budget on a shared 2-core CPU; the
    path's exactness at full depth is tested in test_cocoop.py. Batch 16, not the paper's 1, for the same reason;
    evaluation through ``predict_logits`` on a learner rebuilt from the result.
    """
    from coopipe.learners import predict_logits, restore_learner

    model = copy.deepcopy(vit.model, memo={id(vit.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:COCOOP_LAYERS]
    clip = dataclasses.replace(vit, model=model)
    names = NAMES[:COCOOP_CLASSES]
    width = model.token_embedding.weight.shape[1]
    gen = torch.Generator().manual_seed(8)
    hidden = SIGMA * torch.randn(M, width, generator=gen)  # c*
    shift = _opposite_shift(clip, hidden, SHIFT_SIGMA * torch.randn(width, generator=gen))  # v
    style = F.normalize(torch.randn(clip.embed_dim, generator=gen), dim=0)  # u
    text = {z: _planted_text(clip, hidden + z * shift, names) for z in (1, -1)}  # (K, D) per domain
    scale = clip.model.logit_scale

    def synth(per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(names)).repeat(per_class)
        z = torch.randint(2, (len(labels),), generator=gen) * 2 - 1  # (N,) domain
        planted = torch.where(z[:, None] > 0, text[1][labels], text[-1][labels])  # (N, D)
        return planted + STYLE * z[:, None] * style + _noise(len(labels), clip.embed_dim, gen), labels, z

    (x_train, y_train, _), (x_test, y_test, z_test) = synth(TRAIN_PER_CLASS), synth(TEST_PER_CLASS)
    bayes = torch.where(z_test[:, None] > 0, coop_logits(x_test, text[1], scale), coop_logits(x_test, text[-1], scale))
    assert _accuracy(bayes, y_test) >= 0.95  # the hidden conditional prompt
    one_domain = _accuracy(coop_logits(x_test, text[1], scale), y_test)

    def trained(method: str, epochs: int = 6) -> float:
        config = TrainConfig(method=MethodSpec.of(method, n_ctx=M), max_epoch=epochs, batch_size=16, lr=0.5,
                             warmup_epoch=0, weight_decay=0.0, seed=1)
        result = train_prompt(x_train, y_train, clip, names, config)
        learner = restore_learner(config.method, clip, names, result.params)
        return _accuracy(predict_logits(learner, PromptTextEncoder(clip), x_test, scale), y_test)

    learned = trained("cocoop")
    with frozen("cocoop", "meta_net") as control:
        fixed_meta = trained(control)
    single = trained("coop", epochs=24)
    found = (learned, fixed_meta, single, one_domain)
    assert learned >= COCOOP_MIN, found
    assert fixed_meta < COCOOP_MIN and single < COCOOP_MIN and one_domain < COCOOP_MIN, found


RANKS, RANK_CTX, RANK_LAYERS = 11, 16, 2
RANK_NOISE = 0.05  # norm of the Gaussian image noise against unit text features
RANK_EXP_MAX, RANK_ARGMAX_MAX = 1.0, 0.7  # MAE bars (years = ranks), see the test's docstring


@pytest.mark.slow  # about 21 s on a loaded 2-core CPU: three rank-prompt trainings
def test_rank_prompts_find_planted_ranks(rn50: LoadedClip) -> None:
    """A hidden rank prompt (context N(0, 1) of 16 tokens, 3 base ranks N(0, 1), interpolated to 11 ranks) generates
    the image features (its text feature of the rank plus noise); a fresh learner (random context, random base
    ranks) trains through the production loop with the method's optimiser (RAdam; lr 0.2, no weight decay, 15
    epochs: the paper's 1e-4 over 100 epochs would not fit the suite) and must find the ranks again. In the same
    test the context frozen at its init, and the base ranks frozen at theirs, must not.

    Measured (seeds fixed, 2-core CPU): the constant predictor (train median) scores 2.82 (expectation) over 11
    ranks; the hidden prompt 1.82 / 0.0 (expectation / arg-max: near-collinear random-weight features leave the
    softmax several ranks wide, which bounds the expectation); trained 0.66 / 0.51; context frozen 2.57 / 1.93;
    base ranks frozen 1.33 / 0.88. Bars 1.0 / 0.7 lie between, about a third of the gap from each side."""
    import math

    import numpy as np
    from coopipe.methods.rank import RankOptions
    from coopipe.ordinal import evaluate_ages, median_predictor_mae
    from coopipe.learners import restore_learner
    from coopipe.rank_prompt import RankPromptLearner

    model = copy.deepcopy(rn50.model, memo={id(rn50.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:RANK_LAYERS]
    clip = dataclasses.replace(rn50, model=model)
    encoder = PromptTextEncoder(clip)
    names, generator = [str(r) for r in range(RANKS)], torch.Generator().manual_seed(0)
    hidden = RankPromptLearner(clip, RANKS, n_ctx=RANK_CTX, generator=generator)
    with torch.no_grad():
        hidden.ctx.normal_(0.0, 1.0, generator=generator)
        hidden.rank_embeds.normal_(0.0, 1.0, generator=generator)
        planted = hidden.class_text_features(encoder).float()  # (K, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, RANKS, (n,), generator=generator)
        noise = torch.randn(n, planted.shape[1], generator=generator) * (RANK_NOISE / math.sqrt(planted.shape[1]))
        return planted[y] + noise, y

    (x_train, y_train), (x_test, y_test) = draw(256), draw(400)
    scale = torch.tensor(math.log(100.0))  # CLIP's trained scale; the random model's 1/0.07 is flatter still
    with torch.no_grad():
        clip.model.logit_scale.fill_(float(scale))
    constant = median_predictor_mae(y_train.numpy(), y_test.numpy())

    def trained(method: str) -> tuple[float, float]:
        config = TrainConfig(method=MethodSpec(method, RankOptions(n_ctx=RANK_CTX, ctx_init=None)), max_epoch=15,
                             batch_size=64, lr=0.2, weight_decay=0.0, warmup_epoch=0, drop_last=False, seed=1)
        result = train_prompt(x_train, y_train, clip, names, config)
        learner = restore_learner(config.method, clip, names, result.params)
        with torch.no_grad():
            found = evaluate_ages(learner.logits(encoder, x_test, scale), y_test, np.arange(RANKS))
        return found.mae_exp, found.mae_max

    learned = trained("rank")
    with frozen("rank", "ctx") as control:
        fixed_ctx = trained(control)
    with frozen("rank", "rank_embeds") as control:
        fixed_ranks = trained(control)
    found = {"constant": constant, "learned": learned, "context frozen": fixed_ctx, "ranks frozen": fixed_ranks}
    assert learned[0] < RANK_EXP_MAX and learned[1] < RANK_ARGMAX_MAX, found
    for control in (fixed_ctx, fixed_ranks):
        assert control[0] > RANK_EXP_MAX and control[1] > RANK_ARGMAX_MAX, found
