"""CoOp training on cached features, checkpoints, metrics and baselines.

Fast tests run on tiny in-memory features with random-weights RN50 (the ``rn50`` fixture); the learning test
encodes a few hundred real EuroSAT images once (kept in pytest's cache folder, so later runs skip encoding).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from coopipe.baselines import (
    IMAGENET_TEMPLATES,
    dataset_template,
    fit_linear_probe,
    zero_shot,
    zero_shot_classifier,
)
from coopipe.checkpoint import load_checkpoint, save_checkpoint, save_result
from coopipe.checkpoint_files import CLASSIFIER_FILE, META_FILE, TENSORS_FILE
from coopipe.classifier import export_classifier, load_classifier
from coopipe.errors import CheckpointError, DatasetError, ParamsError, ProvenanceMismatchError, StoreError
from coopipe.evaluate import (
    confusion_matrix,
    evaluate_classifier,
    evaluate_predictions,
    macro_f1,
    per_class_accuracy,
)
from coopipe.features import read_split, select_store
from coopipe.prompt import PromptLearner
from coopipe.store import open_store
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from conftest import make_store

from coopipe.learners import restore_learner
from coopipe.methods import MethodSpec, epochs_for
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig, TrainState, batch_slices, draw_views

CLASSES = ["cat", "dog", "sea or lake"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n_per_class: int = 4, n_views: int = 3, dim: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random raw features (N, V, D) with a class-dependent mean, and labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)  # (N,)
    means = torch.randn(len(CLASSES), dim, generator=g)  # (K, D)
    feats = means[labels][:, None, :] + 0.5 * torch.randn(len(labels), n_views, dim, generator=g)  # (N, V, D)
    return feats, labels


def _tiny_config(**overrides) -> TrainConfig:
    """A short run; method options (``n_ctx``, ``csc``, ...) go to CoOp's method record."""
    base = dict(max_epoch=3, batch_size=4, seed=1)
    base.update(overrides)
    return TrainConfig.for_method("coop", 16, **base)


@pytest.fixture(scope="module")
def toy() -> tuple[torch.Tensor, torch.Tensor]:
    return _toy()


# ---------------------------------------------------------------- protocol
def test_epochs_follow_coop():
    assert [epochs_for(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [epochs_for(k, "imagenet") for k in (1, 16)] == [50, 50]
    assert epochs_for(16, "eurosat") == 200 and epochs_for(3) == 100
    assert TrainConfig.for_method("coop", 1).max_epoch == 50
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.002, 0.9, 5e-4, 32)
    assert (cfg.warmup_epoch, cfg.warmup_lr, cfg.method.n_ctx, cfg.method.csc) == (1, 1e-5, 16, False)
    assert (cfg.method.class_token_position, cfg.method.ctx_init, cfg.views) == ("end", None, "augmented")
    with pytest.raises(ParamsError):
        epochs_for(0)
    with pytest.raises(ParamsError, match="views"):
        TrainConfig(views="random")
    with pytest.raises(ParamsError, match="unknown"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})


class _DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), for comparison."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def test_lr_schedule_matches_dassl_reference(rn50, toy):
    max_epoch = 7
    cfg = _tiny_config(max_epoch=max_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        sched = _DasslConstantWarmup(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epoch), 1, 1e-5)
        reference = []
        for _ in range(max_epoch):
            reference.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    ours = [cfg.lr_at(e) for e in range(max_epoch)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=0)
    assert ours[0] == 1e-5 and ours[1] == 0.002 and all(a > b for a, b in zip(ours[1:], ours[2:]))
    feats, labels = toy
    history = train_prompt(feats, labels, rn50, CLASSES, cfg).history
    assert [r.lr for r in history] == ours


