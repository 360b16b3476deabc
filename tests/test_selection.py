"""Model selection (``select_every``): off by default (the last epoch, as in the papers); when asked for, it keeps the
epoch of best few-shot validation accuracy, never reads the test split, survives kills and resumes to the
uninterrupted result, is refused on a resume that changes it, and every record of the run says what was kept."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_store, make_toy_cache
from sigkill import kill_and_resume
from torch import nn

from coopipe.checkpoint import CLASSIFIER_FILE, META_FILE, load_checkpoint, load_classifier
from coopipe.errors import CheckpointError, ParamsError, StoreError
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.methods import MethodSpec
from coopipe.selection import SELECTED_ON, Selector
from coopipe.selection_store import BEST_FILE
from coopipe.train_config import EpochRecord, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
# noisy features and a high lr: validation accuracy 0.667 after epoch 1, 0.833 from epoch 2 on, so the kept epoch
# (the first of the best) is 2 of 4, not the last
QUICK = {"method": "coop", "max_epoch": 4, "n_ctx": 2, "batch_size": 4, "lr": 2.0, "warmup_epoch": 0}
NOISE = 1.5


class Killed(Exception):
    """Stands for a kill at a chosen point: what was written before it stays, nothing after it runs."""


@pytest.fixture(scope="module")
def caches(rn50, tmp_path_factory) -> dict[str, Path]:
    """Train (2 views) and val stores of a 3-class toy dataset, with the test store intact, poisoned or absent."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("selection")
    absent = _noisy_cache(root / "absent", rn50, NOISE)
    intact = root / "intact"
    shutil.copytree(absent, intact)
    make_toy_cache(intact, rn50, CLASSES, {"test": (2, 1)})
    poisoned = root / "poisoned"
    shutil.copytree(absent, poisoned)
    make_store(poisoned, model=rn50.name, weights=rn50.weights_id, classnames=CLASSES,
               feats=np.full((6, 1, rn50.embed_dim), np.nan, dtype=np.float32),
               labels=(np.repeat(np.arange(3), 2) + 1) % 3, split="test")  # NaN features, every label wrong
    return {"intact": intact, "poisoned": poisoned, "absent": absent}


def _noisy_cache(root: Path, clip, noise: float) -> Path:
    """Train (2 views) and val stores of :data:`CLASSES` whose features are class means plus ``noise``."""
    g = np.random.default_rng(0)
    means = g.normal(size=(len(CLASSES), clip.embed_dim)).astype(np.float32)
    for split, (n, views) in {"train": (4, 2), "val": (4, 1)}.items():
        labels = np.repeat(np.arange(len(CLASSES)), n)
        feats = means[labels][:, None] + noise * g.normal(size=(len(labels), views, clip.embed_dim)).astype(np.float32)
        make_store(root, model=clip.name, weights=clip.weights_id, classnames=CLASSES, feats=feats, labels=labels,
                   split=split)
    return root


def _train(cache: Path, out: Path, clip, **overrides) -> dict:
    return run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=out, progress=False, clip=clip,
                     checkpoint_every=0, overrides={**QUICK, **overrides})


