"""Every departure from a method's paper setting is recorded: in the metrics file of a trained run and beside the
run in the report; ``--views 1`` with a training method warns that every epoch sees one fixed crop."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_toy_cache

from coopipe.departures import NESTED_DRAWS, feature_departures, training_departures
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.report.records import record_from_metrics
from coopipe.report.tables import markdown_report
from coopipe.train_config import TrainConfig

CLASSES = ["cat", "dog", "sea or lake", "forest"]


def test_a_views_1_batch_4_cocoop_run_lists_both_departures(rn50, tmp_path, caplog) -> None:
    torch.set_num_threads(1)
    cache = make_toy_cache(tmp_path / "cache", rn50, CLASSES, {"train": (4, 2), "val": (2, 1), "test": (3, 1)})
    run = tmp_path / "cocoop"  # the train store holds the centre view and one augmented view: --views 1
    with caplog.at_level(logging.WARNING, logger="coopipe.departures"):
        run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, progress=False, clip=rn50,
                  overrides={"method": "cocoop", "max_epoch": 2, "batch_size": 4})
    assert any("--views 1" in r.getMessage() and "same single random crop" in r.getMessage() for r in caplog.records)
    run_eval(run, cache_dir=cache, clip=rn50)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["batch_size"], metrics["paper_batch_size"], metrics["cached_views"]) == (4, 1, 1)
    listed = metrics["departures"]
    assert "batch size 4 (paper 1)" in listed
    assert any(d.startswith("1 cached augmented view: every epoch sees the same crop") for d in listed)
    assert "2 epochs (paper 10)" in listed and NESTED_DRAWS in listed
    assert len(listed) == len(set(listed))
    record = record_from_metrics(metrics, str(run / "metrics.json"))
    assert "batch size 4 (paper 1)" in record.model  # never averaged with batch-1 runs
    report = markdown_report([], [], [], [], [], records=[record])
    (line,) = [x for x in report.splitlines() if x.startswith(f"- `{run / 'metrics.json'}`")]
    assert "departures:" in line and "1 cached augmented view" in line and "batch size 4 (paper 1)" in line


def test_the_paper_setting_departs_only_by_its_cached_views_and_draws() -> None:
    paper = TrainConfig.for_method("coop", 16).to_dict()
    views = {"n_aug": 16, "scale": [0.08, 1.0], "flip": True}
    assert training_departures(paper, paper, views, shots=16) == [
        "16 cached augmented views over 200 epochs, each reused ~12.5x (paper: a fresh random crop of every image "
        "each epoch)", NESTED_DRAWS,
    ]
    changed = {**paper, "lr": 0.01, "views": "center", "autocast_bf16": True}
    found = training_departures(changed, paper, {**views, "scale": [0.5, 1.0]}, shots=16)
    assert "lr 0.01 (paper 0.002)" in found and "text path in bf16 autocast (paper fp16)" in found
    assert any(d.startswith("no augmentation") for d in found) and "augmentation: crop scale 0.5-1 (paper 0.08-1)" in found
    age = training_departures(paper, paper, views, shots=16, age=True)
    assert any(p.startswith("last epoch kept (OrdinalCLIP keeps the epoch of best validation MAE") for p in age)
    assert "augmentation: random resized crop (OrdinalCLIP: resize 256, random crop 224, flip)" in age
    assert feature_departures({"precision": "bf16"}) == ["image features computed in bf16 (paper fp16)"]
    assert feature_departures({"precision": "fp32"}) == []


def test_rank_prompts_depart_from_ordinalclips_setting_only_where_they_change_it() -> None:
    """The rank prompts' paper setting is OrdinalCLIP's (RAdam 1e-4, no warm-up): at that setting no optimiser
    departure; CoOp's lr and warm-up given to a rank run are departures."""
    paper = TrainConfig.for_method("rank", 16, "utkface").to_dict()
    found = training_departures(paper, paper, None, shots=16, age=True)
    assert not any(p.startswith(("lr ", "warm-up", "weight decay")) for p in found)
    coop_like = TrainConfig.for_method("rank", 16, "utkface", lr=0.002, warmup_epoch=1).to_dict()
    found = training_departures(coop_like, paper, None, shots=16, age=True)
    assert "lr 0.002 (paper 0.0001)" in found and "warm-up epochs 1 (paper 0)" in found


@pytest.mark.parametrize("policy", ["augmented", "center"])
def test_views_1_warns_only_when_training_draws_the_crop(policy: str, caplog) -> None:
    from coopipe.departures import warn_single_view

    with caplog.at_level(logging.WARNING, logger="coopipe.departures"):
        warn_single_view(1, trains=policy != "center")
    assert bool(caplog.records) == (policy == "augmented")