# ---------------------------------------------------------------- determinism, resume, views
def test_same_seed_same_ctx_other_seed_differs(rn50, toy):
    feats, labels = toy
    a = train_prompt(feats, labels, rn50, CLASSES, _tiny_config(seed=1))
    b = train_prompt(feats, labels, rn50, CLASSES, _tiny_config(seed=1))
    c = train_prompt(feats, labels, rn50, CLASSES, _tiny_config(seed=2))
    assert torch.equal(a.ctx, b.ctx) and torch.equal(a.text_features, b.text_features)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert not torch.equal(a.ctx, c.ctx)
    assert a.ctx.shape == (16, 512) and a.text_features.shape == (3, rn50.embed_dim)
    assert torch.allclose(a.text_features.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_resume_equals_uninterrupted(rn50, toy, tmp_path):
    feats, labels = toy
    cfg = _tiny_config(max_epoch=4)
    val = {"val_feats": feats[:, 0], "val_labels": labels}
    full = train_prompt(feats, labels, rn50, CLASSES, cfg, **val)
    saved = {}
    first = train_prompt(feats, labels, rn50, CLASSES, cfg, stop_after=2,
                       on_epoch=lambda rec, state: saved.setdefault(rec.epoch, state), **val)
    assert first.epochs_done == 2 and not torch.equal(first.ctx, full.ctx)
    # through the checkpoint files, as a killed run would resume
    save_checkpoint(tmp_path / "ckpt", clip=rn50, classnames=CLASSES, config=cfg, state=saved[2])
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.epoch == 2 and not ckpt.complete
    ckpt.check_resumable(cfg)
    resumed = train_prompt(feats, labels, rn50, CLASSES, cfg, resume_state=ckpt.train_state(), **val)
    assert torch.equal(resumed.ctx, full.ctx)
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history]
    assert [r.val_acc for r in resumed.history] == [r.val_acc for r in full.history]
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="another training config"):
        ckpt.check_resumable(_tiny_config(max_epoch=5))
    with pytest.raises(CheckpointError, match="variant"):
        train_prompt(feats, labels, rn50, CLASSES, _tiny_config(max_epoch=4, n_ctx=4), resume_state=ckpt.train_state())


def test_val_accuracy_is_that_of_each_epochs_context(rn50):
    """Validation reuses the next epoch's first text pass; it must equal the accuracy of the epoch's own context."""
    feats, labels = _toy(n_per_class=6, seed=3)
    val_feats, val_labels = feats[:, 0] + 0.8 * torch.randn_like(feats[:, 0]), labels
    cfg = _tiny_config(max_epoch=4, lr=0.5)  # a large lr so the accuracy moves between epochs
    states: dict[int, TrainState] = {}
    result = train_prompt(feats, labels, rn50, CLASSES, cfg, val_feats=val_feats, val_labels=val_labels,
                        on_epoch=lambda rec, state: states.setdefault(rec.epoch, state))
    assert [r.epoch for r in result.history] == [1, 2, 3, 4] and sorted(states) == [1, 2, 3, 4]
    scale = rn50.model.logit_scale.detach()
    for rec in result.history:
        state = states[rec.epoch]
        assert state.history[-1] == rec  # the snapshot carries the completed record
        with torch.no_grad():
            text = restore_learner(cfg.method, rn50, CLASSES, state.params).class_text_features(cfg.text_encoder(rn50))
        expected = float((coop_logits(val_feats, text, scale).argmax(-1) == val_labels).float().mean())
        assert rec.val_acc == pytest.approx(expected, abs=1e-9)
    assert torch.equal(states[4].ctx, result.ctx)
    assert len({r.val_acc for r in result.history}) > 1