def _same_run(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.complete and y.complete and x.meta["selection"] == y.meta["selection"]
    assert x.learner_tensors.keys() == y.learner_tensors.keys()
    for name, tensor in x.learner_tensors.items():
        assert torch.equal(tensor, y.learner_tensors[name]), name
    assert torch.equal(load_classifier(a).text_features, load_classifier(b).text_features)
    assert [r.to_dict() | {"seconds": 0} for r in x.history] == [r.to_dict() | {"seconds": 0} for r in y.history]


# ---------------------------------------------------------------- the rule
class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def test_the_planted_best_epoch_is_kept_earliest_among_ties_and_only_on_candidate_epochs():
    """Validation accuracies planted per epoch: 0.2 0.9 0.5 0.9 0.95 0.3 with the learner's value = its epoch."""
    planted = [0.2, 0.9, 0.5, 0.9, 0.95, 0.3]
    # every 2: epochs 2, 4, 6 (2 and 4 tie: the earlier stays); every 4: epochs 4 and the last (6); every 3: 3 and 6
    for every, want in ((1, 5), (2, 2), (4, 4), (3, 3)):
        learner, stored = _Scalar(), []
        selector = Selector(every, len(planted), on_best=stored.append)
        for epoch, acc in enumerate(planted, 1):
            with torch.no_grad():
                learner.w.fill_(epoch)
            selector.observe(EpochRecord(epoch=epoch, lr=0.1, loss=1.0, train_acc=0.5, val_acc=acc), learner)
        assert selector.best is not None and selector.best.epoch == want, every
        selector.restore(learner)
        assert float(learner.w.detach()[0]) == selector.best.epoch and stored[-1] is selector.best
    ties = Selector(1, 3)
    for epoch in (1, 2, 3):
        ties.observe(EpochRecord(epoch=epoch, lr=0.1, loss=1.0, train_acc=0.5, val_acc=0.5), _Scalar())
    assert ties.best is not None and ties.best.epoch == 1


def test_selection_is_off_by_default_and_needs_a_validation_split(caches, rn50, tmp_path):
    from coopipe.sweep.options import train_args
    from coopipe.sweep.plan import RunSettings
    from coopipe.sweep.tasks import _overrides

    assert TrainConfig().select_every == 0 == TrainConfig.for_method("rank", 16, "utkface").select_every
    assert train_args("--select-every 5") == {"select_every": 5}  # a sweep's --train-args reach it
    with pytest.raises(ParamsError, match="select_every must be 0 or more"):
        run_train(cache_dir=caches["intact"], dataset="toy", shots=2, seed=1, out_dir=tmp_path / "bad", clip=rn50,
                  progress=False, overrides={"select_every": -2})
    with pytest.raises(ParamsError, match="select_every must be 0"):
        TrainConfig(select_every=-1)
    for method in ("tipadapter", "zeroshot", "linear_probe"):  # a training-free method has no epoch to select
        with pytest.raises(ParamsError, match="trains nothing.*select_every must be 0"):
            TrainConfig.for_method(method, 16, select_every=1)
    # a sweep's --select-every reaches the methods that train, not the training-free ones it runs beside them
    settings = RunSettings(train_options={"select_every": 1})
    assert _overrides(settings, MethodSpec.of("coop"))["select_every"] == 1
    assert "select_every" not in _overrides(settings, MethodSpec.of("zeroshot"))
    no_val = tmp_path / "noval"
    make_toy_cache(no_val, rn50, CLASSES, {"train": (4, 2)})
    (no_val / "toy" / "fewshot").mkdir(parents=True, exist_ok=True)
    with pytest.raises((ParamsError, StoreError), match="validation split"):
        _train(no_val, tmp_path / "run", rn50, select_every=1)
    summary = _train(caches["intact"], tmp_path / "last", rn50)
    assert summary["selection"] == {"rule": "last epoch"} and "selection" not in load_checkpoint(tmp_path / "last").meta


# ---------------------------------------------------------------- the job
def test_the_kept_epoch_is_the_runs_result_and_every_record_says_so(caches, rn50, tmp_path, monkeypatch):
    """The kept epoch is the earliest of best validation accuracy; its tensors are the checkpoint's, the classifier's
    and what evaluation scores; train.json, prompt.json and metrics.json say which epoch and on what, and the
    departures list the selection. About 3 s on 2 shared cores."""
    import coopipe.jobs.train as job

    states = {}
    save = job.save_checkpoint

    def remember(directory, **kwargs):
        states[kwargs["state"].epoch] = {k: t.clone() for k, t in kwargs["state"].params.items()}
        return save(directory, **kwargs)

    monkeypatch.setattr(job, "save_checkpoint", remember)  # the resume checkpoints hold each epoch's tensors
    run = tmp_path / "run"
    summary = _train(caches["intact"], run, rn50, select_every=1)
    ckpt = load_checkpoint(run)
    accs = [r.val_acc for r in ckpt.history]
    kept = 1 + int(np.argmax(accs))  # the first of the best
    assert kept == 2 < QUICK["max_epoch"] and accs[1:] == [max(accs)] * (len(accs) - 1), accs  # the first of the best, not the last
    assert ckpt.meta["selection"] == summary["selection"] == {
        "rule": "best validation epoch", "on": SELECTED_ON, "every": 1, "epoch": kept, "val_acc": max(accs)}
    assert ckpt.epoch == QUICK["max_epoch"] and ckpt.complete  # trained to the end, the kept epoch is the result
    assert torch.equal(ckpt.learner_tensors["ctx"], states[kept]["ctx"])
    assert not torch.equal(ckpt.learner_tensors["ctx"], states[QUICK["max_epoch"] - 1]["ctx"])
    assert torch.allclose(load_classifier(run).text_features, ckpt.text_features(rn50), atol=1e-6)
    metrics = run_eval(run, cache_dir=caches["intact"], clip=rn50)
    assert metrics["selection"]["epoch"] == kept and metrics["selection"]["on"] == SELECTED_ON
    assert any(d.startswith("model selection: the epoch of best few-shot validation accuracy, checked every epoch")
               and d.endswith("(paper: last epoch)") for d in metrics["departures"])
    assert json.loads((run / "train.json").read_text())["selection"]["epoch"] == kept


def test_the_test_split_never_takes_part(caches, rn50, tmp_path):
    """The same run on a cache whose test store is intact, poisoned (NaN, every label wrong) or absent keeps the
    same epoch and the same tensors."""
    for name, cache in caches.items():
        _train(cache, tmp_path / name, rn50, select_every=2)
    _same_run(tmp_path / "intact", tmp_path / "poisoned")
    _same_run(tmp_path / "intact", tmp_path / "absent")


@pytest.mark.slow  # nine 4-epoch runs: about 15 s on 2 shared cores
def test_kills_at_every_write_of_the_best_epoch_resume_to_the_uninterrupted_run(caches, rn50, tmp_path, monkeypatch):
    """Killed (an exception at the write) after the best epoch's tensors but before its record; after its record but
    before the epoch's checkpoint (the stored best newer than the checkpoint); after a checkpoint: each resumes to
    the uninterrupted run, bit for bit."""
    import coopipe.jobs.train as job
    import coopipe.selection_store as store

    cache = caches["intact"]
    _train(cache, tmp_path / "reference", rn50, select_every=1)
    points = {"before the record": (store, "write_json"), "before the checkpoint": (job, "save_checkpoint")}
    for label, (module, name) in points.items():
        for k in ((1, 2) if name == "write_json" else (2, 3)):  # best records at epochs 1, 2; checkpoints 1..3
            out = tmp_path / f"{name}{k}"
            real, calls = getattr(module, name), [0]

            def dying(*args, real=real, calls=calls, k=k, **kwargs):
                calls[0] += 1
                if calls[0] == k:
                    raise Killed(label)
                return real(*args, **kwargs)

            with monkeypatch.context() as patch:
                patch.setattr(module, name, dying)
                with pytest.raises(Killed):
                    _train(cache, out, rn50, select_every=1)
            _train(cache, out, rn50, select_every=1)
            _same_run(tmp_path / "reference", out)


def test_a_resume_that_changes_the_selection_is_refused_and_a_damaged_best_is_named(caches, rn50, tmp_path,
                                                                                    monkeypatch):
    import coopipe.jobs.train as job

    cache, run = caches["intact"], tmp_path / "run"
    real, calls = job.save_checkpoint, [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        real(*args, **kwargs)
        if calls[0] == 3:
            raise Killed()

    monkeypatch.setattr(job, "save_checkpoint", dying)
    with pytest.raises(Killed):
        _train(cache, run, rn50, select_every=1)
    monkeypatch.setattr(job, "save_checkpoint", real)
    assert load_checkpoint(run).epoch == 3 and (run / BEST_FILE).is_file()
    for other in (0, 2):
        with pytest.raises(CheckpointError, match="another training config.*select_every"):
            _train(cache, run, rn50, select_every=other)
    record = json.loads((run / BEST_FILE).read_text())
    kept = record["epoch"]
    (run / BEST_FILE).write_text(json.dumps({**record, "epoch": 3 if kept != 3 else 2}))  # a plausible value changed
    with pytest.raises(CheckpointError, match=f"{BEST_FILE}.*record_sha256"):
        _train(cache, run, rn50, select_every=1)
    (run / BEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{BEST_FILE}.*missing"):
        _train(cache, run, rn50, select_every=1)
    assert (run / META_FILE).is_file() and not (run / CLASSIFIER_FILE).exists()  # the finished epochs are kept


def test_the_age_note_says_what_ordinalclip_and_this_project_selected_on():
    from coopipe.age_report import PROTOCOL_NOTE, protocol_note
    from coopipe.departures import training_departures

    assert "this project keeps the last epoch" in PROTOCOL_NOTE == protocol_note(False)
    selected = protocol_note(True)
    assert "best validation MAE" in selected and "its validation list is its test list" in selected
    assert "best accuracy on the few-shot validation split" in selected and "never looks at the test split" in selected
    paper = TrainConfig.for_method("rank", 16, "utkface")
    found = training_departures({**paper.to_dict(), "select_every": 5}, paper.to_dict(), None, shots=16, age=True)
    assert ("model selection: the epoch of best few-shot validation accuracy, checked every 5 epochs and after the "
            "last (OrdinalCLIP keeps the epoch of best validation MAE; on MORPH its validation list is its test list)"
            in found)
    assert not any("last epoch kept" in d for d in found)


def _cli_child(args: Sequence[str]) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    from coopipe.cli import app

    app(args=["--log-level", "WARNING", *args], standalone_mode=False)


@pytest.mark.slow  # a 10-epoch run, two killed ones and their resume, each a forked `coopipe`: 60-150 s under load
@pytest.mark.timeout(900)
def test_resume_after_sigkill_equals_an_uninterrupted_run(rn50, tmp_path):
    """SIGKILL `coopipe train --select-every 1` at random points after its first checkpoint (the kept epoch changes
    at epochs 1 to 3 of this noisy toy run, then stays); the run resumed from what the kills left keeps the same epoch and the
    same tensors, classifier and history as the uninterrupted run."""
    cache = _noisy_cache(tmp_path / "cache", rn50, 4.0)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["coopipe.cli"])

    def start(out: Path) -> multiprocessing.process.BaseProcess:
        args = ("train", "--features", str(cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out",
                str(out), "--n-ctx", "2", "--batch-size", "4", "--lr", "0.02", "--max-epoch", "10",
                "--select-every", "1", "--checkpoint-every", "0", "--no-progress")
        proc = ctx.Process(target=_cli_child, args=(args,))
        proc.start()
        return proc

    try:
        reference, out = kill_and_resume(start, tmp_path, kills=2, max_delay=1.0)
    finally:  # the fork server ends with this test, not with the interpreter (tests/fault/test_kill_loop.py)
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    _same_run(reference, out)
    assert load_checkpoint(out).meta["selection"]["epoch"] < 10
