"""TaskRes, CLIP-Adapter, Tip-Adapter and Tip-Adapter-F: their logits, losses and gradients against the papers'
formulas written out here (float64, following the reference code), learning tests through the production loop with
controls that must fail, Tip-Adapter's validation-only search, and the four through train, eval, predict, the sweep
and the report.

Planted signal: image features are the zero-shot text feature of ANOTHER class (a fixed derangement) plus a little
noise, so zero-shot CLIP scores 0 on them; each trained method must learn the permutation, and the same run with
its learned part frozen (an optimiser that never steps) must not. The random-weight model's text features are
unit vectors 0.96 apart in cosine, so the planted logits differ by little: CLIP-Adapter (its adapter starts near
zero on unit-norm features) and Tip-Adapter-F get a larger learning rate than their papers' to learn in 20 epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_cache

from coopipe.baselines import zero_shot_classifier
from coopipe.learners import FitData, predict_logits, restore_learner
from coopipe.methods import MethodSpec, get_method
from coopipe.methods.tipadapter import TipAdapterOptions, resolve_setting
from coopipe.models import LoadedClip
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "car", "tree"]
TEMPLATE = "a photo of a {}."
DERANGEMENT = torch.tensor([1, 2, 3, 0])  # images of class y look like the text of class DERANGEMENT[y]
F64 = torch.float64


@pytest.fixture(scope="module")
def head(rn50: LoadedClip) -> torch.Tensor:
    """Zero-shot class weights (K, D) of the hand-crafted prompt."""
    return zero_shot_classifier(rn50, NAMES, TEMPLATE)


def _fit_data(clip: LoadedClip, feats: torch.Tensor, labels: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor]
              | None = None) -> FitData:
    return FitData(train_feats=feats, train_labels=labels, val_feats=None if val is None else val[0],
                   val_labels=None if val is None else val[1], classnames=tuple(NAMES), template=TEMPLATE, clip=clip,
                   logit_scale=clip.model.logit_scale.detach())


def _learner(clip: LoadedClip, method: str) -> torch.nn.Module:
    return MethodSpec.of(method).build_learner(clip, NAMES, generator=torch.Generator().manual_seed(0))


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logits.log_softmax(dim=-1)[torch.arange(len(labels)), labels].mean()


def _batch(dim: int, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, dtype=F64, generator=g)
    labels = torch.arange(n) % len(NAMES)
    scale = torch.tensor(math.log(1 / 0.07), dtype=F64)  # CLIP's initial log scale
    return image, labels, scale


# ---------------------------------------------------------------- formulas (float64)
def test_taskres_base_logits_loss_and_gradient_follow_the_reference(rn50):
    learner = _learner(rn50, "taskres")
    get_method("taskres").prepare(learner, _fit_data(rn50, torch.randn(4, 1, rn50.embed_dim), torch.arange(4)))
    tokens = torch.as_tensor(rn50.tokenizer([TEMPLATE.format(c) for c in NAMES]))
    with torch.no_grad():  # trainers/taskres.py: _get_base_text_features, the text encoder on the template prompts
        base = F.normalize(rn50.model.encode_text(tokens).float(), dim=-1)
    torch.testing.assert_close(learner.base, base, atol=1e-5, rtol=1e-5)

    learner = learner.double()
    with torch.no_grad():
        learner.residual.copy_(0.05 * torch.randn(learner.residual.shape, dtype=F64, generator=torch.Generator().manual_seed(2)))
    image, labels, scale = _batch(rn50.embed_dim)
    logits = learner.logits(None, image, scale)
    loss = learner.loss(logits, labels)
    loss.backward()

    residual = learner.residual.detach().clone().requires_grad_()
    text = learner.base + 0.5 * residual  # TaskResLearner.forward: t + alpha * x
    text = text / text.norm(dim=-1, keepdim=True)  # CustomCLIP.forward
    img = image / image.norm(dim=-1, keepdim=True)
    ref = scale.exp() * img @ text.t()
    ref_loss = _cross_entropy(ref, labels)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(learner.residual.grad, residual.grad, atol=1e-12, rtol=1e-10)
    assert learner.base.grad is None  # frozen


def test_clipadapter_logits_loss_and_gradients_follow_the_reference(rn50):
    learner = _learner(rn50, "clipadapter").double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        learner.head.copy_(F.normalize(torch.randn(learner.head.shape, dtype=F64, generator=g), dim=-1))
    image, labels, scale = _batch(rn50.embed_dim)
    logits = learner.logits(None, image, scale)
    loss = learner.loss(logits, labels)
    loss.backward()

    w1, w2 = (p.detach().clone().requires_grad_() for p in (learner.fc1, learner.fc2))
    x = torch.relu(torch.relu(image @ w1.t()) @ w2.t())  # Adapter.fc: Linear (no bias), ReLU, Linear, ReLU
    feats = 0.2 * x + (1 - 0.2) * image  # CustomCLIP.forward: ratio = 0.2
    feats = feats / feats.norm(dim=-1, keepdim=True)
    ref = scale.exp() * feats @ learner.head.t()
    ref_loss = _cross_entropy(ref, labels)
    ref_loss.backward()
    assert w1.shape == (rn50.embed_dim // 4, rn50.embed_dim)  # reduction 4
    torch.testing.assert_close(logits, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(learner.fc1.grad, w1.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(learner.fc2.grad, w2.grad, atol=1e-12, rtol=1e-10)
    predicted = learner.predict_logits(None, image, scale, batch_size=4)
    torch.testing.assert_close(predicted, ref.float().detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tipadapter", "tipadapterf"])
def test_tipadapter_cache_logits_loss_and_key_gradients_follow_the_reference(rn50, method):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(8, 3, rn50.embed_dim, generator=g)  # (N, V, D): centre view + 2 augmented views
    labels = torch.arange(8) % len(NAMES)
    learner = _learner(rn50, method)
    get_method(method).prepare(learner, _fit_data(rn50, feats, labels))
    # utils.py build_cache_model: the augmented passes' raw features averaged, then normalised; one-hot values
    keys = feats[:, 1:].mean(dim=1)
    torch.testing.assert_close(learner.keys, keys / keys.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(learner.values, F.one_hot(labels, len(NAMES)).float())
    assert (float(learner.alpha), float(learner.beta)) == pytest.approx((1.17, 1.0))  # configs/imagenet.yaml init
    assert learner.keys.requires_grad == (method == "tipadapterf")

    learner = learner.double()
    with torch.no_grad():
        learner.alpha.fill_(1.7)
        learner.beta.fill_(5.5)
    image, y, scale = _batch(rn50.embed_dim)
    logits = learner.logits(None, image, scale)
    loss = learner.loss(logits, y)

    cache_keys = learner.keys.detach().clone().t().requires_grad_()  # (D, N), as the repository holds them
    f = image / image.norm(dim=-1, keepdim=True)
    clip_logits = 100.0 * f @ learner.head.t()  # main.py: 100. * features @ clip_weights
    affinity = f @ cache_keys
    cache_logits = ((-1) * (5.5 - 5.5 * affinity)).exp() @ learner.values
    ref = clip_logits + cache_logits * 1.7
    ref_loss = _cross_entropy(ref, y)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    if method == "tipadapterf":
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(learner.keys.grad, cache_keys.grad.t(), atol=1e-12, rtol=1e-10)


def test_tipadapter_search_is_the_reference_grid_search_on_the_validation_split(rn50):
    g = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(12, 2, rn50.embed_dim, generator=g), torch.arange(12) % len(NAMES)
    val_feats, val_labels = torch.randn(10, rn50.embed_dim, generator=g), torch.arange(10) % len(NAMES)
    learner = _learner(rn50, "tipadapter")
    data = _fit_data(rn50, feats, labels, (val_feats, val_labels))
    get_method("tipadapter").prepare(learner, data)
    with torch.no_grad():  # a head that makes the search matter
        learner.head.copy_(F.normalize(torch.randn(learner.head.shape, generator=g), dim=-1))
    get_method("tipadapter").finish(learner, data)

    # utils.py search_hp, as written there (accuracy in percent, the first strictly better setting kept)
    o = learner.setting  # no dataset named: ImageNet's published setting
    assert o == resolve_setting(TipAdapterOptions(), "imagenet")[0]
    beta_list = [i * (o.beta_scale - 0.1) / o.beta_steps + 0.1 for i in range(o.beta_steps)]
    alpha_list = [i * (o.alpha_scale - 0.1) / o.alpha_steps + 0.1 for i in range(o.alpha_steps)]
    f = F.normalize(val_feats.double(), dim=-1)
    affinity = f @ learner.keys.double().t()
    clip_logits = 100.0 * f @ learner.head.double().t()
    best_acc, best_beta, best_alpha = 0.0, 0.0, 0.0
    for beta in beta_list:
        for alpha in alpha_list:
            tip = clip_logits + ((-1) * (beta - beta * affinity)).exp() @ learner.values.double() * alpha
            acc = 100 * float((tip.argmax(dim=1) == val_labels).sum()) / len(val_labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    assert (float(learner.beta), float(learner.alpha)) == pytest.approx((best_beta, best_alpha), rel=1e-6)


# ---------------------------------------------------------------- learning (production loop) with controls
def _planted(head: torch.Tensor, per_class: int, views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(NAMES)).repeat_interleave(per_class)
    feats = head[DERANGEMENT[labels]][:, None, :] + 0.003 * torch.randn(len(labels), views, head.shape[1], generator=g)
    return feats, labels


class _NeverSteps(torch.optim.SGD):
    """The control's optimiser: the learned part stays at its initialisation."""

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return None


