"""OrdinalCLIP's rank prompts and CoOp row: layout against open_clip's ``encode_text``, the packed text path against
the plain one (features and gradients), the interpolation weights, OrdinalCLIP's setting as the paper setting. The
planted-rank learning test, with its controls, is in test_planted.py."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip
from coopipe.methods.rank import RankOptions
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


def test_ordinalclip_setting_is_the_rank_default(rn50: LoadedClip) -> None:
    """The rank prompts' and the age CoOp row's paper setting is OrdinalCLIP's MORPH run (configs/meta_cfgs/
    morph_compare.yaml on configs/default.yaml): context from its words, 3 base ranks, RAdam lr 1e-4 with weight
    decay 5e-4, cosine over 100 epochs, no warm-up, batch 32; a value the user gives wins."""
    assert MethodSpec("rank").options == RankOptions(n_ctx=None, ctx_init=AGE_INIT, n_base_ranks=3)
    assert MethodSpec("rank").resolve(rn50).n_ctx == 10 and MethodSpec("ordcoop").resolve(rn50).n_ctx == 10
    assert MethodSpec("rank").label() == "rank" and MethodSpec.of("rank", n_ctx=16).label() == "rank_m16"
    for method in ("rank", "ordcoop"):
        config = TrainConfig.for_method(method, 4, "utkface")
        assert (config.lr, config.weight_decay, config.warmup_epoch, config.max_epoch, config.batch_size) == (
            1e-4, 5e-4, 0, 100, 32)
        assert config.lr_at(0) == 1e-4 and config.lr_at(50) == pytest.approx(0.5e-4)  # cosine from the first epoch
        optimizer = config.method.definition.optimizer({"p": torch.nn.Parameter(torch.zeros(2))}, config.optimization())
        assert isinstance(optimizer, torch.optim.RAdam)
        assert optimizer.defaults["decoupled_weight_decay"] and optimizer.defaults["weight_decay"] == 5e-4
        assert config.method.definition.ordered_labels and not config.method.transferable
    assert TrainConfig.for_method("rank", 4, lr=0.01, warmup_epoch=1).lr_at(0) == TrainConfig.warmup_lr
    coop = TrainConfig.for_method("coop", 4)
    assert (coop.lr, coop.warmup_epoch) == (0.002, 1)  # CoOp keeps its own


def test_ordinalclip_coop_row_learns_the_rank_names(rn50: LoadedClip) -> None:
    """OrdinalCLIP's CoOp row (``ordcoop``): the rank names start as their words' token embeddings and move during
    training (production loop and optimiser, CE + KL) together with the context; CoOp from the same words keeps
    them frozen. The packed text path equals the plain one, features and gradients, with names of 1 and 2 tokens."""
    from coopipe.ordinal import rank_loss

    clip = _shallow(rn50, 2, torch.float32)
    names = [str(age) for age in range(6, 14)]  # "6".."9": one token each; "10".."13": two
    learner = MethodSpec("ordcoop").build_learner(clip, names)
    assert {n for n, _ in learner.named_parameters()} == {"ctx", "name_embeds"}
    words = clip.model.token_embedding.weight[torch.as_tensor(clip.tokenizer(names))[:, 1:3]]  # (K, 2, width)
    mask = learner.name_mask  # (K, 2)
    assert mask.sum(1).tolist() == [1] * 4 + [2] * 4
    torch.testing.assert_close(learner.name_embeds[mask], words[mask], atol=0, rtol=0)
    frozen = MethodSpec.of("coop", ctx_init=AGE_INIT).build_learner(clip, names)
    assert {n for n, _ in frozen.named_parameters()} == {"ctx"}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, clip.embed_dim, generator=generator)
    y = torch.arange(8).repeat(4)
    logits = torch.randn(32, 8, generator=generator)
    torch.testing.assert_close(learner.loss(logits, y), rank_loss(logits, y))

    config = TrainConfig.for_method("ordcoop", 1, max_epoch=2, seed=1)  # the paper's RAdam 1e-4, 2 epochs
    result = train_prompt(x, y, clip, names, config)
    moved = (result.params["name_embeds"] - learner.name_embeds.detach())[mask].abs().amax(dim=-1)  # (names' tokens,)
    assert bool((moved > 0).all()), moved
    assert not torch.equal(result.params["ctx"], learner.ctx.detach())

    shallow = _shallow(rn50, 2, torch.float64)
    learner = MethodSpec("ordcoop").build_learner(shallow, names)
    with torch.no_grad():
        learner.name_embeds.add_(torch.randn(learner.name_embeds.shape, generator=generator, dtype=torch.float64))
    grads = []
    for encoder in (PromptTextEncoder(shallow), PromptTextEncoder(shallow, cut=False, share_prefix=False)):
        learner.zero_grad()
        features = learner.class_text_features(encoder)  # (K, D)
        (features * torch.linspace(-1, 1, features.shape[1], dtype=torch.float64)).sum().backward()
        grads.append((features.detach(), learner.name_embeds.grad.clone(), learner.ctx.grad.clone()))
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, atol=1e-10, rtol=1e-8)
    assert bool((grads[0][1][~mask] == 0).all()) and bool((grads[0][1][mask].abs().sum(-1) > 0).all())


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
