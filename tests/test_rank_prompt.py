"""OrdinalCLIP's rank prompts: layout against open_clip's ``encode_text``, the packed text path against the plain
one (features and gradients), the interpolation weights, and a planted-rank learning test."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip
from coopipe.ordinal import evaluate_ages, median_predictor_mae
from coopipe.methods import Optimization, register, unregister
from coopipe.methods.rank import RankOptions, RankPrompts
from coopipe.rank_prompt import RankPromptLearner, interpolation_weights
from coopipe.text_encoder import PromptTextEncoder
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

AGE_INIT = "age estimation: the age of the person is"  # OrdinalCLIP's MORPH context init


pytestmark = pytest.mark.usefixtures("one_thread")


def _shallow(clip: LoadedClip, layers: int, dtype: torch.dtype) -> LoadedClip:
    """A copy of ``clip``'s text tower cut to its first ``layers`` blocks (no image tower)."""
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:layers]
    return dataclasses.replace(clip, model=model.to(dtype))


def test_interpolation_weights_are_the_references_linear_ones() -> None:
    w = interpolation_weights(5, 3)  # bases at ranks 0, 2, 4; w = 1 - |r - c| / 4, normalised
    np.testing.assert_allclose(w[1].numpy(), np.array([0.75, 0.75, 0.25]) / 1.75)
    np.testing.assert_allclose(w[0].numpy(), np.array([1.0, 0.5, 0.0]) / 1.5)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0)


def test_built_from_the_method_seam(rn50: LoadedClip) -> None:
    ranks = [str(r) for r in range(101)]
    learner = MethodSpec.of("rank", ctx_init=AGE_INIT, n_base_ranks=4).build_learner(rn50, ranks)
    assert learner.n_ctx == 10 and learner.rank_embeds.shape == (4, 512)
    assert learner.config() == {"n_ranks": 101, "n_ctx": 10, "ctx_init": AGE_INIT, "n_base_ranks": 4}
    assert {n for n, _ in learner.named_parameters()} == {"ctx", "rank_embeds"}
    with pytest.raises(ParamsError, match="n_base_ranks must be an integer >= 2"):
        MethodSpec.of("rank", n_base_ranks=1)
    a = MethodSpec("rank").build_learner(rn50, ranks[:5], generator=torch.Generator().manual_seed(3))
    b = MethodSpec("rank").build_learner(rn50, ranks[:5], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ctx, b.ctx) and torch.equal(a.rank_embeds, b.rank_embeds)


class AdamRankPrompts(RankPrompts):
    """Rank prompts trained with Adam: a method that declares its own optimiser (the planted-rank test's)."""

    name = "rankadam"

    def optimizer(self, params, opt: Optimization) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(params.values()), lr=opt.lr, weight_decay=opt.weight_decay)


@torch.no_grad()
def test_layout_matches_encode_text(rn50: LoadedClip) -> None:
    """With every base rank set to the embedding of 'person', each rank prompt is the sentence below."""
    learner = RankPromptLearner(rn50, 5, ctx_init=AGE_INIT)
    word = torch.as_tensor(rn50.tokenizer(["person"]))[0, 1]
    learner.rank_embeds.copy_(rn50.model.token_embedding.weight[word].expand(3, -1))
    expected = rn50.model.encode_text(rn50.tokenizer([f"{AGE_INIT} person."]), normalize=True)  # (1, D)
    for encoder in (PromptTextEncoder(rn50), PromptTextEncoder(rn50, cut=False, share_prefix=False)):
        got = learner.class_text_features(encoder)  # (5, D)
        torch.testing.assert_close(got, expected.expand(5, -1), atol=1e-5, rtol=0)


