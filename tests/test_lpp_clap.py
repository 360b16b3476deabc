"""LP++ and CLAP: their formulas recomputed independently from the authors' code, and planted-signal learning through
the production loop with controls that must fail.

The formula tests follow the reference code line by line (``FereshteShakeri/FewShot-CLIP-Strong-Baseline:
methods/linear_probe_p2.py`` and ``methods/utils.py``; ``jusiro/CLAP: trainers/adapters.py``) in float64 and compare
with the method modules through their real learners. The learning tests plant a class signal in the image features
that zero-shot CLIP (a random-weight RN50, whose text features carry no class signal) misses; each method must
find it through :func:`coopipe.train.train_prompt`, and the same run with its optimiser's steps disabled (the
learned part frozen) must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopipe.baselines import zero_shot_classifier
from coopipe.checkpoint import load_checkpoint
from coopipe.learners import FitData, predict_logits
from coopipe.methods import MethodSpec, get_method
from coopipe.methods.clap import CLAPLearner
from coopipe.methods.lpp import LPPLearner, LPPOptimizer
from coopipe.text_encoder import coop_logits
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "sea or lake"]
TEMPLATE = "a photo of a {}."


def _fit_data(clip, feats: torch.Tensor, labels: torch.Tensor, **extra) -> FitData:
    return FitData(train_feats=feats, train_labels=labels, val_feats=extra.get("val_feats"),
                   val_labels=extra.get("val_labels"), classnames=tuple(NAMES), template=TEMPLATE, clip=clip,
                   logit_scale=clip.model.logit_scale.detach())


def _features(n_per_class: int, views: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    means = torch.randn(len(NAMES), dim, generator=g)
    feats = means[labels][:, None] + 0.8 * torch.randn(len(labels), views, dim, generator=g)
    return feats, labels


# ---------------------------------------------------------------- LP++
def test_lpp_start_logits_loss_gradients_and_steps_follow_the_reference(rn50):
    """Under 1 s after the model is loaded."""
    shots = 2
    feats, labels = _features(shots, 2, rn50.embed_dim)
    method = get_method("lpp")
    learner = method.build_learner(None, rn50, NAMES, generator=torch.Generator().manual_seed(0))
    method.prepare(learner, _fit_data(rn50, feats, labels))
    assert isinstance(learner, LPPLearner) and learner.image_conditional

    # the start, as LinearProbe_P2.forward computes it (features: normalised, one view per image)
    f = F.normalize(feats[:, 0].double(), dim=-1)  # (N, D)
    t = zero_shot_classifier(rn50, NAMES, TEMPLATE).double().t()  # (D, K) clip_weights
    n = f.shape[0]
    centroids = torch.stack([f[labels == k].sum(0) for k in range(len(NAMES))])  # compute_centroids: class sums
    ft = f @ t
    alpha_tilde = torch.stack([ft[labels == k, k].mean() for k in range(len(NAMES))]) * shots
    alpha_init = (250 / shots * alpha_tilde).mean()  # calculate_init_alpha
    lr_w = 4 * n / max(np.linalg.eigh((f.t() @ f).numpy())[0])  # calculate_lr_w
    lr_alpha = n / (ft.pow(2).sum(0).max() * 4)  # calculate_lr_alpha
    torch.testing.assert_close(learner.weight.double(), centroids, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(learner.alpha.double(), alpha_init.expand(len(NAMES)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(learner.step_sizes.double(), torch.stack([torch.tensor(lr_w).double(), lr_alpha]),
                               rtol=1e-4, atol=0)
    bound = 1 / rn50.embed_dim ** 0.5  # nn.Linear's bias draw
    assert float(learner.bias.detach().abs().max()) <= bound and float(learner.bias.detach().abs().min()) > 0

    # logits, loss and gradients in float64 at a random point
    learner = learner.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        learner.weight.add_(0.1 * torch.randn(learner.weight.shape, generator=g, dtype=torch.float64))
        learner.alpha.add_(torch.randn(len(NAMES), generator=g, dtype=torch.float64))
    x = feats[:, 1].double()
    w, b, a = (p.detach().clone().requires_grad_(True) for p in (learner.weight, learner.bias, learner.alpha))
    fx = x / x.norm(dim=-1, keepdim=True)
    ref_logits = fx @ w.t() + b + torch.ones(n, 1, dtype=torch.float64) @ a[None] * (fx @ t)  # the reference's line
    ref_loss = F.cross_entropy(ref_logits, labels)
    ref_loss.backward()
    logits = learner.logits(None, x, rn50.model.logit_scale)
    loss = learner.loss(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for mine, ref in ((learner.weight, w), (learner.bias, b), (learner.alpha, a)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_lpp_optimizer_replays_the_reference_loop(rn50):
    """25 iterations of LPPOptimizer against the reference's loop (SGD with momentum on the classifier, alpha's
    never-zeroed gradient applied every 10th iteration), float64. Under 1 s."""
    feats, labels = _features(3, 1, 16, seed=2)
    f = F.normalize(feats[:, 0].double(), dim=-1)
    t = F.normalize(torch.randn(16, len(NAMES), generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=0)
    w0, b0 = torch.randn(len(NAMES), 16, dtype=torch.float64), torch.zeros(len(NAMES), dtype=torch.float64)
    lr_w, lr_alpha = 0.7, 0.05

    # the reference (linear_probe_p2.py), written as it is
    classifier = torch.nn.Linear(16, len(NAMES)).double()
    classifier.weight.data, classifier.bias.data = w0.clone(), b0.clone()
    alpha_vec = torch.full((1, len(NAMES)), 2.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD(classifier.parameters(), lr_w, momentum=0.9)
    for epoch in range(25):
        logits = classifier(f) + torch.ones(f.shape[0], 1, dtype=torch.float64) @ alpha_vec * (f @ t)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data

    learner = LPPLearner(NAMES, 16, generator=None).double()
    with torch.no_grad():
        learner.weight.copy_(w0)
        learner.bias.copy_(b0)
        learner.alpha.fill_(2.0)
        learner.text.copy_(t.t())
    mine = LPPOptimizer([learner.weight, learner.bias], learner.alpha, step_w=lr_w, step_alpha=lr_alpha)
    for _ in range(25):
        mine.zero_grad(set_to_none=True)  # what the training loop does every step
        learner.loss(learner.logits(None, feats[:, 0].double(), torch.tensor(0.0)), labels).backward()
        for group in mine.param_groups:
            group["lr"] = 123.0  # the loop's schedule: not read
        mine.step()
    torch.testing.assert_close(learner.weight, classifier.weight.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(learner.bias, classifier.bias.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(learner.alpha, alpha_vec.detach()[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- CLAP
def test_clap_start_logits_loss_and_gradients_follow_the_reference(rn50):
    """Under 1 s after the model is loaded."""
    feats, labels = _features(2, 3, rn50.embed_dim, seed=4)
    method = get_method("clap")
    learner = method.build_learner(None, rn50, NAMES, generator=torch.Generator())
    method.prepare(learner, _fit_data(rn50, feats, labels))
    assert isinstance(learner, CLAPLearner)

    # _get_base_text_features: the text tower's raw output for the template (one template: its mean is itself)
    with torch.no_grad():
        tokens = torch.as_tensor(rn50.tokenizer([TEMPLATE.format(c) for c in NAMES]))
        base = rn50.model.encode_text(tokens).double()  # (K, D), not normalised
    torch.testing.assert_close(learner.prototypes.double(), base, rtol=1e-4, atol=1e-5)  # init ZS
    torch.testing.assert_close(learner.anchors.double(), base, rtol=1e-4, atol=1e-5)

    # init_lagrangian_multipliers on zero-shot logits of the augmented support features (views 1..)
    scale = rn50.model.logit_scale.detach().double().exp()
    aug = feats[:, 1:].reshape(-1, feats.shape[-1]).double()
    y = labels.repeat_interleave(feats.shape[1] - 1)
    logits_ds = scale * F.normalize(aug, dim=-1) @ F.normalize(base, dim=-1).t()
    one_hot = F.one_hot(y).double()
    performance = torch.diag(torch.softmax(logits_ds, -1).t() @ one_hot) / one_hot.sum(0)
    torch.testing.assert_close(learner.multipliers.double(), performance, rtol=1e-4, atol=1e-6)

    # forward_lp + cross-entropy + zero_shot_constraint (l2), float64, at a moved point
    learner = learner.double()
    with torch.no_grad():
        learner.prototypes.add_(torch.randn(learner.prototypes.shape, generator=torch.Generator().manual_seed(5),
                                            dtype=torch.float64))
    x = feats[:, 0].double()
    w = learner.prototypes.detach().clone().requires_grad_(True)
    # the multipliers as the learner holds them (checked against the reference's above, computed from float32
    # features): the loss and its gradient then agree to float64 rounding
    lam, anchor = learner.multipliers.detach().double(), learner.anchors.detach().clone()
    out = (x / x.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).t() * scale
    ref_loss = F.cross_entropy(out, labels) + torch.mean(lam * (w - anchor).pow(2).sum(-1))
    ref_loss.backward()
    # the production path: the loop's coop_logits against the learner's exported classifier, then its loss
    logits = coop_logits(x, learner.class_text_features(None), rn50.model.logit_scale.detach().double())
    loss = learner.loss(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, out.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(learner.prototypes.grad, w.grad, rtol=1e-10, atol=1e-12)


def test_clap_paper_setting_and_no_transfer():
    config = TrainConfig.for_method("clap", 4)
    assert (config.lr, config.weight_decay, config.momentum, config.batch_size, config.max_epoch) == (
        0.1, 0.0, 0.9, 256, 300)
    assert (config.warmup_epoch, config.warmup_lr) == (1, 1e-5)
    assert TrainConfig.for_method("clap", 4, lr=0.05).lr == 0.05  # the user's value wins
    lpp = TrainConfig.for_method("lpp", 16)
    assert lpp.max_epoch == 300 and lpp.batch_size >= 10**9  # full batch
    for name in ("lpp", "clap"):
        spec = MethodSpec(name)
        assert not spec.transferable and "training class" in spec.transfer_refusal()
        assert MethodSpec.parse(name) == spec and spec.label() == name


def test_clap_never_reads_the_validation_split(rn50):
    """CLAP is validation-free: a run given a poisoned validation split (and one given none) learns the very same
    prototypes. Under 2 s."""
    feats, labels = _features(2, 2, rn50.embed_dim, seed=6)
    config = TrainConfig.for_method("clap", 2, max_epoch=3)
    bare = train_prompt(feats, labels, rn50, NAMES, config, template=TEMPLATE)
    val_feats, val_labels = _features(1, 1, rn50.embed_dim, seed=7)
    other = train_prompt(feats, labels, rn50, NAMES, config, val_feats=-val_feats, val_labels=val_labels.flip(0),
                         template=TEMPLATE)
    assert torch.equal(bare.params["prototypes"], other.params["prototypes"])
    assert [r.loss for r in bare.history] == [r.loss for r in other.history]
    seen = []
    method = get_method("clap")

    class Spy(FitData):
        def __getattribute__(self, name):
            if name in ("val_feats", "val_labels"):
                seen.append(name)
            return super().__getattribute__(name)

    learner = method.build_learner(None, rn50, NAMES, generator=torch.Generator())
    data = _fit_data(rn50, feats, labels, val_feats=val_feats[:, 0], val_labels=val_labels)
    method.prepare(learner, Spy(**{f: getattr(data, f) for f in data.__dataclass_fields__}))
    assert seen == []


# ---------------------------------------------------------------- planted signal, through the production loop
def _planted(dim: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LP++'s plant: per class a pair of axes, the class along its second one, every image stretched along one long
    axis shared by all classes, on a common component. Nearest-class-sum (LP++'s start) and zero-shot CLIP miss
    it, a linear probe separates it (the long axis is orthogonal to the right weights)."""
    k = len(NAMES)
    basis = torch.linalg.qr(torch.randn(dim, 2 * k + 1, generator=torch.Generator().manual_seed(0)))[0].t()
    common, axes = basis[0], basis[1:].reshape(k, 2, dim)  # orthonormal rows
    long_axis = (axes[:, 0] + axes[:, 1]).sum(0) / (2 * k) ** 0.5
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_class)
    stretch = 3.0 * torch.randn(len(labels), generator=g)
    feats = 3.0 * common + axes[labels, 1] + stretch[:, None] * long_axis + 0.01 * torch.randn(
        len(labels), dim, generator=g)
    return feats[:, None], labels


