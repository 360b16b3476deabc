"""KgCoOp: its loss and gradient against the paper's formula, recomputed here on the plain open_clip path in float64
(``tests/prompt_reference.py``), its paper setting and labels, and one run of the CLI (train, eval, predict).

The formula, from ``htyao89/KgCoOp: trainers/kgcoop.py``: ``CE(s * x^ t^T, y) + W (1 - mean_k cos(t_k, t0_k))``,
``t`` the learned prompt's class text features, ``t0`` the hand-crafted template's, ``s = exp(logit_scale)``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_cache
from prompt_reference import context_text_features, fit_data, float64_text_tower, hand_crafted_features

from coopipe.learners import StepInputs
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "golden retriever", "x y"]
TEMPLATE = "a centered satellite photo of {}."
TIGHT = 1e-10  # float64


@pytest.fixture(scope="module")
def clip64(rn50: LoadedClip) -> LoadedClip:
    return float64_text_tower(rn50, layers=2)


@pytest.mark.parametrize("label", ["kgcoop", "kgcoop_w0.5"])
def test_loss_and_gradient_follow_the_paper(clip64: LoadedClip, label: str) -> None:
    spec = MethodSpec.parse(label)
    learner = spec.build_learner(clip64, NAMES, generator=torch.Generator())
    spec.definition.prepare(learner, fit_data(clip64, NAMES, TEMPLATE))
    words = torch.as_tensor(clip64.tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.equal(learner.ctx.detach(), clip64.model.token_embedding.weight[words])  # the paper's init, M = 4
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init, so that the penalty and its gradient are not small
        learner.ctx.add_(0.5 * torch.randn(learner.ctx.shape, generator=gen, dtype=torch.float64))
    images = 3.0 * torch.randn(5, clip64.embed_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1])
    scale = clip64.model.logit_scale

    text = learner.class_text_features(PromptTextEncoder(clip64))
    loss = learner.loss(coop_logits(images, text, scale), labels, StepInputs(image=images, text=text, logit_scale=scale))
    (grad,) = torch.autograd.grad(loss, learner.ctx)

    ctx = learner.ctx.detach().clone().requires_grad_(True)
    t = context_text_features(clip64, ctx, NAMES, "a photo of a")
    t0 = hand_crafted_features(clip64, NAMES, TEMPLATE)
    logits = scale.exp() * (images / images.norm(dim=-1, keepdim=True)) @ t.T
    gap = 1.0 - ((t * t0).sum(dim=-1) / (t.norm(dim=-1) * t0.norm(dim=-1))).mean()
    ref = F.cross_entropy(logits, labels) + spec.kg_weight * gap
    (ref_grad,) = torch.autograd.grad(ref, ctx)
    assert float(gap.detach()) > 1e-3 and spec.kg_weight == (8.0 if label == "kgcoop" else 0.5)
    torch.testing.assert_close(loss, ref, rtol=TIGHT, atol=TIGHT)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=TIGHT * float(ref_grad.abs().max()))


def test_paper_setting_and_labels() -> None:
    config = TrainConfig.for_method("kgcoop", 1)
    assert (config.max_epoch, config.batch_size, config.lr, config.warmup_epoch) == (100, 128, 0.002, 1)
    assert TrainConfig.for_method("kgcoop", 16).max_epoch == 100
    spec = MethodSpec.parse("kgcoop_csc_w2")
    assert (spec.kg_weight, spec.csc, spec.readable()) == (2.0, True, "KgCoOp (CSC, W=2)")
    assert MethodSpec.of("kgcoop", kg_weight=8).label() == "kgcoop" and MethodSpec.of("kgcoop", n_ctx=16).label() == "kgcoop_m16"
    assert MethodSpec("kgcoop").transferable and not spec.transferable
    with pytest.raises(Exception, match="kg_weight must be"):
        MethodSpec.of("kgcoop", kg_weight=-1.0)


def test_cli_trains_evaluates_and_predicts(rn50: LoadedClip, tmp_path) -> None:
    from coopipe.checkpoint import load_checkpoint, load_classifier
    from coopipe.cli import app
    from coopipe.features import select_store
    from coopipe.predict import predict

    names = ["cat", "dog", "sea or lake"]
    cache = make_toy_cache(tmp_path / "cache", rn50, names, {"train": (2, 1), "val": (1, 1), "test": (2, 1)})
    run = tmp_path / "run"
    app(args=["--log-level", "WARNING", "train", "--features", str(cache), "--dataset", "toy", "--shots", "2",
              "--seed", "1", "--out", str(run), "--method", "kgcoop_w4", "--max-epoch", "2", "--no-progress"],
        standalone_mode=False)
    ckpt = load_checkpoint(run)
    assert ckpt.complete and ckpt.method.label() == "kgcoop_w4" and ckpt.config.batch_size == 128
    assert set(ckpt.learner_tensors) == {"ctx"} and ckpt.method.kg_weight == 4.0  # the anchor is not stored
    assert load_classifier(run).text_features.shape == (3, rn50.embed_dim)  # a K x D classifier, as CoOp's
    app(args=["--log-level", "WARNING", "eval", str(run), "--features", str(cache)], standalone_mode=False)
    assert json.loads((run / "metrics.json").read_text())["method"] == "kgcoop_w4"
    store = select_store(cache, "toy", "test", model=rn50.name, weights=rn50.weights_id)
    assert len(predict(run, store=store.path, topk=1)) == 6