def _accuracy(clip: LoadedClip, config: TrainConfig, params: dict[str, torch.Tensor], feats: torch.Tensor,
              labels: torch.Tensor) -> float:
    learner = restore_learner(config.method, clip, NAMES, params)
    logits = predict_logits(learner, config.text_encoder(clip), feats, clip.model.logit_scale.detach())
    return float((logits.argmax(dim=-1) == labels).float().mean())


@pytest.mark.parametrize(("method", "lr"), [("taskres", None), ("clipadapter", 5.0), ("tipadapterf", 0.01)])
def test_a_trained_method_learns_a_planted_class_permutation_and_frozen_it_does_not(rn50, head, monkeypatch,
                                                                                     method, lr):
    """20 epochs of 1 batch: ~1 s per method on 2 shared cores. No validation split: Tip-Adapter-F keeps its initial
    alpha and beta, so only its keys can fix the permutation."""
    train, train_y = _planted(head, 8, 3, seed=6)
    test, test_y = _planted(head, 8, 1, seed=7)
    test = test[:, 0]
    zero_shot = float(((F.normalize(test, dim=-1) @ head.t()).argmax(dim=-1) == test_y).float().mean())
    config = TrainConfig.for_method(method, 8, max_epoch=20, lr=lr)
    learned = train_prompt(train, train_y, rn50, NAMES, config)
    monkeypatch.setattr(get_method(method), "optimizer", lambda params, opt: _NeverSteps(list(params.values()), lr=opt.lr))
    frozen = train_prompt(train, train_y, rn50, NAMES, config)
    assert zero_shot == 0.0
    assert _accuracy(rn50, config, learned.params, test, test_y) == 1.0
    assert _accuracy(rn50, config, frozen.params, test, test_y) <= 0.25


