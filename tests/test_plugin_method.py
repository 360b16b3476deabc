"""Methods as plug-ins: a method defined in this file (a learned residual on CLIP's zero-shot class text features)
is registered through the public registry and goes through every path of the tool with no library file changed
for it: training and checkpoints, resume after SIGKILL, evaluation, prediction, the sweep and the report. And the
drift bugs of the method copies stay fixed: rank runs train their paper epochs, ``rank_b5`` trains 5 base ranks,
M is one number (tokens) in every record of a run."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_cache
from sigkill import kill_and_resume
from torch import nn

from coopipe.checkpoint import load_checkpoint
from coopipe.checkpoint_files import CLASSIFIER_FILE, META_FILE
from coopipe.classifier import load_classifier
from coopipe.learners import ClassifierLearner
from coopipe.methods import Method, MethodSpec, Optimization, method_names, register, unregister
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder
from coopipe.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
AGE_INIT = "age estimation: the age of the person is"  # 8 words, 10 tokens
KILLS = 4


# ---------------------------------------------------------------- the method, as a contributor would write it
@dataclasses.dataclass(frozen=True)
class ResidualOptions:
    template: str = "a photo of a {}."


class ResidualLearner(ClassifierLearner, nn.Module):
    """Zero-shot class text features (frozen) plus a learned residual per class, re-normalised."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], template: str) -> None:
        super().__init__()
        tokens = torch.as_tensor(clip.tokenizer([template.format(c) for c in classnames]))  # (K, L)
        with torch.no_grad():
            base = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)  # (K, D)
        self.register_buffer("base", base, persistent=False)
        self.residual = nn.Parameter(torch.zeros_like(base))  # (K, D)
        self.classnames, self.template, self.n_cls = list(classnames), template, len(classnames)

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        return F.normalize(self.base + self.residual, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"classnames": self.classnames, "template": self.template}


class Residual(Method):
    name = "residual"
    title = "Text residual"
    options = ResidualOptions
    batch_size = 4

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        return 12

    def optimizer(self, params: Mapping[str, nn.Parameter], opt: Optimization) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(params.values()), lr=opt.lr)  # its own optimiser

    def transferable(self, options: ResidualOptions) -> bool:
        return False  # one residual per training class

    def build_learner(self, options: ResidualOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> ResidualLearner:
        return ResidualLearner(clip, classnames, options.template)


@pytest.fixture(scope="module", autouse=True)
def residual_registered():
    register(Residual())
    yield
    unregister("residual")


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (4, 2), "val": (2, 1), "test": (3, 1)})


def _cli(args: Sequence[str]) -> None:
    from coopipe.cli import app

    app(args=["--log-level", "WARNING", *args], standalone_mode=False)


def _cli_child(args: tuple[str, ...]) -> None:
    """A `coopipe` process that knows the method (a plug-in registers itself where it is imported)."""
    os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    register(Residual())
    _cli(args)


