"""CoCoOp: the Meta-Net and learner, and exactness of the batched text path against open_clip's plain path.

The reference written here is CoCoOp's own computation, independent of the learner's buffers and of the packed
path: the prompts ``"a photo of a {name}."`` tokenised with the model's tokenizer, the context positions replaced by
``ctx + h(x)`` (h = linear2(relu(linear1(x / |x|)))), then one image at a time the full 77-token sequence through
open_clip as ``encode_text`` does (token embedding -> + positional -> transformer with the causal mask ->
ln_final -> [EOS] -> projection -> normalise). Float64 copies of the text towers cut to a few blocks (as in
test_text_parity.py: exactness does not depend on depth, several blocks check the carried prefix), RN50 (and
ViT-B-32 in the slow tier), class names of uneven lengths, chunking over images and classes, small attention bins, checkpointing.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from coopipe import text_encoder
from coopipe.cocoop import CoCoOpLearner, build_meta_net
from coopipe.cocoop_text import cocoop_backward, cocoop_logits, cocoop_predict, cocoop_text_features
from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip, load_clip
from coopipe.text_encoder import PromptTextEncoder

# ViT-B-32's text tower is RN50's (width 512, 8 heads) with another embedding width (512, not 1024): the fast tier runs
# RN50, the slow tier both
MODELS = ("RN50", pytest.param("ViT-B-32", marks=pytest.mark.slow))
NAMES = ["a", "golden retriever", "st. bernard with a very long name", "x y"]  # uneven token counts
TIGHT = 1e-10  # float64
LAYERS = 3
B = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def clip64(request: pytest.FixtureRequest) -> LoadedClip:
    """A float64 copy of the model's text tower cut to its first LAYERS blocks (the image tower dropped)."""
    clip = load_clip(request.param, "none")
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:LAYERS]
    return dataclasses.replace(clip, model=model.double())


def _reference_logits(clip: LoadedClip, learner: CoCoOpLearner, images: torch.Tensor) -> torch.Tensor:
    """CoCoOp's logits, one image at a time over the plain 77-token path (see the module docstring)."""
    model = clip.model
    init = learner.ctx_init or " ".join(["X"] * learner.n_ctx)
    tokens = torch.as_tensor(clip.tokenizer([f"{init} {name}." for name in NAMES]))  # (K, 77)
    eos = tokens.argmax(dim=-1)  # (K,)
    embeds = model.token_embedding(tokens)  # (K, 77, width)
    m = learner.n_ctx
    net = learner.meta_net
    rows = []
    for x in images:
        x = x / x.norm()  # (D,)
        h = net.linear2(torch.relu(net.linear1(x)))  # (width,)
        ctx = (learner.ctx + h).unsqueeze(0).expand(len(NAMES), -1, -1)  # (K, M, width)
        prompts = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + m :]], dim=1)  # (K, 77, width)
        t = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
        t = model.ln_final(t)[torch.arange(len(NAMES)), eos] @ model.text_projection  # (K, D)
        t = t / t.norm(dim=-1, keepdim=True)
        rows.append(model.logit_scale.exp() * t @ x)  # (K,)
    return torch.stack(rows)  # (B, K)


