"""The comparison of methods, laid out as the papers do: per dataset a method x shots table (mean ± population std
over seeds), base / new / H, transfer, and the cost table in Tip-Adapter's Table 1 layout, each row stamped with its
setting; an accuracy-vs-shots figure with one series per method. Fed with fabricated metrics files of several
methods (a method registered here among them: the report knows any registered method), shots and seeds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coopipe.jobs.report import DATASET_FIGURE, DATASET_REPORT, FILES, run_report
from coopipe.methods import Method, register, unregister

SEEDS = (1, 2, 3)
STAMP = {"model": "RN50", "weights": "random-init:seed=0", "macro_f1": 0.5,
         "departures": ["random weights", "nested few-shot draws"]}
STORE = "cachedir/eurosat/test_RN50_x.zarr"


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    pass


class Plugged(Method):
    """A method known only to this test: the report lists it by its title, as any registered method."""

    name = "plugged"
    title = "Plugged-in method"
    options = _NoOptions


@pytest.fixture(autouse=True)
def plugged():
    register(Plugged())
    yield
    unregister("plugged")


def _write(runs: Path, rel: str, name: str = "metrics.json", **data) -> None:
    path = runs / rel / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**STAMP, "store": STORE, "dataset": "eurosat", **data}))


def _cost(train: float, epochs: int, images: int, speed: float, memory: int) -> dict:
    return {"train_seconds": train, "epochs": epochs, "images": images, "images_seen": images * max(epochs, 1),
            "seconds_per_train_image": train / (images * max(epochs, 1)) if images else None, "inference_images_per_s": speed,
            "peak_memory_bytes": memory, "peak_memory_kind": "cpu peak RSS above the start (VmHWM reset)",
            "stacked_runs": 1}


def _accuracy(method: str, shots: int, seed: int) -> float:
    base = {"coop": 0.40, "cocoop": 0.35, "plugged": 0.30, "linear_probe": 0.25}[method]
    return base + 0.01 * shots + 0.02 * (seed - 2)  # seeds 1/2/3: mean at seed 2, population std 0.02*sqrt(2/3)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    _write(runs, "eurosat/zeroshot", method="zeroshot", shots=0, seed=None, accuracy=0.20,
           cost=_cost(0.5, 0, 0, 1e6, 2**20))
    for method, epochs in (("coop", 10), ("cocoop", 5), ("plugged", 2), ("linear_probe", 0)):
        for shots in (1, 16):
            for seed in SEEDS:
                images = 10 * shots
                _write(runs, f"eurosat/{method}/shots{shots}_seed{seed}", method=method, shots=shots, seed=seed,
                       accuracy=_accuracy(method, shots, seed),
                       cost=_cost(2.0 * seed * shots, epochs, images, 5e4, 3 * 2**20))
    for seed, (b, n) in zip(SEEDS, ((0.8, 0.6), (0.9, 0.5), (0.7, 0.4))):
        for method in ("coop", "plugged"):
            rel = f"eurosat/base2new/{method}/shots16_seed{seed}"
            common = {"method": method, "shots": 16, "seed": seed, "train_classes": "base"}
            _write(runs, rel, "metrics_base.json", classes="base", accuracy=b, **common)
            _write(runs, rel, "metrics_new.json", classes="new", accuracy=n, **common)
    for seed in SEEDS:
        _write(runs, f"eurosat/coop/shots16_seed{seed}/transfer/dtd", method="coop", dataset="dtd", shots=16,
               seed=seed, accuracy=0.3, source_dataset="eurosat", classes="all")
    return runs


def test_tables_per_dataset_with_mean_std_h_cost_and_stamps(runs: Path, tmp_path: Path):
    out = tmp_path / "report"
    summary = run_report(runs, out_dir=out)

    md = (out / DATASET_REPORT.format(dataset="eurosat")).read_text()
    std = 100 * 0.02 * math.sqrt(2 / 3)  # population std of -0.02, 0, +0.02, in points
    for method, title in (("coop", "CoOp"), ("cocoop", "CoCoOp"), ("plugged", "Plugged-in method"),
                          ("linear_probe", "Linear probe CLIP")):
        for shots in (1, 16):
            mean = 100 * _accuracy(method, shots, 2)
            assert f"| {title} | {shots} | {mean:.2f} ± {std:.2f} | S1 |" in md, (title, shots)
    assert "| Zero-shot CLIP | 0 | 20.00 | S1 |" in md

    # base / new / H: H of the mean base and new (80 and 50)
    assert "| EuroSAT | Plugged-in method | 16 | 80.00 ± 8.16 | 50.00 ± 8.16 | 61.54 | S1 |" in md
    assert "## Cross-dataset transfer and domain generalisation" in md and "| 30.00 ± 0.00 |" in md

    # cost: Tip-Adapter's Table 1 columns plus the time per training image, means over seeds
    header = ("| Method | Shots | Training | Epochs | Training wall time | Time per training image | Accuracy | Gain | "
              "Inference images/s | Peak memory | Setting |")
    assert header in md
    coop16 = np.mean([2.0 * s * 16 for s in SEEDS])  # 64 s, written as Tip-Adapter's table does
    per_image = np.mean([2.0 * s * 16 / (160 * 10) for s in SEEDS])  # 40 ms
    assert (f"| CoOp | 16 | trained | 10 | 1min 4s | {per_image * 1e3:.2f} ms | 56.00 ± {std:.2f} | +36.00 | "
            f"50,000 | 3.0 MiB | S1 |") in md
    assert "| Zero-shot CLIP | 0 | free | 0 | 500.00 ms | – | 20.00 | – | 1,000,000 | 1.0 MiB | S1 |" in md
    assert "| Linear probe CLIP | 1 | fit | 0 |" in md
    rows = {(c["method"], c["shots"]): c for c in summary["cost"]}
    assert set(rows) == {("zeroshot", 0), *((m, k) for m in ("coop", "cocoop", "plugged", "linear_probe")
                                             for k in (1, 16))}
    assert rows[("coop", 16)]["train_seconds"]["mean"] == pytest.approx(coop16)
    assert rows[("coop", 16)]["train_seconds"]["std"] == pytest.approx(np.std([32.0, 64.0, 96.0]))

    # every row's stamp is spelled out once: model, weights, cache, departures
    assert "- **S1**: model RN50 [random weights]; weights random-init:seed=0; cache `cachedir`; departures: random " \
           "weights; nested few-shot draws" in md

    # the overall report holds the same cost table; the figure has one series per method, legend inside
    assert header in (out / FILES["markdown"]).read_text()
    figure = out / DATASET_FIGURE.format(dataset="eurosat")
    with Image.open(figure) as im:
        assert im.format == "PNG" and im.width > 300
        pixels = np.asarray(im.convert("RGB"))
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::7]}) > 20, "a drawn figure, not a blank page"
    assert summary["datasets"]["eurosat"]["figure"] == str(figure)
