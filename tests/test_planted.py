"""Learning checks that need no pretrained weights: a prompt planted in a frozen random-weight text tower.

Random-weight CLIP image features carry no class signal, so "CoOp beats zero-shot" on them says little. Here the
signal is planted: ViT-B-32's random text tower (full depth, float32, its real 512-d embedding) and a hidden random
context c* (M = 4, N(0, SIGMA^2) per coordinate) give class text features t_k(c*) of 8 short class names; a
synthetic image of class k is t_k(c*) plus isotropic noise of norm NOISE (for CoCoOp the prompt that made it is
also shifted by a hidden function of the image, see below). Training starts from a random context (and a fresh
Meta-Net) and must classify held-out synthetic images.

Thresholds, and why:
- chance is 1/8. In these random towers all prompts' features are nearly collinear (mean cosine ~0.95), yet the
  planted classes are separable: the Bayes classifier (the hidden prompt itself) scores 100% at this noise.
- a hand-crafted prompt ("a photo of a {}.") is measured, not assumed: the class-name tokens carry part of the
  class direction through any context, so it lands well above chance (58.5% here) but far below the planted prompt;
  a random initial context scores 32-78% depending on its draw (five draws: 0.47, 0.32, 0.78, 0.51, 0.43), for the
  same reason. The learned prompt must reach >= 90% AND beat the hand-crafted prompt by >= 25 points, which neither
  baseline reaches on 200 held-out images (8 x 25).
- a larger learning rate than the paper's (0.5, no warm-up, no weight decay, a few epochs) keeps each test to
  seconds; the method and loop are the library's own (``train_prompt``), only the schedule is shortened.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from coopipe.methods.coop import CoOpLearner
from coopipe.models import LoadedClip, load_clip
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.methods import MethodSpec
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

NAMES = ["cat", "dog", "car", "tree", "boat", "house", "bird", "road"]
M = 4
SIGMA = 1.5  # hidden context, per coordinate
NOISE = 0.5  # norm of the isotropic image noise (text features have norm 1)
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 25
LEARNED_MIN, MARGIN_MIN = 0.90, 0.25


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit() -> LoadedClip:
    return load_clip("ViT-B-32", "none")


def _planted_text(clip: LoadedClip, ctx: torch.Tensor) -> torch.Tensor:
    """Class text features (K, D) of a given context (M, width) through the frozen tower."""
    learner = CoOpLearner(clip, NAMES, n_ctx=M, generator=torch.Generator())
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


def test_coop_finds_a_planted_prompt(vit: LoadedClip) -> None:
    x_train, y_train, x_test, y_test = _planted_problem(vit)
    hand = _hand_crafted(vit, x_test, y_test)
    config = _planted_config(MethodSpec.of("coop", n_ctx=M))
    result = train_prompt(x_train, y_train, vit, NAMES, config, val_feats=x_test, val_labels=y_test)
    learned = result.history[-1].val_acc
    assert result.history[0].epoch == 1 and learned is not None
    assert learned >= LEARNED_MIN, (learned, hand)
    assert learned - hand >= MARGIN_MIN, (learned, hand)


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
    learned, frozen = accuracy
    assert learned is not None and frozen is not None
    assert learned >= LEARNED_MIN and learned - hand >= MARGIN_MIN, (learned, hand)
    assert frozen == pytest.approx(hand) and not (frozen >= LEARNED_MIN or frozen - hand >= MARGIN_MIN), (frozen, hand)


SHIFT_SIGMA, STYLE = 1.5, 0.5  # CoCoOp's hidden prompt shift (per coordinate) and the image's style component
COCOOP_LAYERS = 4


def test_cocoop_finds_a_planted_conditional_prompt(vit: LoadedClip) -> None:
    """Two hidden image "domains" z = +-1: the prompt that made an image is c* + z v, and the image carries its
    domain as a style component z u (u a unit vector) beside t_k(c* + z v) and the noise. A prompt fit to one
    domain only scores ~65% (same-class features of the two domains have cosine ~0.2), the Meta-Net can read z
    from the image. Text tower cut to its first COCOOP_LAYERS blocks (random weights, frozen): CoCoOp runs
    B x K sequences per step, and a full-depth run would not fit the suite's time budget on a shared 2-core CPU;
    the path's exactness at full depth does not depend on depth and is tested in test_cocoop.py. Batch 16, not the
    paper's 1, for the same reason; evaluation through ``predict_logits`` on a learner rebuilt from the result.
    """
    from coopipe.learners import predict_logits, restore_learner

    model = copy.deepcopy(vit.model, memo={id(vit.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:COCOOP_LAYERS]
    clip = dataclasses.replace(vit, model=model)
    width = model.token_embedding.weight.shape[1]
    gen = torch.Generator().manual_seed(8)
    hidden = SIGMA * torch.randn(M, width, generator=gen)  # c*
    shift = SHIFT_SIGMA * torch.randn(width, generator=gen)  # v
    style = F.normalize(torch.randn(clip.embed_dim, generator=gen), dim=0)  # u
    text = {z: _planted_text(clip, hidden + z * shift) for z in (1, -1)}  # (K, D) per domain

    def synth(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(NAMES)).repeat(per_class)
        z = torch.randint(2, (len(labels),), generator=gen) * 2 - 1  # (N,) domain
        planted = torch.where(z[:, None] > 0, text[1][labels], text[-1][labels])  # (N, D)
        return planted + STYLE * z[:, None] * style + _noise(len(labels), clip.embed_dim, gen), labels

    (x_train, y_train), (x_test, y_test) = synth(TRAIN_PER_CLASS), synth(12)
    one_domain = _accuracy(coop_logits(x_test, text[1], clip.model.logit_scale), y_test)
    assert one_domain < 0.8  # the shift matters
    hand = _hand_crafted(clip, x_test, y_test)
    config = TrainConfig(
        method=MethodSpec.of("cocoop", n_ctx=M), max_epoch=6, batch_size=16, lr=0.5, warmup_epoch=0, weight_decay=0.0, seed=1
    )
    result = train_prompt(x_train, y_train, clip, NAMES, config)
    assert result.text_features is None and set(result.params) == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias",
    }
    learner = restore_learner(config.method, clip, NAMES, result.params)
    learned = _accuracy(predict_logits(learner, PromptTextEncoder(clip), x_test, clip.model.logit_scale), y_test)
    assert learned >= LEARNED_MIN, (learned, hand, one_domain)
    assert learned - hand >= MARGIN_MIN, (learned, hand, one_domain)