def test_view_sampling_draws_among_augmented_views(rn50, toy, monkeypatch):
    g = torch.Generator().manual_seed(0)
    views = draw_views(5000, 4, "augmented", g)
    assert set(views.tolist()) == {1, 2, 3}
    assert torch.equal(draw_views(10, 1, "augmented", g), torch.zeros(10, dtype=torch.long))
    assert torch.equal(draw_views(10, 4, "center", g), torch.zeros(10, dtype=torch.long))
    assert set(draw_views(5000, 3, "all", g).tolist()) == {0, 1, 2}
    assert [s.stop - s.start for s in batch_slices(70, 32, True)] == [32, 32]
    assert [s.stop - s.start for s in batch_slices(20, 32, True)] == [20]

    # in training: every image row the loss sees is one of that image's augmented views, never the centre one
    import coopipe.loop as train_module  # the loop computes the logits there

    feats, labels = toy
    seen: list[torch.Tensor] = []
    real = train_module.coop_logits

    def spy(image, text, scale):
        seen.append(image.detach().clone())
        return real(image, text, scale)

    monkeypatch.setattr(train_module, "coop_logits", spy)
    train_prompt(feats, labels, rn50, CLASSES, _tiny_config(max_epoch=3))
    rows = torch.cat(seen)  # (steps * B, D)
    flat = feats.reshape(-1, feats.shape[-1])  # (N * V, D), index = image * V + view
    match = (rows[:, None, :] == flat[None]).all(-1)  # (R, N * V)
    assert bool(match.any(1).all())
    used_views = match.float().argmax(1) % feats.shape[1]
    assert set(used_views.tolist()) == {1, 2}
    assert len(rows) == 3 * len(labels)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_classifier_export(rn50, toy, tmp_path):
    feats, labels = toy
    cfg = _tiny_config(max_epoch=2)
    result = train_prompt(feats, labels, rn50, CLASSES, cfg, val_feats=feats[:, 0], val_labels=labels)
    assert all(r.val_acc is not None for r in result.history)
    out = save_result(tmp_path / "run", result, clip=rn50, classnames=CLASSES, config=cfg, params={"note": "test"})
    assert {p.name for p in out.iterdir()} == {TENSORS_FILE, META_FILE, CLASSIFIER_FILE}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["model"] == "RN50" and meta["weights"] == rn50.weights_id and meta["classnames"] == CLASSES
    assert meta["variant"] == {"n_ctx": 16, "ctx_init": None, "csc": False, "class_token_position": "end"}
    assert meta["epoch"] == 2 and meta["complete"] and len(meta["history"]) == 2 and meta["params"] == {"note": "test"}
    assert meta["config"]["lr"] == 0.002 and meta["coopipe_version"]

    ckpt = load_checkpoint(out)
    assert torch.equal(ckpt.ctx, result.ctx) and ckpt.config == cfg and ckpt.history == result.history
    save_checkpoint(out, clip=rn50, classnames=CLASSES, config=cfg, state=result.state)  # overwrite in place
    assert {p.name for p in out.iterdir()} == {TENSORS_FILE, META_FILE, CLASSIFIER_FILE}
    # the exported classifier equals the text features recomputed from the saved context, by the plain
    # 77-token path (no cut, no prefix sharing)
    clf = load_classifier(out)
    learner = PromptLearner(rn50, CLASSES)
    with torch.no_grad():
        learner.ctx.copy_(ckpt.ctx)
        plain = PromptTextEncoder(rn50, cut=False, share_prefix=False)(learner)
    assert clf.classnames == CLASSES and clf.text_features.shape == (3, rn50.embed_dim)
    assert torch.allclose(clf.text_features, plain, atol=1e-5)
    assert torch.allclose(ckpt.text_features(rn50), clf.text_features, atol=1e-6)
    assert clf.logit_scale == pytest.approx(float(rn50.model.logit_scale))
    ev = evaluate_classifier(clf.text_features, feats[:, 0], labels, clf.logit_scale)
    assert ev.accuracy == pytest.approx(result.history[-1].val_acc)

    # another variant (context from words, class token in the middle) rebuilds the same classifier
    cfg2 = _tiny_config(max_epoch=1, ctx_init="a photo of a", class_token_position="middle")
    other = train_prompt(feats, labels, rn50, CLASSES, cfg2)
    ckpt2 = load_checkpoint(save_result(tmp_path / "run2", other, clip=rn50, classnames=CLASSES, config=cfg2))
    assert ckpt2.variant == {"n_ctx": 4, "ctx_init": "a photo of a", "csc": False, "class_token_position": "middle"}
    assert torch.allclose(ckpt2.text_features(rn50), other.text_features, atol=1e-6)

    # a save killed between the tensor file and the JSON still loads the previous consistent pair
    (out / (TENSORS_FILE + ".prev")).write_bytes((out / TENSORS_FILE).read_bytes())
    export_classifier(out / TENSORS_FILE, clf.text_features, classnames=CLASSES, model="RN50", weights="x",
                      logit_scale=1.0)
    assert torch.equal(load_checkpoint(out).ctx, result.ctx)
    # otherwise a mismatched tensor file is detected through the recorded hash
    (out / (TENSORS_FILE + ".prev")).unlink()
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(out)