def test_tipadapter_beats_zero_shot_on_planted_data_by_its_validation_search(rn50, head):
    train, train_y = _planted(head, 8, 3, seed=8)
    val, val_y = _planted(head, 4, 1, seed=9)
    test, test_y = _planted(head, 8, 1, seed=10)
    config = TrainConfig.for_method("tipadapter", 8)
    result = train_prompt(train, train_y, rn50, NAMES, config, val_feats=val[:, 0], val_labels=val_y)
    assert config.max_epoch == 0 and result.history == [] and result.text_features is None
    at_init = _accuracy(rn50, config, {**result.params, "alpha": torch.tensor(1.17), "beta": torch.tensor(1.0)},
                        test[:, 0], test_y)
    assert at_init <= 0.25  # zero-shot dominates at the initial alpha and beta
    assert _accuracy(rn50, config, result.params, test[:, 0], test_y) >= 0.75  # measured 0.94 (alpha's grid ends at 3)


def test_tipadapters_fit_never_reads_the_test_split(rn50, tmp_path):
    """Runs on two caches whose train and validation stores are equal, one with a test store and one without, save
    bitwise equal tensors: the cache, alpha and beta come from the training and validation splits only."""
    from coopipe.checkpoint import load_checkpoint
    from coopipe.jobs.train import run_train

    sizes = {"train": (4, 2), "val": (2, 1)}
    with_test = make_toy_cache(tmp_path / "a", rn50, NAMES, {**sizes, "test": (3, 1)})
    without = make_toy_cache(tmp_path / "b", rn50, NAMES, sizes)
    for method in ("tipadapter", "tipadapterf"):
        saved = []
        for cache in (with_test, without):
            run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=cache / method, progress=False,
                      clip=rn50, overrides={"method": method, "max_epoch": 2 if method == "tipadapterf" else None})
            saved.append(load_checkpoint(cache / method).learner_tensors)
        assert saved[0].keys() == saved[1].keys() >= {"keys", "values", "alpha", "beta", "head"}
        for name in saved[0]:
            assert torch.equal(saved[0][name], saved[1][name]), (method, name)


@pytest.mark.parametrize("method", ["taskres", "tipadapterf"])
def test_a_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(rn50, head, tmp_path, method):
    """A checkpoint after 2 of 4 epochs holds the frozen parameters (zero-shot weights, cache) without optimiser state
    and passes the loader's checks; resumed, the run ends bitwise where an uninterrupted one does."""
    from coopipe.checkpoint import load_checkpoint, save_checkpoint

    train, train_y = _planted(head, 4, 2, seed=11)
    val, val_y = _planted(head, 2, 1, seed=12)
    config = TrainConfig.for_method(method, 4, max_epoch=4)
    common = dict(val_feats=val[:, 0], val_labels=val_y)
    whole = train_prompt(train, train_y, rn50, NAMES, config, **common)
    half = train_prompt(train, train_y, rn50, NAMES, config, stop_after=2, **common)
    save_checkpoint(tmp_path, clip=rn50, classnames=NAMES, config=config, state=half.state)
    state = load_checkpoint(tmp_path).train_state()
    assert set(state.frozen) >= {"head", "values"} if method == "tipadapterf" else state.frozen == ("base",)
    resumed = train_prompt(train, train_y, rn50, NAMES, config, resume_state=state, **common)
    assert whole.params.keys() == resumed.params.keys()
    for name, tensor in whole.params.items():
        assert torch.equal(tensor, resumed.params[name]), name


