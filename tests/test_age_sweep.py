"""`coopipe sweep` on an age dataset: 60 real UTKFace faces (RN50, random weights), shots 1 and 2, one seed, one
epoch, CoOp (OrdinalCLIP's baseline init) and the rank prompts, the ridge probe, zero-shot and prompt ensembling,
run one by one in this process; then the usual report and the age report beside it.

Random weights carry no age signal: the checks are on the plan (age defaults, run folders) and on what the sweep
writes (every method in the age table, the constant predictor beside it, the shortened-epochs note).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coopipe.cli import app
from coopipe.methods import MethodSpec
from coopipe.safe_names import is_safe_name, safe_name
from coopipe.sweep import SweepSpec, parse_variant, plan_sweep
from coopipe.sweep.plan import AGE_INIT_WORDS, AGE_METHODS, RunSettings
from typer.testing import CliRunner

AGES = range(20, 35)  # 15 ages x 4 faces: per age 2 train, 1 val, 1 test (the age-stratified split)
PER_AGE = 4


@pytest.fixture(scope="module")
def faces(shared_data: Path, tmp_path_factory) -> Path:
    """``$DATA`` with ``utkface/images`` holding the first 4 real faces of each age 20..34."""
    from conftest import copy_utkface

    return copy_utkface(shared_data, tmp_path_factory.mktemp("utk"), AGES, PER_AGE)


def test_age_plan_defaults(faces: Path) -> None:
    """No methods given: OrdinalCLIP's comparison (its CoOp row, learned rank names; CoCoOp; rank prompts); zero-shot
    and the ensemble once; ridge beside the linear probe. CoOp from the age words with frozen names keeps its label."""
    spec = SweepSpec(datasets=("utkface",), data_root=str(faces), shots=(1, 4), seeds=(1, 2), zeroshot=True,
                     linear_probe=True, ridge=True, runs="r", settings=RunSettings(pretrained="none", epochs=2))
    plan = plan_sweep(spec)
    labels = {m.label() for m in AGE_METHODS}
    assert labels == {"ordcoop", "cocoop", "rank"}
    assert parse_variant("coop_age") == MethodSpec.of("coop", ctx_init=AGE_INIT_WORDS)
    assert parse_variant("coop_age").label() == "coop_init-age-estimation:-the-age-of-the-person-is"
    runs = {str(Path(t.run_dir).relative_to("r")) for t in plan.tasks}
    unsafe = [r for r in runs if not all(is_safe_name(part) for part in Path(r).parts)]
    assert not unsafe, f"run folders with characters unsafe in file names or shells: {unsafe}"
    labels = {safe_name(label) for label in labels}  # the folders: "coop_init-age-estimation-the-age-..."
    for label in [*labels, "linear_probe", "ridge"]:
        assert {f"utkface/{label}/shots{k}_seed{s}" for k in (1, 4) for s in (1, 2)} <= runs
    assert {"utkface/zeroshot", "utkface/zeroshot_ensemble"} <= runs
    assert len(plan.tasks) == 5 * 4 + 2
    assert [(e.name, e.shots, e.seeds) for e in plan.encodes] == [("utkface", (1, 2, 4), (1, 2))]  # one encode
    with pytest.raises(Exception, match="ridge needs an age dataset"):
        plan_sweep(SweepSpec(datasets=("eurosat",), ridge=True, encode=False))


@pytest.mark.slow  # encodes 60 faces and runs 7 methods: about 80 s on 2 cores
def test_age_sweep_end_to_end(faces: Path, tmp_path: Path) -> None:
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    res = CliRunner().invoke(app, [
        "sweep", "--dataset", "utkface", "--data-root", str(faces), "--pretrained", "none", "--cache", str(cache),
        "--runs", str(runs), "--methods", "coop_age,rank", "--shots", "1,2", "--seeds", "1", "--epochs", "1",
        "--zeroshot", "--ridge", "--views", "0", "--scheduler", "inline", "--no-progress",
        "--encode-args", "--workers 0 --batch-size 32", "--train-args", "--warmup-epoch 0",
    ])
    assert res.exit_code == 0, res.output
    assert "failed" not in res.output.replace("0 failed", "")
    unsafe = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not is_safe_name(p.name)]
    assert not unsafe, f"names the sweep wrote with characters unsafe in file names or shells: {unsafe[:10]}"
    coop = "coop_init-age-estimation-the-age-of-the-person-is"  # the label's ':' is not in the folder's name
    for label in (coop, "rank", "ridge"):
        for k in (1, 2):
            data = json.loads((runs / "utkface" / label / f"shots{k}_seed1" / "metrics.json").read_text())
            assert data["mae_exp"] >= 0 and data["constant_mae"] is not None
            assert (runs / "utkface" / label / f"shots{k}_seed1" / "predictions.csv").is_file()
    trained = json.loads((runs / "utkface" / "rank" / "shots2_seed1" / "metrics.json").read_text())
    assert trained["method"] == "rank" and trained["epochs"] == 1 and trained["paper_epochs"] == 100
    history = (runs / "utkface" / "rank" / "shots2_seed1" / "history.tsv").read_text().splitlines()
    assert history[1].split("\t")[1] == "0.0001"  # OrdinalCLIP's lr, no warm-up: the one epoch trains at the full rate
    assert (runs / "report" / "summary.json").is_file()
    table = (runs / "age_report" / "utkface" / "age_table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    readable = ['CoOp (init "age estimation: the age of the person is", rank names frozen, cross-entropy)',
                "Rank prompts (OrdinalCLIP)", "Ridge probe",
                "Zero-shot CLIP", "Zero-shot CLIP (ensemble)"]
    for method in (*readable, "constant (train median)"):
        assert method in rows, (method, table)
    order = [name for name in rows if name in readable]  # the paper's order, the probes before the prompts
    assert order == ["Zero-shot CLIP", "Zero-shot CLIP (ensemble)", "Ridge probe", readable[0], readable[1]], order
    assert "Not the paper's protocol: shortened training" in table and "Rank prompts (OrdinalCLIP) 1 (paper 100)" in table
    again = CliRunner().invoke(app, [
        "sweep", "--dataset", "utkface", "--no-encode", "--pretrained", "none", "--cache", str(cache),
        "--runs", str(runs), "--methods", "coop_age,rank", "--shots", "1,2", "--seeds", "1", "--epochs", "1",
        "--zeroshot", "--ridge", "--scheduler", "inline", "--no-progress", "--train-args", "--warmup-epoch 0",
    ])
    assert again.exit_code == 0 and "8 already finished" in again.output and "up to date" in again.output


def test_dvc_params_for_ages(tmp_path: Path) -> None:
    """`dvc exp run -S data.dataset=utkface -S train.method=rank ...` (docs/experiments.md) is a valid params.yaml."""
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "stages"))
    try:
        from params import load_params
    finally:
        sys.path.remove(str(root / "stages"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"].update(dataset="utkface", root="../shared/data")
    raw["model"]["pretrained"] = "none"
    raw["train"].update(method="rank", max_epoch=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = load_params(path)
    assert p.data.dataset == "utkface" and p.train_overrides()["method"] == "rank"
    raw["train"].update(method="coop", ctx_init=AGE_INIT_WORDS)
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).train_overrides()["ctx_init"] == AGE_INIT_WORDS


def test_warmup_only_epochs_are_flagged() -> None:
    from coopipe.sweep.plan import warmup_only

    assert warmup_only(RunSettings(epochs=1))  # CoOp's first epoch is the warm-up at lr 1e-5
    assert not warmup_only(RunSettings(epochs=2))
    assert not warmup_only(RunSettings(epochs=1, train_options={"warmup_epoch": 0}))
    assert not warmup_only(RunSettings())
