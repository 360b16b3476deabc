"""Every run records its cost (:mod:`coopipe.cost`): a trained run its training wall time and time per training
image (from its history, so a resume does not lose it), every evaluation its inference images/s and peak memory;
zero-shot CLIP and the linear probe theirs too. The peak-memory probe sees an allocation made inside it."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from conftest import make_toy_cache

from coopipe.cost import measure_inference, peak_memory, training_cost
from coopipe.train_config import EpochRecord

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (4, 2), "val": (2, 1), "test": (3, 1)})


def test_peak_memory_sees_an_allocation_inside_the_block():
    with peak_memory("cpu") as memory:  # 64 MiB of fresh anonymous pages, each touched: whatever the allocator holds
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    assert memory.bytes is not None and memory.bytes >= 48 * 2**20, memory
    assert memory.kind and memory.absolute_bytes is not None and memory.absolute_bytes >= memory.bytes
    _, cost = measure_inference(1000, lambda: torch.zeros(10))
    assert cost.images == 1000 and cost.seconds > 0 and cost.images_per_s == pytest.approx(1000 / cost.seconds)


def test_training_cost_is_setup_plus_epochs_over_images_seen():
    history = [EpochRecord(epoch=e, lr=0.1, loss=1.0, train_acc=0.5, seconds=2.0) for e in (1, 2, 3)]
    cost = training_cost(history, setup_seconds=1.0, images=10)
    assert cost.train_seconds == 7.0 and cost.images_seen == 30
    assert cost.seconds_per_image == pytest.approx(7.0 / 30)
    free = training_cost([], setup_seconds=0.5, images=10)  # a training-free fit sees each image once
    assert free.images_seen == 10 and free.seconds_per_image == pytest.approx(0.05)


def test_train_eval_zeroshot_and_probe_record_their_cost(cache, rn50, tmp_path):
    from coopipe.jobs.evaluate import run_eval, run_fit, run_zeroshot
    from coopipe.methods import MethodSpec
    from coopipe.jobs.train import run_train

    run = tmp_path / "run"
    summary = run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, progress=False, clip=rn50,
                        overrides={"method": "coop", "max_epoch": 2, "warmup_epoch": 0})
    cost = summary["cost"]
    assert cost["epochs"] == 2 and cost["images"] == 2 * len(CLASSES) and cost["stacked_runs"] == 1
    assert cost["train_seconds"] == pytest.approx(cost["setup_seconds"] + cost["epoch_seconds"])
    assert cost["seconds_per_train_image"] == pytest.approx(cost["train_seconds"] / (2 * 2 * len(CLASSES)))

    metrics = run_eval(run, cache_dir=cache, clip=rn50)["cost"]
    assert metrics["train_seconds"] == pytest.approx(cost["train_seconds"])  # the training's, carried over
    assert metrics["inference_images"] == 3 * len(CLASSES) and metrics["inference_images_per_s"] > 0
    assert metrics["peak_memory_bytes"] >= 0 and "VmHWM" in metrics["peak_memory_kind"]

    zero = run_zeroshot(cache_dir=cache, dataset="toy", out_dir=tmp_path / "zs", clip=rn50)["cost"]
    assert zero["epochs"] == 0 and zero["train_seconds"] > 0 and zero["inference_images_per_s"] > 0
    probe = run_fit(MethodSpec("linear_probe"), cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=tmp_path / "lp", clip=rn50)
    assert probe["cost"]["images"] == 2 * len(CLASSES) and probe["cost"]["train_seconds"] > 0