def _clusters(dim: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP's plant: one random direction per class plus isotropic noise (zero-shot CLIP with random weights misses
    it; prototypes that move to the class means find it)."""
    means = torch.randn(len(NAMES), dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(NAMES)).repeat_interleave(per_class)
    return (means[labels] + 0.8 * torch.randn(len(labels), dim, generator=g))[:, None], labels


def _accuracy(result, spec: MethodSpec, clip, feats: torch.Tensor, labels: torch.Tensor) -> float:
    from coopipe.learners import restore_learner

    learner = restore_learner(spec, clip, NAMES, result.params)
    logits = predict_logits(learner, TrainConfig().text_encoder(clip), feats[:, 0], clip.model.logit_scale.detach())
    return float((logits.argmax(-1) == labels).float().mean())


def _zero_shot_accuracy(clip, feats: torch.Tensor, labels: torch.Tensor) -> float:
    text = zero_shot_classifier(clip, NAMES, TEMPLATE)
    return float(((feats[:, 0] @ text.t()).argmax(-1) == labels).float().mean())


@pytest.mark.parametrize(("name", "epochs", "plant", "optimizer"), [
    ("lpp", 300, _planted, LPPOptimizer),  # its paper setting: 300 full-batch iterations
    ("clap", 50, _clusters, torch.optim.SGD),  # 50 of its 300 epochs
])
def test_planted_signal_is_found_and_not_without_learning(rn50, monkeypatch, name, epochs, plant, optimizer):
    """Trained through ``train_prompt`` on 8 images per class, scored on 50 held-out ones per class: the method
    reaches >= 90% where zero-shot CLIP and the same run with its optimiser's steps disabled (its start) stay
    <= 50% (chance 33%). About 3 s each (measured 0.99 / 0.37 for LP++, 0.93 / 0.33 for CLAP)."""
    train, train_y = plant(rn50.embed_dim, 8, 0)
    test, test_y = plant(rn50.embed_dim, 50, 1)
    config = TrainConfig.for_method(name, 8, max_epoch=epochs)
    spec = MethodSpec(name)
    assert _zero_shot_accuracy(rn50, test, test_y) <= 0.5
    learned = train_prompt(train, train_y, rn50, NAMES, config, template=TEMPLATE)
    assert _accuracy(learned, spec, rn50, test, test_y) >= 0.9
    monkeypatch.setattr(optimizer, "step", lambda self, closure=None: None)  # the learned part frozen
    frozen = train_prompt(train, train_y, rn50, NAMES, config, template=TEMPLATE)
    assert _accuracy(frozen, spec, rn50, test, test_y) <= 0.5


# ---------------------------------------------------------------- the tool's paths
def _cli(args) -> None:
    from coopipe.cli import app

    app(args=["--log-level", "WARNING", *args], standalone_mode=False)


@pytest.fixture(scope="module")
def toy_cache(rn50, tmp_path_factory):
    from conftest import make_toy_cache

    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, NAMES,
                          {"train": (3, 2), "val": (2, 1), "test": (3, 1)})


@pytest.mark.parametrize("name", ["lpp", "clap"])
def test_train_eval_predict_and_no_base_to_new(toy_cache, rn50, tmp_path, name):
    """``coopipe train --method NAME``, ``eval`` and ``predict``; base-to-new and another class list refused in one
    line saying why. About 10 s each on 2 shared cores (the CLI loads the model)."""
    import json

    from coopipe.trained_learner import load_learner
    from coopipe.errors import CheckpointError, ParamsError
    from coopipe.features import select_store
    from coopipe.jobs.evaluate import run_eval
    from coopipe.predict import predict
    from coopipe.sweep.plan import SweepSpec, plan_sweep

    run = tmp_path / "run"
    _cli(["train", "--features", str(toy_cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out", str(run),
          "--method", name, "--max-epoch", "20", "--no-progress"])
    ckpt = load_checkpoint(run)
    assert ckpt.complete and ckpt.method == MethodSpec(name)
    assert ckpt.config.lr == (0.1 if name == "clap" else 0.002)  # the method's setting, --lr not given
    run_eval(run, cache_dir=toy_cache, clip=rn50)  # what `coopipe eval` runs, on the loaded model
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["paper_epochs"] == 300 and metrics["accuracy"] > 0.5
    test_store = select_store(toy_cache, "toy", "test", model=rn50.name, weights=rn50.weights_id)
    predictions = predict(run, store=test_store.path, topk=2, clip=rn50)
    assert len(predictions) == 9 and {p.labels[0] for p in predictions} <= set(NAMES)
    with pytest.raises(ParamsError, match=f"{name} cannot .*training class"):
        plan_sweep(SweepSpec(datasets=("toy",), methods=(MethodSpec(name),), base2new=True, encode=False))
    with pytest.raises(CheckpointError, match="cannot serve other classes .*training class"):
        load_learner(ckpt, rn50, ["cat", "dog"])


@pytest.mark.slow
def test_sweep_and_report_name_both(toy_cache, tmp_path):
    """Both methods through ``coopipe sweep`` (2 epochs) into the report. About 30 s on 2 shared cores (the
    sweep loads the model for each task)."""
    runs = tmp_path / "runs"
    _cli(["sweep", "--dataset", "toy", "--no-encode", "--cache", str(toy_cache), "--runs", str(runs), "--methods",
          "lpp,clap", "--shots", "1", "--seeds", "1", "--pretrained", "none", "--scheduler", "inline",
          "--no-progress", "--train-args", "--epochs 2"])
    for name in ("lpp", "clap"):
        assert (runs / "toy" / name / "shots1_seed1" / "metrics.json").is_file()
    assert load_checkpoint(runs / "toy" / "clap" / "shots1_seed1").config.lr == 0.1  # its setting, not CoOp's
    report = (runs / "report" / "report.md").read_text()
    assert "LP++" in report and "CLAP" in report


class _Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["lpp", "clap"])
def test_a_resumed_run_equals_an_uninterrupted_one(toy_cache, rn50, tmp_path, monkeypatch, name):
    """Stopped after its epoch-3 checkpoint and resumed by the job, a run ends bitwise where an uninterrupted one
    does: LP++'s optimiser state (momentum, alpha's gradient sum, iteration counts) and the prepared start come
    back. About 6 s each on 2 shared cores (a checkpoint every epoch)."""
    import coopipe.jobs.train as job

    common = dict(cache_dir=toy_cache, dataset="toy", shots=2, seed=1, progress=False, clip=rn50,
                  checkpoint_every=0, overrides={"method": name, "max_epoch": 6})
    job.run_train(out_dir=tmp_path / "whole", **common)
    check = job.check_finite

    def stop_at_4(rec, state, config, out_dir):
        if rec.epoch == 4:
            raise _Killed
        check(rec, state, config, out_dir)

    monkeypatch.setattr(job, "check_finite", stop_at_4)
    with pytest.raises(_Killed):
        job.run_train(out_dir=tmp_path / "stopped", **common)
    mid = load_checkpoint(tmp_path / "stopped")
    assert mid.epoch == 3 and not mid.complete
    if name == "lpp":
        assert {"alpha.momentum_buffer", "alpha.step", "weight.momentum_buffer"} <= set(mid.train_state().optimizer)
    monkeypatch.setattr(job, "check_finite", check)
    job.run_train(out_dir=tmp_path / "stopped", **common)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "stopped")
    assert a.complete and b.complete and a.tensors.keys() == b.tensors.keys()
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
