"""dvclive training metrics: one step per epoch from a real (tiny) training run, and a resumed run keeps the count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coopipe.checkpoint import load_checkpoint, save_checkpoint
from coopipe.jobs.train import run_train
from coopipe.metrics_log import DVCLIVE_DIR, EpochMetricsLog
from coopipe.store import store_path
from coopipe.store_writer import StoreWriter
from coopipe.methods import MethodSpec
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

CLASSES = ["cat", "dog", "sea or lake"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _outside_any_repo(tmp_path, monkeypatch):
    """dvclive looks for a DVC/Git repository from the working directory: run where there is none."""
    monkeypatch.chdir(tmp_path)


def _toy(n_per_class: int, n_views: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    means = g.standard_normal((len(CLASSES), dim))
    feats = means[labels][:, None, :] + 0.5 * g.standard_normal((len(labels), n_views, dim))
    return feats.astype(np.float32), labels


def _store(cache: Path, split: str, clip, n_views: int, seed: int) -> None:
    feats, labels = _toy(4, n_views, clip.embed_dim, seed)
    prov = {"dataset": "toy", "split": split, "model": clip.name, "weights": clip.weights_id, "classnames": CLASSES,
            "views": {"n_aug": n_views - 1}, "rows": "all"}
    writer = StoreWriter.create(store_path(cache, prov), prov, labels=labels.tolist(), index=list(range(len(labels))),
                                paths=[f"img{i}.jpg" for i in range(len(labels))], n_views=n_views,
                                dim=clip.embed_dim, dtype="float32")
    for chunk in writer.pending_chunks():
        span = writer.chunk_rows_range(chunk)
        writer.write_chunk(chunk, feats[span.start:span.stop])
    writer.finalize()


def _tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _steps(live_dir: Path, name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in _tsv(live_dir / "plots" / "metrics" / f"{name}.tsv")]


def test_training_writes_one_dvclive_step_per_epoch(rn50, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    _store(cache, "train", rn50, n_views=3, seed=0)
    _store(cache, "val", rn50, n_views=1, seed=1)
    summary = run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, clip=rn50, progress=False,
                        overrides={"max_epoch": 3, "batch_size": 2, "n_ctx": 2})
    assert not summary["skipped"]
    history = _tsv(run / "history.tsv")
    live = run / DVCLIVE_DIR
    for name in ("loss", "train_acc", "val_acc", "lr"):
        assert _steps(live, name) == [(int(h["epoch"]), pytest.approx(float(h[name]), abs=1e-5)) for h in history]
    latest = json.loads((live / "metrics.json").read_text())
    assert latest["step"] == 3
    assert latest["loss"] == pytest.approx(float(history[-1]["loss"]), abs=1e-5)
    assert not (live / "dvc.yaml").exists() and not (run / "dvc.yaml").exists()
    # a finished run is skipped and leaves its metrics as they are
    before = (live / "plots" / "metrics" / "loss.tsv").read_text()
    assert run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, clip=rn50, progress=False,
                     overrides={"max_epoch": 3, "batch_size": 2, "n_ctx": 2})["skipped"]
    assert (live / "plots" / "metrics" / "loss.tsv").read_text() == before


def _logged_until(run: Path, feats, labels, rn50, cfg: TrainConfig, stop_after: int) -> dict:
    """Train with dvclive logging until ``stop_after`` (a kill then); the train state of every epoch by number."""
    saved = {}
    with EpochMetricsLog(run) as log:
        def first_part(rec, state):
            log.log(rec)
            saved[rec.epoch] = state

        train_prompt(feats, labels, rn50, CLASSES, cfg, stop_after=stop_after, on_epoch=first_part)
    return saved


def test_resumed_run_continues_the_step_count(rn50, tmp_path):
    feats, labels = (torch.from_numpy(a) for a in _toy(3, 2, rn50.embed_dim, seed=2))
    cfg = TrainConfig(max_epoch=4, batch_size=3, method=MethodSpec.of("coop", n_ctx=2), seed=1)
    with EpochMetricsLog(tmp_path / "full") as log:
        full = train_prompt(feats, labels, rn50, CLASSES, cfg, on_epoch=lambda rec, state: log.log(rec))

    # killed after epoch 3 was logged, with the last checkpoint at epoch 2: epoch 3 is trained (and logged) again
    saved = _logged_until(tmp_path / "run", feats, labels, rn50, cfg, 3)
    save_checkpoint(tmp_path / "run", clip=rn50, classnames=CLASSES, config=cfg, state=saved[2])
    resume = load_checkpoint(tmp_path / "run").train_state()
    with EpochMetricsLog(tmp_path / "run", start_epoch=resume.epoch) as log:
        train_prompt(feats, labels, rn50, CLASSES, cfg, resume_state=resume, on_epoch=lambda rec, state: log.log(rec))

    for name in ("loss", "train_acc", "lr"):
        resumed = _steps(tmp_path / "run" / DVCLIVE_DIR, name)
        assert [s for s, _ in resumed] == [1, 2, 3, 4]
        assert resumed == _steps(tmp_path / "full" / DVCLIVE_DIR, name)
    assert [r.loss for r in full.history] == [v for _, v in _steps(tmp_path / "full" / DVCLIVE_DIR, "loss")]
    assert json.loads((tmp_path / "run" / DVCLIVE_DIR / "metrics.json").read_text())["step"] == 4


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_dvclive_summary_is_rebuilt_on_resume(rn50, tmp_path, damage):
    """dvclive writes metrics.json in place: a full disk or a kill inside that write must not stop every resume."""
    feats, labels = (torch.from_numpy(a) for a in _toy(3, 2, rn50.embed_dim, seed=2))
    cfg = TrainConfig(max_epoch=4, batch_size=3, method=MethodSpec.of("coop", n_ctx=2), seed=1)
    with EpochMetricsLog(tmp_path / "full") as log:
        train_prompt(feats, labels, rn50, CLASSES, cfg, on_epoch=lambda rec, state: log.log(rec))
    saved = _logged_until(tmp_path / "run", feats, labels, rn50, cfg, 2)
    summary = tmp_path / "run" / DVCLIVE_DIR / "metrics.json"
    text = summary.read_text()
    summary.write_text("" if damage == "empty" else text[: len(text) // 2])
    save_checkpoint(tmp_path / "run", clip=rn50, classnames=CLASSES, config=cfg, state=saved[2])
    resume = load_checkpoint(tmp_path / "run").train_state()
    with EpochMetricsLog(tmp_path / "run", start_epoch=resume.epoch) as log:
        assert json.loads(summary.read_text())["step"] == 2  # rebuilt before dvclive reads it
        train_prompt(feats, labels, rn50, CLASSES, cfg, resume_state=resume, on_epoch=lambda rec, state: log.log(rec))
    assert json.loads(summary.read_text()) == json.loads((tmp_path / "full" / DVCLIVE_DIR / "metrics.json").read_text())
    for name in ("loss", "train_acc", "lr"):
        assert _steps(tmp_path / "run" / DVCLIVE_DIR, name) == _steps(tmp_path / "full" / DVCLIVE_DIR, name)