def test_checkpoint_refuses_store_of_other_model_weights_or_classes(rn50, toy, tmp_path):
    feats, labels = toy
    cfg = _tiny_config(max_epoch=1)
    result = train_prompt(feats, labels, rn50, CLASSES, cfg)
    out = save_result(tmp_path / "run", result, clip=rn50, classnames=CLASSES, config=cfg)
    ckpt, clf = load_checkpoint(out), load_classifier(out)
    f, y = feats[:, :1].numpy(), labels.numpy()

    good = open_store(make_store(tmp_path / "c1", model="RN50", weights=rn50.weights_id, classnames=CLASSES,
                                  feats=f, labels=y))
    ckpt.check_store(good)
    clf.check_store(good)
    cases = {
        "model RN50 vs ViT-B-32": dict(model="ViT-B-32", weights=rn50.weights_id, classnames=CLASSES),
        "weights": dict(model="RN50", weights="open_clip:RN50/openai", classnames=CLASSES),
        "class 2 is 'sea or lake' vs 'river'": dict(model="RN50", weights=rn50.weights_id,
                                                     classnames=["cat", "dog", "river"]),
        "3 classes vs 4": dict(model="RN50", weights=rn50.weights_id, classnames=[*CLASSES, "x"]),
    }
    for i, (message, kw) in enumerate(cases.items()):
        store = open_store(make_store(tmp_path / f"m{i}", feats=f, labels=y, **kw))
        for obj in (ckpt, clf):
            with pytest.raises(CheckpointError) as info:
                obj.check_store(store)
            text = str(info.value)
            assert message in text and str(store.path) in text and "\n" not in text and "coopipe encode" in text
    with pytest.raises(CheckpointError, match="trained with RN50"):
        ckpt.check_clip(type(rn50)(model=rn50.model, name="ViT-B-32", weights=rn50.weights,
                                   preprocess=rn50.preprocess, tokenizer=rn50.tokenizer))


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(rn50, toy, tmp_path):
    feats, labels = toy
    f, y = feats.numpy(), labels.numpy()
    cache = tmp_path / "cache"
    make_store(cache, model="RN50", weights=rn50.weights_id, classnames=CLASSES, feats=f, labels=y, split="train",
                rows={"count": len(y)})
    # a split that was never encoded
    with pytest.raises(StoreError, match="no feature store for toy/val.*coopipe encode"):
        select_store(cache, "toy", "val", model="RN50", weights=rn50.weights_id)
    # the whole split is asked for, but only a subset store exists
    with pytest.raises(StoreError, match="holds the whole split"):
        select_store(cache, "toy", "train", model="RN50", weights=rn50.weights_id)
    store = select_store(cache, "toy", "train", model="RN50", weights=rn50.weights_id, positions=[0, 5])
    part = read_split(store, [0, 5])
    assert part.features.shape == (2, 3, 1024) and part.labels.tolist() == [0, 1]
    assert torch.allclose(part.features, feats[[0, 5]])
    with pytest.raises(StoreError, match="holds all 2 requested images"):
        select_store(cache, "toy", "train", model="RN50", weights=rn50.weights_id, positions=[0, 99])
    # NaN / inf features: from a store, and handed in directly
    bad = f.copy()
    bad[1, 2, 3] = np.inf
    nan_store = open_store(make_store(tmp_path / "nan", model="RN50", weights=rn50.weights_id, classnames=CLASSES,
                                       feats=bad, labels=y))
    with pytest.raises(StoreError, match="NaN/inf"):
        read_split(nan_store)
    with pytest.raises(StoreError, match="NaN/inf"):
        train_prompt(torch.from_numpy(bad), labels, rn50, CLASSES, _tiny_config())
    # features of another model (other width), labels beyond the class list
    with pytest.raises(ProvenanceMismatchError, match="dimension 512"):
        train_prompt(feats[..., :512], labels, rn50, CLASSES, _tiny_config())
    with pytest.raises(DatasetError, match="0..1"):
        train_prompt(feats, labels, rn50, CLASSES[:2], _tiny_config())
    # more shots than the smallest class holds
    from coopipe.datasets import sample_few_shot

    with pytest.raises(DatasetError, match="shots"):
        sample_few_shot([0, 0, 0, 1, 1, 2, 2, 2], 3, 3, seed=1, classnames=CLASSES)


