"""The main job on a fresh clone: the bundled EuroSAT sample is complete, tracked and the default data root, and an
offline pre-flight failure names the one command that runs the same pipeline with random weights on it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from coopipe.datasets import load_dataset
from coopipe.errors import ParamsError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
PER_CLASS = 20


def _stage(name: str):
    """A stage script imported by its path (stage scripts import params.py as a sibling file)."""
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "stages"))


def test_sample_split_lists_exactly_the_shipped_and_tracked_images():
    split = json.loads((SAMPLE / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    listed = {row[0] for rows in split.values() for row in rows}
    on_disk = {p.relative_to(SAMPLE / "eurosat" / "2750").as_posix() for p in (SAMPLE / "eurosat" / "2750").rglob("*.jpg")}
    assert listed == on_disk and len(listed) == 3 * 10 * PER_CLASS  # disjoint splits, nothing unlisted
    for rows in split.values():
        assert set(Counter(label for _, label, _ in rows).values()) == {PER_CLASS}
    tracked = subprocess.run(["git", "ls-files", "data/sample"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert {f"data/sample/eurosat/2750/{p}" for p in listed} <= set(tracked)
    assert {"data/sample/README.md", "data/sample/eurosat/LICENSE"} <= set(tracked)
    assert sum((ROOT / f).stat().st_size for f in tracked) < 5e6
    data = load_dataset("eurosat", SAMPLE)  # the real loader: every listed file exists
    assert len(data.classnames) == 10 and {k: len(v) for k, v in data.splits.items()} == {s: 200 for s in split}


def test_sample_is_the_default_data_root():
    params = _stage("params")
    assert params.DataParams().root == "data/sample"
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["root"] == "data/sample"


def test_offline_failure_names_one_command_that_fits_the_sample(tmp_path: Path):
    encode = _stage("encode")
    with pytest.raises(ParamsError) as err:  # weights that cannot be had: as offline, without the network wait
        encode.check_inputs("eurosat", str(SAMPLE), "RN50", str(tmp_path / "missing" / "RN50.pt"))
    command = encode.offline_command(str(SAMPLE))
    assert command in str(err.value) and command.startswith("bash scripts/repro.sh -S ")
    with pytest.raises(ParamsError) as err:  # a wrong root too: the command also points back at the sample
        encode.check_inputs("eurosat", str(tmp_path / "nowhere"), "RN50", str(tmp_path / "RN50.pt"))
    assert "-S 'data.root=data/sample'" in str(err.value)
    # the command's settings are keys params.yaml has, and the result is valid params that the sample can serve
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for setting in encode.OFFLINE_SETTINGS:
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        assert name in raw[section], setting
        raw[section][name] = yaml.safe_load(value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = _stage("params").load_params(tmp_path / "params.yaml")
    assert params.model.pretrained == "none" and max(params.fewshot.shots) <= PER_CLASS
    assert "exp run" in (ROOT / "scripts" / "repro.sh").read_text()  # repro.sh hands -S to `dvc exp run`