# ---------------------------------------------------------------- acceptance
def test_a_registered_method_trains_checkpoints_evaluates_predicts_sweeps_and_reports(cache, rn50, tmp_path):
    assert "residual" in method_names() and MethodSpec.parse("residual") == MethodSpec("residual")
    run = tmp_path / "run"
    _cli(["train", "--features", str(cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out", str(run),
          "--method", "residual", "--lr", "0.01", "--no-progress"])
    ckpt = load_checkpoint(run)
    assert ckpt.complete and ckpt.method == MethodSpec("residual") and ckpt.config.max_epoch == 12
    assert set(ckpt.learner_tensors) == {"residual"} and set(ckpt.train_state().optimizer) == {
        "residual.step", "residual.exp_avg", "residual.exp_avg_sq"}  # Adam's state, by parameter name
    assert float(ckpt.learner_tensors["residual"].abs().max()) > 0  # it learned
    assert ckpt.history[-1].loss < ckpt.history[0].loss

    _cli(["eval", str(run), "--features", str(cache)])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "residual" and metrics["paper_epochs"] == 12 and 0 <= metrics["accuracy"] <= 1

    from coopipe.features import select_store
    from coopipe.predict import predict

    test_store = select_store(cache, "toy", "test", model=rn50.name, weights=rn50.weights_id)
    predictions = predict(run, store=test_store.path, topk=2)
    assert len(predictions) == 9 and {p.labels[0] for p in predictions} <= set(CLASSES)

    runs = tmp_path / "runs"
    _cli(["sweep", "--dataset", "toy", "--no-encode", "--cache", str(cache), "--runs", str(runs), "--methods",
          "residual", "--shots", "1,2", "--seeds", "1", "--pretrained", "none", "--scheduler", "inline",
          "--no-progress", "--train-args", "--lr 0.05"])
    for shots in (1, 2):
        assert (runs / "toy" / "residual" / f"shots{shots}_seed1" / "metrics.json").is_file()
    report = (runs / "report" / "report.md").read_text()
    assert "Text residual" in report


@pytest.mark.slow  # two 200-epoch runs and four killed ones, each a forked `coopipe` process: about 45 s of CPU
@pytest.mark.timeout(900)
def test_resume_after_sigkill_equals_an_uninterrupted_run(cache, tmp_path):
    """SIGKILL `coopipe train` of the plug-in while it trains and checkpoints (after its first checkpoint, at a
    random delay); the run resumed from whatever the kills left is bitwise the uninterrupted one (every tensor,
    Adam's state, the classifier, the history)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["coopipe.cli"])

    def start(out: Path) -> multiprocessing.process.BaseProcess:
        args = ("train", "--features", str(cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out",
                str(out), "--method", "residual", "--lr", "0.01", "--max-epoch", "200", "--checkpoint-every", "0",
                "--no-progress")
        proc = ctx.Process(target=_cli_child, args=(args,))
        proc.start()
        return proc

    reference, out = kill_and_resume(start, tmp_path, kills=KILLS, max_delay=0.5)
    a, b = load_checkpoint(reference), load_checkpoint(out)
    assert a.complete and b.complete and a.epoch == b.epoch == 200
    assert a.tensors.keys() == b.tensors.keys()
    for name, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[name]), name
    assert torch.equal(load_classifier(reference).text_features, load_classifier(out).text_features)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]


def test_resume_refuses_only_what_changes_the_result(cache, rn50, tmp_path):
    from coopipe.errors import CheckpointError
    from coopipe.jobs.train import run_train

    common = dict(cache_dir=cache, dataset="toy", shots=1, seed=1, out_dir=tmp_path / "run", progress=False, clip=rn50)
    run_train(overrides={"method": "residual", "lr": 0.05}, **common)
    run_train(overrides={"method": "residual", "lr": 0.05, "class_chunk": 2}, **common)  # memory only: accepted
    with pytest.raises(CheckpointError, match="another training config.*lr"):
        run_train(overrides={"method": "residual", "lr": 0.01}, **common)


# ---------------------------------------------------------------- the drift bugs
def test_a_default_rank_run_trains_its_paper_epochs_at_every_shot_count():
    for shots in (1, 2, 4, 8, 16):
        config = TrainConfig.for_method("rank", shots, "utkface")
        assert config.max_epoch == config.method.paper_epochs(shots, "utkface") == 100  # the report's reference
    assert TrainConfig.for_method("coop", 16, "utkface").max_epoch == 200


def test_rank_b5_trains_a_learner_with_5_base_ranks(rn50, tmp_path):
    """Through the sweep's path: the label, the task's training options, the job, the learner."""
    from conftest import make_toy_cache as toy
    from coopipe.jobs.train import run_train
    from coopipe.sweep.plan import RunSettings
    from coopipe.sweep.tasks import _overrides

    ranks = [str(r) for r in range(6)]
    cache = toy(tmp_path / "cache", rn50, ranks, {"train": (2, 1)})
    overrides = _overrides(RunSettings(cache=str(cache), epochs=1), MethodSpec.parse("rank_b5"))
    run_train(cache_dir=cache, dataset="toy", shots=1, seed=1, out_dir=tmp_path / "run", overrides=overrides,
              progress=False, clip=rn50)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.method.label() == "rank_b5" and ckpt.variant["n_base_ranks"] == 5
    assert ckpt.learner_tensors["rank_embeds"].shape[0] == 5


def test_m_is_one_number_in_tokens_in_every_record_of_a_run(cache, rn50, tmp_path):
    from coopipe.jobs.evaluate import run_eval
    from coopipe.jobs.train import run_train

    out = tmp_path / "run"
    summary = run_train(cache_dir=cache, dataset="toy", shots=1, seed=1, out_dir=out, progress=False, clip=rn50,
                        overrides={"method": "coop", "ctx_init": AGE_INIT, "max_epoch": 1})
    metrics = run_eval(out, cache_dir=cache, clip=rn50)
    meta = json.loads((out / META_FILE).read_text())
    tokens = int(load_checkpoint(out).ctx.shape[0])
    assert tokens == 10 and len(AGE_INIT.split()) == 8
    assert {meta["method"]["n_ctx"], meta["config"]["method"]["n_ctx"], meta["variant"]["n_ctx"],
            summary["method_spec"]["n_ctx"], summary["variant"]["n_ctx"], metrics["method_spec"]["n_ctx"]} == {tokens}
    assert summary["method"] == "coop_init-age-estimation:-the-age-of-the-person-is"
    assert (out / CLASSIFIER_FILE).is_file()
