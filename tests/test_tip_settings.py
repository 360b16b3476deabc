"""Tip-Adapter's setting is its dataset's: the initial alpha and beta and the validation search grid of each
published config (gaopengcuhk/Tip-Adapter ``configs/*.yaml``, transcribed below from those files, independently of
the method module), ImageNet's for a dataset without one (a departure each run names), single values overridable by
label; a run records the config it used, and its search spans that config's grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_store

from coopipe.checkpoint import load_checkpoint
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.methods import MethodSpec, get_method
from coopipe.methods.tipadapter import TipAdapterOptions, resolve_setting

pytestmark = pytest.mark.usefixtures("one_thread")

# configs/<file>.yaml: init_alpha, init_beta, search_scale [beta, alpha], search_step [beta, alpha]
CONFIGS = {
    "imagenet": ("configs/imagenet.yaml", 1.17, 1, [7, 3], [200, 20]),
    "oxford_pets": ("configs/oxford_pets.yaml", 1.17, 1, [7, 3], [200, 20]),
    "eurosat": ("configs/eurosat.yaml", 2, 1, [12, 10], [200, 20]),
    "dtd": ("configs/dtd.yaml", 2, 1, [13, 13], [200, 20]),
    "fgvc_aircraft": ("configs/fgvc.yaml", 5, 1, [30, 30], [200, 20]),
}
CLASSES = ["cat", "dog", "sea or lake"]


def _as_config(setting) -> tuple:
    return (setting.init_alpha, setting.init_beta, [setting.beta_scale, setting.alpha_scale],
            [setting.beta_steps, setting.alpha_steps])


@pytest.mark.parametrize("method", ["tipadapter", "tipadapterf"])
def test_each_dataset_takes_its_published_setting(method):
    definition = get_method(method)
    for dataset, (file, *published) in CONFIGS.items():
        setting, used = resolve_setting(TipAdapterOptions(), dataset)
        assert (_as_config(setting), used) == (tuple(published), file), dataset
        assert definition.departures(TipAdapterOptions(), dataset) == []
    # a dataset without a published config: ImageNet's, named as a departure
    setting, used = resolve_setting(TipAdapterOptions(), "caltech101")
    assert (_as_config(setting), used) == (tuple(CONFIGS["imagenet"][1:]), "configs/imagenet.yaml")
    [departure] = definition.departures(TipAdapterOptions(), "caltech101")
    assert "caltech101 has no published setting" in departure and "configs/imagenet.yaml" in departure
    # a value given overrides the dataset's; every value given leaves nothing to take (and no departure)
    spec = MethodSpec.parse(f"{method}_a3_bn100")
    assert spec.options == TipAdapterOptions(init_alpha=3.0, beta_steps=100)
    setting, _ = resolve_setting(spec.options, "eurosat")
    assert _as_config(setting) == (3.0, 1, [12, 10], [100, 20])
    full = TipAdapterOptions(1.0, 1.0, 2.0, 2.0, 5, 5)
    assert resolve_setting(full, "caltech101")[1] == "" and definition.departures(full, "caltech101") == []
    assert MethodSpec(method).label() == method  # the paper setting on every dataset is the plain label


@pytest.mark.parametrize(("dataset", "file", "departs"), [("eurosat", "configs/eurosat.yaml", False),
                                                          ("toy", "configs/imagenet.yaml", True)])
def test_a_run_records_its_dataset_setting_and_names_the_departure(rn50, tmp_path, dataset, file, departs):
    """A training-free run on a toy cache named as the dataset: the config it used is in its variant, its searched
    alpha lies on that config's grid, and its metrics name the fallback only for a dataset without a config."""
    g = np.random.default_rng(0)
    means = g.normal(size=(len(CLASSES), rn50.embed_dim)).astype(np.float32)
    for split, n in (("train", 4), ("val", 3), ("test", 2)):
        labels = np.repeat(np.arange(len(CLASSES)), n)
        feats = means[labels][:, None] + 0.5 * g.normal(size=(len(labels), 2, rn50.embed_dim)).astype(np.float32)
        make_store(tmp_path / "cache", model=rn50.name, weights=rn50.weights_id, classnames=CLASSES, feats=feats,
                   labels=labels, split=split, dataset=dataset)
    run = tmp_path / "run"
    run_train(cache_dir=tmp_path / "cache", dataset=dataset, shots=4, seed=1, out_dir=run, progress=False, clip=rn50,
              overrides={"method": "tipadapter"})
    ckpt = load_checkpoint(run)
    assert ckpt.variant["setting"] == file and ckpt.method.label() == "tipadapter"
    setting, _ = resolve_setting(TipAdapterOptions(), dataset)
    alphas = [i * (setting.alpha_scale - 0.1) / setting.alpha_steps + 0.1 for i in range(setting.alpha_steps)]
    alpha = float(ckpt.learner_tensors["alpha"])
    assert alpha == 0.0 or min(abs(alpha - a) for a in alphas) < 1e-5  # 0: nothing beat zero accuracy
    metrics = run_eval(run, cache_dir=tmp_path / "cache", clip=rn50)
    named = [d for d in metrics["departures"] if "no published setting" in d]
    assert bool(named) == departs