def test_packed_path_equals_plain_path_features_and_gradients(rn50: LoadedClip) -> None:
    clip = _shallow(rn50, 3, torch.float64)
    learner = RankPromptLearner(clip, 7, n_ctx=4, generator=torch.Generator().manual_seed(0))
    images = torch.randn(6, clip.embed_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 3, 6, 1, 2])
    scale = clip.model.logit_scale.detach()
    results = []
    for encoder in (PromptTextEncoder(clip), PromptTextEncoder(clip, cut=False, share_prefix=False)):
        learner.zero_grad()
        features = learner.class_text_features(encoder)
        learner.loss(learner.logits(encoder, images, scale), labels).backward()
        results.append((features.detach(), learner.ctx.grad.clone(), learner.rank_embeds.grad.clone()))
    (fast, ctx_fast, rank_fast), (plain, ctx_plain, rank_plain) = results
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(ctx_fast, ctx_plain, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(rank_fast, rank_plain, atol=1e-10, rtol=1e-8)
    assert rank_fast.abs().sum() > 0 and ctx_fast.abs().sum() > 0


def test_planted_ranks_are_learned(rn50: LoadedClip) -> None:
    """A hidden rank prompt generates the image features; a fresh learner must find the ranks again.

    Random weights carry no age signal, so the signal is planted: image features of rank r are the hidden prompt's
    text feature of r plus Gaussian noise (norm ~0.05 against unit features). Thresholds, from runs on a 2-core
    CPU (seeds fixed): the constant predictor (train median, the best constant for MAE) scores ~4.9 years over 21
    ranks and an untrained learner ~5.2; the hidden prompt itself reaches ~0.74 (expectation) / 0.0 (arg-max): with
    random-weight features nearly collinear (adjacent ranks at cosine 0.9994), CLIP's logit scale leaves the
    softmax a few ranks wide, which bounds the expectation decoding. The trained learner reached 1.35 / 0.77, so
    the bars are 40% (expectation) and 30% (arg-max) of the constant predictor's MAE: far below it, with margin.
    """
    clip = _shallow(rn50, 2, torch.float32)
    encoder = PromptTextEncoder(clip)
    n_ranks, generator = 21, torch.Generator().manual_seed(0)
    hidden = RankPromptLearner(clip, n_ranks, n_ctx=4, generator=generator)
    with torch.no_grad():
        hidden.ctx.normal_(0.0, 1.0, generator=generator)
        hidden.rank_embeds.normal_(0.0, 1.0, generator=generator)  # 3 ordered bases, interpolated
        planted = hidden.class_text_features(encoder).float()  # (K, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, n_ranks, (n,), generator=generator)
        noise = torch.randn(n, planted.shape[1], generator=generator) * (0.05 / math.sqrt(planted.shape[1]))
        return planted[y] + noise, y

    (x_train, y_train), (x_test, y_test) = draw(160), draw(400)
    scale = torch.tensor(math.log(100.0))  # CLIP's trained scale; the random model's 1/0.07 is flatter still
    with torch.no_grad():
        clip.model.logit_scale.fill_(float(scale))
    # the production loop, with a method that declares Adam (cosine lr from 0.05, no warm-up)
    register(AdamRankPrompts())
    try:
        config = TrainConfig(method=MethodSpec("rankadam", RankOptions(n_ctx=4)), max_epoch=30, batch_size=64,
                             lr=0.05, weight_decay=0.0, warmup_epoch=0, drop_last=False, seed=1)
        trained = train_prompt(x_train, y_train, clip, [str(r) for r in range(n_ranks)], config)
        learner = config.method.build_learner(clip, [str(r) for r in range(n_ranks)])
    finally:
        unregister("rankadam")
    history = [r.loss for r in trained.history]
    with torch.no_grad():
        for name, param in learner.named_parameters():
            param.copy_(trained.params[name])
        result = evaluate_ages(learner.logits(encoder, x_test, scale), y_test, np.arange(n_ranks))
    constant = median_predictor_mae(y_train.numpy(), y_test.numpy())
    assert history[-1] < history[0]
    assert result.mae_exp < 0.4 * constant, (result.mae_exp, constant)
    assert result.mae_max < 0.3 * constant, (result.mae_max, constant)