def test_clipadapter_serves_new_classes_with_its_adapter_and_their_zero_shot_head(rn50, tmp_path):
    """Base-to-new: the checkpoint of a run on the first two classes, rebuilt for the other two, keeps the trained
    adapter and gets the new classes' zero-shot weights from the target dataset's template."""
    from coopipe.checkpoint import load_checkpoint, save_checkpoint
    from coopipe.trained_learner import load_learner
    from coopipe.errors import CheckpointError

    base, new = NAMES[:2], NAMES[2:]
    feats, labels = torch.randn(4, 2, rn50.embed_dim, generator=torch.Generator().manual_seed(13)), torch.arange(4) % 2
    config = TrainConfig.for_method("clipadapter", 2, max_epoch=1)
    result = train_prompt(feats, labels, rn50, base, config)
    save_checkpoint(tmp_path, clip=rn50, classnames=base, config=config, state=result.state)
    ckpt = load_checkpoint(tmp_path)
    learner = load_learner(ckpt, rn50, new, template="a centered satellite photo of {}.")
    torch.testing.assert_close(learner.head, zero_shot_classifier(rn50, new, "a centered satellite photo of {}."))
    assert torch.equal(learner.fc1, result.params["fc1"]) and torch.equal(learner.fc2, result.params["fc2"])
    with pytest.raises(CheckpointError, match="template"):
        load_learner(ckpt, rn50, new)


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_four_methods_train_evaluate_predict_sweep_and_report(rn50, tmp_path):
    """``coopipe train --method NAME`` and eval, predict, a base-to-new refusal, then a sweep and its report."""
    from coopipe.checkpoint import load_checkpoint
    from coopipe.cli import app
    from coopipe.errors import CheckpointError
    from coopipe.features import select_store
    from coopipe.jobs.evaluate import run_eval
    from coopipe.predict import predict

    def cli(args: list[str]) -> None:
        app(args=["--log-level", "WARNING", *args], standalone_mode=False)

    cache = make_toy_cache(tmp_path / "cache", rn50, NAMES[:3], {"train": (4, 2), "val": (2, 1), "test": (3, 1)})
    test_store = select_store(cache, "toy", "test", model=rn50.name, weights=rn50.weights_id)
    for method in ("taskres", "clipadapter", "tipadapter", "tipadapterf"):
        run = tmp_path / method
        epochs = [] if method == "tipadapter" else ["--max-epoch", "2"]
        cli(["train", "--features", str(cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out", str(run),
             "--method", method, "--no-progress", *epochs])
        ckpt = load_checkpoint(run)
        assert ckpt.complete and ckpt.method.method == method and ckpt.epoch == (0 if method == "tipadapter" else 2)
        metrics = run_eval(run, cache_dir=cache, clip=rn50)
        assert metrics["method"] == method and 0 <= metrics["accuracy"] <= 1
        predictions = predict(run, store=test_store.path, topk=2)
        assert len(predictions) == 9 and {p.labels[0] for p in predictions} <= set(NAMES[:3])
        if method == "clipadapter":  # a class-agnostic adapter: base-to-new works
            assert 0 <= run_eval(run, cache_dir=cache, clip=rn50, classes="new")["accuracy"] <= 1
        else:
            with pytest.raises(CheckpointError, match="cannot serve other classes"):
                run_eval(run, cache_dir=cache, clip=rn50, classes="new")

    runs = tmp_path / "runs"
    cli(["sweep", "--dataset", "toy", "--no-encode", "--cache", str(cache), "--runs", str(runs), "--methods",
         "tipadapter,tipadapterf", "--shots", "1", "--seeds", "1", "--pretrained", "none", "--scheduler", "inline",
         "--no-progress", "--epochs", "2"])
    for method in ("tipadapter", "tipadapterf"):
        metrics = json.loads((runs / "toy" / method / "shots1_seed1" / "metrics.json").read_text())
        assert metrics["epochs"] == (0 if method == "tipadapter" else 2)
    report = Path(runs / "report" / "report.md").read_text()
    assert "Tip-Adapter" in report and "Tip-Adapter-F" in report