def _learner(clip: LoadedClip, spec: MethodSpec, seed: int = 0) -> CoCoOpLearner:
    learner = spec.build_learner(clip, NAMES, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a Meta-Net shift as large as the context, so that the image matters
        learner.meta_net.linear2.weight.mul_(20.0)
    return learner


def test_meta_net_is_the_reference_shape_and_deterministic() -> None:
    net = build_meta_net(512, 768, generator=torch.Generator().manual_seed(3))
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear"]
    assert tuple(net.linear1.weight.shape) == (32, 512) and tuple(net.linear2.weight.shape) == (768, 32)
    again = build_meta_net(512, 768, generator=torch.Generator().manual_seed(3))
    other = build_meta_net(512, 768, generator=torch.Generator().manual_seed(4))
    for a, b, c in zip(net.parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)
    bound = 1 / 512**0.5  # nn.Linear's default init range
    assert 0.9 * bound < float(net.linear1.weight.detach().abs().max()) <= bound


def test_learner_from_spec(clip64: LoadedClip) -> None:
    learner = CoCoOpLearner(clip64, NAMES, generator=torch.Generator().manual_seed(0))
    assert learner.n_ctx == 4 and learner.ctx_init == "a photo of a"  # the reference setting
    words = torch.as_tensor(clip64.tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.equal(learner.ctx.detach(), clip64.model.token_embedding.weight[words])
    assert sorted(learner.state_dict()) == [
        "ctx", "meta_net.linear1.bias", "meta_net.linear1.weight", "meta_net.linear2.bias", "meta_net.linear2.weight",
    ]
    assert learner.config()["method"] == "cocoop"
    with pytest.raises(ParamsError, match="depend on the image"):
        learner.class_text_features(PromptTextEncoder(clip64))
    spec = MethodSpec.of("cocoop", n_ctx=3)  # random init, drawn from the generator
    a, b = (spec.build_learner(clip64, NAMES, generator=torch.Generator().manual_seed(s)) for s in (5, 5))
    assert a.ctx.shape == (3, a.ctx.shape[1]) and a.ctx_init is None
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_batched_path_equals_per_image_plain_loop(clip64: LoadedClip, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and the gradients of ctx and of every Meta-Net parameter, in every chunking, equal the plain loop."""
    learner = _learner(clip64, MethodSpec("cocoop"))
    params = [learner.ctx, *learner.meta_net.parameters()]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, clip64.embed_dim, generator=gen, dtype=torch.float64) * 3.0
    labels = torch.tensor([1, 2, 0])

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(F.cross_entropy(logits, labels), params))

    ref = _reference_logits(clip64, learner, images)
    ref_grads = grads(ref)
    assert all(float(g.abs().max()) > 0 for g in ref_grads)
    shifts = learner.shifts(images).detach()
    assert float((shifts[0] - shifts[1]).norm()) > 0.1 * float(learner.ctx.detach().norm(dim=-1).mean())  # the image matters
    for options, image_chunk, bin_rows in (
        ({}, None, text_encoder.BIN_ROWS),
        ({"class_chunk": 3}, 2, text_encoder.BIN_ROWS),  # images 2 + 1, classes 3 + 1
        ({"class_chunk": 2, "checkpoint_chunks": True}, 1, 8),  # bins smaller than the longest class
        ({}, 2, 1),  # one class per bin
        ({"share_prefix": False, "class_chunk": 3}, 2, text_encoder.BIN_ROWS),  # the batched plain path (cut)
        ({"share_prefix": False, "cut": False}, None, text_encoder.BIN_ROWS),
    ):
        monkeypatch.setattr(text_encoder, "BIN_ROWS", bin_rows)
        encoder = PromptTextEncoder(clip64, **options)
        logits = cocoop_logits(encoder, learner, images, clip64.model.logit_scale, image_chunk=image_chunk)
        assert logits.shape == (B, len(NAMES))
        assert torch.allclose(logits, ref, rtol=0, atol=TIGHT), (options, image_chunk, bin_rows)
        for g, r in zip(grads(logits), ref_grads):
            assert torch.allclose(g, r, rtol=0, atol=TIGHT), (options, image_chunk, bin_rows)


def test_chunked_backward_equals_the_plain_loops_gradients(clip64: LoadedClip) -> None:
    """Training's chunk-by-chunk backward (each image chunk's summed loss / B, back-propagated at once, no
    recomputation) accumulates the gradients of the batch's mean loss through the plain 77-token loop."""
    learner = _learner(clip64, MethodSpec("cocoop"))
    params = [learner.ctx, *learner.meta_net.parameters()]
    images = torch.randn(5, clip64.embed_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3.0
    labels = torch.tensor([1, 2, 0, 3, 1])
    ref = _reference_logits(clip64, learner, images)
    ref_loss = F.cross_entropy(ref, labels)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for options, image_chunk in (({}, 2), ({"class_chunk": 3}, 1), ({"checkpoint_chunks": True}, None)):
        for p in params:
            p.grad = None
        encoder = PromptTextEncoder(clip64, **options)
        loss, logits = learner.loss_backward(encoder, images, labels, clip64.model.logit_scale, image_chunk=image_chunk)
        assert not loss.requires_grad and not logits.requires_grad
        assert torch.allclose(logits, ref, rtol=0, atol=TIGHT), (options, image_chunk)
        assert abs(float(loss) - float(ref_loss.detach())) < TIGHT
        for p, r in zip(params, ref_grads):
            assert p.grad is not None and torch.allclose(p.grad, r, rtol=0, atol=TIGHT), (options, image_chunk)
    with pytest.raises(ParamsError, match="one target per image"):
        cocoop_backward(encoder, learner, images, labels[:3], clip64.model.logit_scale)


def test_text_features_and_predict(clip64: LoadedClip) -> None:
    learner = _learner(clip64, MethodSpec("cocoop"))
    images = torch.randn(7, clip64.embed_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    encoder = PromptTextEncoder(clip64, class_chunk=3)
    feats = cocoop_text_features(encoder, learner, images, image_chunk=4)
    assert feats.shape == (7, len(NAMES), clip64.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(7, len(NAMES), dtype=torch.float64), atol=1e-12)
    seen: list[int] = []
    with torch.no_grad():
        expected = cocoop_logits(encoder, learner, images, clip64.model.logit_scale).float()
    got = cocoop_predict(encoder, learner, images, clip64.model.logit_scale, batch_size=3, image_chunk=2,
                         progress=seen.append)
    assert seen == [3, 3, 1] and got.dtype == torch.float32 and not got.requires_grad
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_cocoop_training_resumes_exactly_from_a_checkpoint(clip64: LoadedClip, tmp_path) -> None:
    """A CoCoOp run stopped after epoch 1, saved, loaded and resumed equals the uninterrupted run bit for bit:
    the checkpoint holds the Meta-Net's parameters and every momentum buffer (ctx's and the Meta-Net's)."""
    from coopipe.checkpoint import load_checkpoint, save_checkpoint
    from coopipe.learners import predict_logits, restore_learner
    from coopipe.train import train_prompt
    from coopipe.train_config import TrainConfig

    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(len(NAMES)).repeat(2)  # (8,)
    feats = torch.randn(len(labels), 2, clip64.embed_dim, generator=gen)  # (N, V, D)
    config = TrainConfig.for_method("cocoop", 16, max_epoch=3, batch_size=3, class_chunk=3, image_chunk=2)
    assert (config.method.n_ctx, config.method.ctx_init, config.method.method) == (4, "a photo of a", "cocoop")
    val = {"val_feats": feats[:, 0], "val_labels": labels}
    full = train_prompt(feats, labels, clip64, NAMES, config, **val)
    part = train_prompt(feats, labels, clip64, NAMES, config, stop_after=1, **val)
    assert set(part.state.momentum) == set(part.state.params) == set(full.params)  # every buffer is saved
    save_checkpoint(tmp_path / "ckpt", clip=clip64, classnames=NAMES, config=config, state=part.state)
    state = load_checkpoint(tmp_path / "ckpt").train_state()
    resumed = train_prompt(feats, labels, clip64, NAMES, config, resume_state=state, **val)
    assert torch.equal(resumed.ctx, full.ctx) and not torch.equal(part.ctx, full.ctx)
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert [(r.loss, r.val_acc) for r in resumed.history] == [(r.loss, r.val_acc) for r in full.history]
    assert all(r.val_acc is not None for r in full.history)
    learner = restore_learner(config.method, clip64, NAMES, load_checkpoint(tmp_path / "ckpt").learner_tensors)
    logits = predict_logits(learner, PromptTextEncoder(clip64), feats[:, 0], clip64.model.logit_scale, batch_size=5)
    assert logits.shape == (len(labels), len(NAMES))


def test_building_a_learner_leaves_the_global_rng_alone(clip64: LoadedClip) -> None:
    before = torch.get_rng_state()
    MethodSpec.of("cocoop", n_ctx=2).build_learner(clip64, NAMES, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
