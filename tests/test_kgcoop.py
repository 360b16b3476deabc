"""KgCoOp: its loss and gradient against the paper's formula, recomputed here on the plain open_clip path in float64
(``tests/prompt_reference.py``), its paper setting and labels, stacked and resumed runs; and for KgCoOp and ProGrad both, one run of the CLI
(train, eval, predict) and the sweep with its report.

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
    production = coop_logits(images, text, scale)  # the loop's logits of the learner's class text features
    loss = learner.loss(production, labels, StepInputs(image=images, text=text, logit_scale=scale))
    (grad,) = torch.autograd.grad(loss, learner.ctx)

    ctx = learner.ctx.detach().clone().requires_grad_(True)
    t = context_text_features(clip64, ctx, NAMES, "a photo of a")
    t0 = hand_crafted_features(clip64, NAMES, TEMPLATE)
    logits = scale.exp() * (images / images.norm(dim=-1, keepdim=True)) @ t.T
    gap = 1.0 - ((t * t0).sum(dim=-1) / (t.norm(dim=-1) * t0.norm(dim=-1))).mean()
    ref = F.cross_entropy(logits, labels) + spec.kg_weight * gap
    (ref_grad,) = torch.autograd.grad(ref, ctx)
    assert float(gap.detach()) > 1e-3 and spec.kg_weight == (8.0 if label == "kgcoop" else 0.5)
    torch.testing.assert_close(production.detach(), logits.detach(), rtol=TIGHT, atol=TIGHT * float(logits.detach().abs().max()))
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


@pytest.mark.parametrize(("label", "batch"), [("kgcoop_w4", 128), ("prograd_lambda0.8", 32)])
def test_cli_trains_evaluates_and_predicts(rn50: LoadedClip, tmp_path, label: str, batch: int) -> None:
    """KgCoOp and ProGrad through ``coopipe train`` (2 epochs), ``coopipe eval`` and ``predict``."""
    from coopipe.checkpoint import load_checkpoint
    from coopipe.classifier import load_classifier
    from coopipe.cli import app
    from coopipe.features import select_store
    from coopipe.predict import predict

    names = ["cat", "dog", "sea or lake"]
    cache = make_toy_cache(tmp_path / "cache", rn50, names, {"train": (2, 1), "val": (1, 1), "test": (2, 1)})
    run = tmp_path / "run"
    app(args=["--log-level", "WARNING", "train", "--features", str(cache), "--dataset", "toy", "--shots", "2",
              "--seed", "1", "--out", str(run), "--method", label, "--max-epoch", "2", "--no-progress"],
        standalone_mode=False)
    ckpt = load_checkpoint(run)
    assert ckpt.complete and ckpt.method == MethodSpec.parse(label).resolve(rn50) and ckpt.config.batch_size == batch
    assert set(ckpt.learner_tensors) == {"ctx"}  # the zero-shot text features are not stored
    assert load_classifier(run).text_features.shape == (3, rn50.embed_dim)  # a K x D classifier, as CoOp's
    app(args=["--log-level", "WARNING", "eval", str(run), "--features", str(cache)], standalone_mode=False)
    assert json.loads((run / "metrics.json").read_text())["method"] == label
    store = select_store(cache, "toy", "test", model=rn50.name, weights=rn50.weights_id)
    assert len(predict(run, store=store.path, topk=1)) == 6

def test_stacked_runs_and_a_resumed_run_equal_runs_trained_alone(rn50: LoadedClip) -> None:
    """Stacked, each run's penalty reads its own class text features: the summed loss gives each run its own
    gradient. A resumed run computes the zero-shot features again (not stored) and ends where an uninterrupted one
    does. Two runs (other seeds, shots and batches per epoch), 2 epochs, a 3-class toy problem."""
    from coopipe.loop import StackedRun
    from coopipe.stacked import train_stacked
    from coopipe.train import train_prompt

    names = ["cat", "dog", "sea or lake"]
    means = torch.randn(3, rn50.embed_dim, generator=torch.Generator().manual_seed(0))
    runs = []
    for seed, shots in ((1, 1), (2, 2)):
        labels = torch.arange(3).repeat_interleave(shots)
        feats = means[labels] + 0.5 * torch.randn(len(labels), rn50.embed_dim, generator=torch.Generator().manual_seed(seed))
        config = TrainConfig(max_epoch=2, batch_size=2, seed=seed, lr=0.01, method=MethodSpec("kgcoop"))
        runs.append(StackedRun(feats, labels, names, config, template=TEMPLATE))
    stacked = train_stacked(runs, rn50, max_stack=2)
    states = {}
    alone = [train_prompt(r.train_feats, r.train_labels, rn50, names, r.config, template=TEMPLATE,
                          on_epoch=lambda rec, state: states.update({rec.epoch: state})) for r in runs]
    resumed = train_prompt(runs[1].train_feats, runs[1].train_labels, rn50, names, runs[1].config, template=TEMPLATE,
                           resume_state=states[1])  # the second run's state after its first epoch (trained last)
    for a, b in [*zip(stacked, alone), (resumed, alone[1])]:
        torch.testing.assert_close(a.ctx, b.ctx, rtol=1e-5, atol=1e-6)
        assert [r.loss for r in a.history] == pytest.approx([r.loss for r in b.history], rel=1e-5)
    assert not torch.allclose(stacked[0].ctx, stacked[1].ctx)


@pytest.mark.slow
def test_sweep_trains_and_reports_kgcoop_and_prograd(rn50: LoadedClip, tmp_path) -> None:
    """Both methods through the sweep (KgCoOp's two shot counts stacked, ProGrad's alone), eval and the report
    (about 60 s on 2 loaded cores: the sweep's baselines, evaluations and report come with it)."""
    from coopipe.cli import app

    names = ["cat", "dog", "sea or lake"]
    cache = make_toy_cache(tmp_path / "cache", rn50, names, {"train": (2, 1), "val": (1, 1), "test": (2, 1)})
    runs = tmp_path / "runs"
    app(args=["--log-level", "WARNING", "sweep", "--dataset", "toy", "--no-encode", "--cache", str(cache), "--runs",
              str(runs), "--methods", "kgcoop,prograd", "--shots", "1,2", "--seeds", "1", "--pretrained", "none",
              "--scheduler", "inline", "--no-progress", "--train-args", "--max-epoch 1"], standalone_mode=False)
    for method in ("kgcoop", "prograd"):
        for shots in (1, 2):
            assert json.loads((runs / "toy" / method / f"shots{shots}_seed1" / "metrics.json").read_text())["method"] == method
    report = (runs / "report" / "report.md").read_text()
    assert "KgCoOp" in report and "ProGrad" in report