# ---------------------------------------------------------------- metrics and baselines
def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    k = 6
    y = rng.integers(0, k - 1, size=300)  # class 5 never occurs as a label
    p = np.where(rng.random(300) < 0.5, y, rng.integers(0, k, size=300))
    cm = confusion_matrix(y, p, k)
    assert np.array_equal(cm, sk_confusion_matrix(y, p, labels=list(range(k))))
    ev = evaluate_predictions(y, p, k)
    assert ev.accuracy == pytest.approx(accuracy_score(y, p))
    assert macro_f1(cm) == pytest.approx(f1_score(y, p, average="macro"))
    per_class = per_class_accuracy(cm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk_recall = recall_score(y, p, labels=list(range(k)), average=None, zero_division=0)
    assert np.allclose(per_class[:5], sk_recall[:5]) and np.isnan(per_class[5])
    assert json.dumps(ev.to_dict([f"c{i}" for i in range(k)]))  # JSON-able, NaN -> null


def test_zero_shot_and_prompt_ensembling(rn50, toy):
    feats, labels = toy
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert dataset_template("EuroSAT") == "a centered satellite photo of {}."
    assert dataset_template("my-own-data") == "a photo of a {}."
    encoder = PromptTextEncoder(rn50)
    single = zero_shot_classifier(rn50, CLASSES, "a photo of a {}.", encoder=encoder)
    direct = rn50.model.encode_text(rn50.tokenizer([f"a photo of a {c}." for c in CLASSES]), normalize=True)
    assert torch.allclose(single, direct.detach(), atol=1e-5)
    templates = list(IMAGENET_TEMPLATES[:3])
    ens = zero_shot_classifier(rn50, CLASSES, templates, encoder=encoder)
    each = torch.stack([zero_shot_classifier(rn50, CLASSES, t, encoder=encoder) for t in templates])  # (T, K, D)
    assert torch.allclose(ens, torch.nn.functional.normalize(each.mean(0), dim=-1), atol=1e-6)
    ev = zero_shot(rn50, CLASSES, templates, feats[:, 0], labels, encoder=encoder)
    assert ev.n == len(labels) and 0.0 <= ev.accuracy <= 1.0 and ev.confusion.shape == (3, 3)
    with pytest.raises(ParamsError, match="exactly one"):
        zero_shot_classifier(rn50, CLASSES, "no slot", encoder=encoder)


def test_linear_probe_picks_c_on_validation():
    # 256-d, few and imbalanced training images: a small C predicts the majority class (25% on balanced val),
    # a very large C overfits the noise; the best C lies in between
    rng = np.random.default_rng(0)
    k, d = 4, 256
    means = 3 * rng.normal(size=(k, d))
    y_tr, y_val = np.repeat(np.arange(k), [24, 6, 6, 6]), np.repeat(np.arange(k), 25)
    x_tr = means[y_tr] + 8 * rng.normal(size=(len(y_tr), d)) + 5
    x_val = means[y_val] + 8 * rng.normal(size=(len(y_val), d)) + 5
    probe = fit_linear_probe(x_tr, y_tr, x_val, y_val, c_grid=[1e-4, 1e-2, 1, 1e2, 1e4], refine_steps=4)
    accs = dict(probe.search)
    assert probe.C in accs and probe.val_accuracy == max(accs.values())
    assert accs[1e-4] == 0.25 and probe.val_accuracy > 0.8  # over-regularised: the majority class only
    assert 1e2 < probe.C <= 1e4 and len(accs) > 5  # refined between the grid's best neighbours
    again = fit_linear_probe(x_tr, y_tr, x_val, y_val, c_grid=[1e-4, 1e-2, 1, 1e2, 1e4], refine_steps=4)
    assert again.C == probe.C and np.array_equal(again.classifier.coef_, probe.classifier.coef_)
    # the returned classifier is plain lbfgs logistic regression on L2-normalised train features with that C
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    ref = LogisticRegression(C=probe.C, solver="lbfgs", max_iter=1000).fit(norm(x_tr), y_tr)
    assert np.array_equal(ref.predict(norm(x_val)), probe.predict(x_val))
    assert probe.evaluate(x_val, y_val).accuracy == pytest.approx(probe.val_accuracy)


# ---------------------------------------------------------------- learning on real features
SHOTS, N_AUG, TEST_PER_CLASS = 16, 1, 20  # one augmented view: 30.0% test accuracy, as with two (measured)


@pytest.fixture(scope="module")
def eurosat_stores(request, eurosat, rn50, tmp_path_factory):
    """Few-shot train (16 x 10 images, centre + 1 augmented view), val (4 x 10) and test (20 x 10) stores.

    Encoding 560 images costs about a minute of CPU, so the stores live in pytest's cache folder
    (``.pytest_cache``) and later sessions reuse them (encode_split is a no-op for an existing store).
    """
    from coopipe.datasets import make_few_shot_index, sample_few_shot
    from coopipe.encode import EncodeOptions, encode_split
    from coopipe.views import ViewSpec

    try:
        cache = request.config.cache.mkdir("coopipe-train-stores")
    except AttributeError:  # cache provider disabled (-p no:cacheprovider)
        cache = tmp_path_factory.mktemp("train-stores")
    index = make_few_shot_index(eurosat, SHOTS, seed=1)
    test_pos = sample_few_shot(eurosat.split("test").labels, eurosat.num_classes, TEST_PER_CLASS, seed=0)
    opts = EncodeOptions(precision="fp32", progress=False, num_workers=0)
    plan = {"train": (index.train_array(), ViewSpec(n_aug=N_AUG)), "val": (index.val_array(), ViewSpec()),
            "test": (test_pos, ViewSpec())}
    for split, (positions, views) in plan.items():
        encode_split(eurosat, split, cache_dir=cache, positions=positions, views=views, options=opts, clip=rn50)
    return cache, {split: positions for split, (positions, _) in plan.items()}


@pytest.mark.data
@pytest.mark.slow
def test_coop_learns_on_eurosat_features(eurosat_stores, eurosat, rn50, capsys):
    """With random weights the image features are nearly collinear (mean cosine ~0.999) and zero-shot sends every
    image to one class (10%). CoOp must clearly beat that on held-out test images.

    The class-specific-context variant (CSC) is trained: through a random text tower a shared context moves the 10
    class features apart very slowly (unified context reached ~15-18% in 30 epochs at any lr tried), while class
    contexts reach 25-30%. lr 0.05 and 30 epochs (instead of 0.002 and 200) keep the test around a minute.
    """
    cache, positions = eurosat_stores
    split = {}
    for name in ("train", "val", "test"):
        store = select_store(cache, "eurosat", name, model="RN50", weights=rn50.weights_id,
                             positions=positions[name], need_views=name == "train")
        split[name] = read_split(store, positions[name], all_views=name == "train")
    train, val, test = split["train"], split["val"], split["test"]
    assert train.features.shape == (10 * SHOTS, 1 + N_AUG, rn50.embed_dim) and test.features.shape[0] == 200
    classnames = train.classnames

    zs = zero_shot(rn50, classnames, dataset_template("eurosat"), test.center, test.labels)
    cfg = TrainConfig(max_epoch=30, lr=0.05, method=MethodSpec.of("coop", csc=True, n_ctx=4), seed=1)
    result = train_prompt(train.features, train.labels, rn50, classnames, cfg)  # val: only for the probe's C
    coop = evaluate_classifier(result.text_features, test.center, test.labels, result.logit_scale)
    probe = fit_linear_probe(train.center, train.labels, val.center, val.labels, n_classes=10)
    lp = probe.evaluate(test.center, test.labels)
    with capsys.disabled():
        print(f"\nEuroSAT, random-weights RN50, {SHOTS}-shot x 10 classes, 200 test images: zero-shot "
              f"{zs.accuracy:.1%}, CoOp (CSC, 30 ep) {coop.accuracy:.1%}, linear probe {lp.accuracy:.1%} "
              f"(C={probe.C:.3g}); CoOp train acc {result.history[-1].train_acc:.1%}, {result.seconds:.0f}s")
    assert coop.accuracy >= zs.accuracy + 0.08
    assert coop.accuracy >= 0.18 and lp.accuracy > zs.accuracy
