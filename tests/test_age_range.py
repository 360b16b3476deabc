"""An age dataset's rank range is a dataset option the user can set: ages 1..116 (a face older than 100) encode,
train, evaluate and report with ``min_age``/``max_age`` given on the command line (``--dataset-option``) or in
params.yaml (``data.options``), and the range is recorded in every store's provenance."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from coopipe.datasets import load_dataset
from coopipe.errors import DatasetError
from coopipe.features import select_store

ROOT = Path(__file__).resolve().parents[1]
AGES = {"train": (1, 1, 58, 58, 116, 116), "val": (1, 116), "test": (1, 58, 116, 116)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _faces(folder: Path) -> Path:
    """A manifest of tiny images aged 1..116 with a split column (no real faces: the pipeline is what is tested)."""
    folder.mkdir(parents=True)
    rows, g = ["path,age,split"], np.random.default_rng(0)
    for split, ages in AGES.items():
        for i, age in enumerate(ages):
            name = f"{split}{i}.jpg"
            Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            rows.append(f"{name},{age},{split}")
    (folder / "faces.csv").write_text("\n".join(rows) + "\n")
    return folder / "faces.csv"


def _cli(*args: str) -> None:
    from coopipe.cli import app

    app(args=["--log-level", "WARNING", *args], standalone_mode=False)


def _check_store(cache: Path, rn50) -> None:
    store = select_store(cache, "agemanifest-faces", "test", model=rn50.name, weights=rn50.weights_id)
    assert store.provenance["classnames"] == [str(a) for a in range(1, 117)]
    assert store.provenance["dataset_options"] == {"max_age": 116, "min_age": 1}


def test_ages_up_to_116_from_the_command_line(rn50, tmp_path):
    manifest = _faces(tmp_path / "faces")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    encode = ["encode", "--dataset", "agemanifest", "--data-root", str(manifest), "--pretrained", "none", "--views",
              "1", "--shots", "1", "--seeds", "1", "--cache", str(cache), "--workers", "0", "--no-progress"]
    with pytest.raises(DatasetError, match="age 116 is outside the rank range 0..100.*--dataset-option"):
        load_dataset("agemanifest", manifest)  # the default range: OrdinalCLIP's 0..100
    _cli(*encode, "--dataset-option", "min_age=1", "--dataset-option", "max_age=116")
    _check_store(cache, rn50)
    run = runs / "agemanifest-faces" / "coop" / "shots1_seed1"
    _cli("train", "--features", str(cache), "--dataset", "agemanifest-faces", "--shots", "1", "--seed", "1",
         "--out", str(run), "--max-epoch", "1", "--n-ctx", "2", "--no-progress")
    _cli("eval", str(run), "--features", str(cache))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["mae_exp"] <= 115
    _cli("report", str(runs))
    assert (runs / "age_report").is_dir() and any((runs / "age_report").iterdir())


def test_ages_up_to_116_from_params_yaml(rn50, tmp_path):
    manifest = _faces(tmp_path / "faces")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = {"dataset": "agemanifest", "root": str(manifest), "options": {"min_age": 1, "max_age": 116}}
    params["paths"]["cache"] = str(tmp_path / "cache")
    params["model"]["pretrained"] = "none"
    params["encode"].update(views=1, num_workers=0)
    params["fewshot"] = {"shots": [1], "seeds": [1]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        spec = importlib.util.spec_from_file_location("stage_encode", ROOT / "stages" / "encode.py")
        stage = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stage)
        stage.main(["--params", str(tmp_path / "params.yaml")])
    finally:
        sys.path.remove(str(ROOT / "stages"))
    _check_store(tmp_path / "cache", rn50)
