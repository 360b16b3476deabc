"""Each default is written once: the CLI's option defaults and params.yaml agree with the library's dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner
import yaml

from coopipe.cli import app
from coopipe.config import EncodeConfig, FewShotConfig, InterpretConfig, ModelSpec, PathsConfig, ReportConfig
from coopipe.encode import EncodeOptions
from coopipe.methods.coop import CoOpOptions
from coopipe.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
METHOD_SETTING = ("max_epoch", "n_ctx", "ctx_init", "batch_size", "csc", "class_token_position", "lr", "momentum",
                  "weight_decay", "warmup_epoch", "warmup_lr")  # null in params.yaml: the method's paper setting


def _params_module():
    """stages/params.py, imported by its path (stage scripts import it as a sibling file)."""
    spec = importlib.util.spec_from_file_location("stage_params", ROOT / "stages" / "params.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stage_params"] = module
    spec.loader.exec_module(module)
    return module


def _cli_defaults(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {p.name: p.default for p in cmd.params}


def _cli_sweep_defaults() -> dict[str, object]:
    cmd = typer.main.get_command(app).commands["sweep"]  # type: ignore[attr-defined]
    return {p.name: p.default for p in cmd.params}


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def committed_params_yaml() -> str:
    """params.yaml as committed (``git show HEAD:params.yaml``), else the file.

    Why the committed copy: `dvc exp run -S ...` (the README's offline main job) applies its values to the
    workspace's params.yaml and leaves them there, as DVC experiments do; the defaults are what the repository
    ships, so running the tests after the main job must not fail on the experiment's values."""
    try:
        shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True,
                               check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return (ROOT / "params.yaml").read_text()
    return shown.stdout


def test_params_yaml_equals_the_dataclass_defaults(tmp_path):
    text = committed_params_yaml()
    raw = yaml.safe_load(text)
    expected = {
        "paths": dataclasses.asdict(PathsConfig()),
        "model": dataclasses.asdict(ModelSpec()),
        "encode": {**dataclasses.asdict(EncodeConfig()), **dataclasses.asdict(EncodeOptions())},
        "fewshot": dataclasses.asdict(FewShotConfig()),
        "interpret": dataclasses.asdict(InterpretConfig()),
        "report": dataclasses.asdict(ReportConfig()),
        "train": {**{f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)},
                  "method": TrainConfig().method.method, **dataclasses.asdict(CoOpOptions())},
    }
    for section, values in raw.items():
        if section == "data":
            continue  # the user's dataset and root: no library default
        for key, value in (values or {}).items():
            want = expected[section][key]
            if section == "train" and key in METHOD_SETTING:
                assert value is None, f"train.{key}: null means the method's paper setting (TrainConfig.for_method)"
                continue
            if isinstance(want, tuple):
                value = tuple(value)
            assert value == want, f"params.yaml {section}.{key} = {value!r}, the library's default is {want!r}"
    # and the loader turns params.yaml into exactly those defaults
    (tmp_path / "params.yaml").write_text(text)
    p = _params_module().load_params(tmp_path / "params.yaml")
    assert p.model == ModelSpec() and p.encode == EncodeConfig() and p.fewshot == FewShotConfig()
    assert p.encode_options == dataclasses.replace(EncodeOptions(), progress=p.encode_options.progress)
    overrides = p.train_overrides()
    assert TrainConfig.for_method(overrides.pop("method"), 16, **overrides) == TrainConfig()


def test_encode_cli_defaults_are_the_library_defaults():
    d = _cli_defaults("encode")
    opts = EncodeOptions()
    assert (d["model"], d["pretrained"]) == (ModelSpec.name, ModelSpec.pretrained) == ("RN50", "openai")
    assert d["views"] == EncodeConfig.views and d["aug_seed"] == EncodeConfig.aug_seed
    assert d["crop_scale"] == _csv(EncodeConfig.crop_scale) and d["scheduler"] == EncodeConfig.scheduler
    assert d["augment"] == EncodeConfig.augment == _cli_sweep_defaults()["augment"] == "coop"  # CoOp's crops
    assert d["shots"] == _csv(FewShotConfig.shots) and d["seeds"] == _csv(FewShotConfig.seeds)
    assert (d["batch_size"], d["workers"], d["precision"], d["dtype"]) == (
        opts.batch_size, opts.num_workers, opts.precision, opts.dtype)
    assert (d["chunk_rows"], d["device"], d["on_bad_image"]) == (opts.chunk_rows, opts.device, opts.on_bad_image)
    assert d["engine"] == opts.engine == "auto"
    assert str(d["cache"]) == PathsConfig.cache


def test_train_and_other_cli_defaults_are_the_library_defaults():
    d = _cli_defaults("train")
    cfg = TrainConfig()
    assert (d["method"], d["class_token_position"], d["csc"]) == (cfg.method.method, None, None)  # None: the method's
    assert (d["views"], d["class_chunk"], d["bf16"]) == (cfg.views, cfg.class_chunk, cfg.autocast_bf16)
    assert d["select_every"] == cfg.select_every == 0  # the papers' protocol: the last epoch is the result
    # left out: the method's paper setting, from TrainConfig.for_method (CoOp M=16 batch 32 lr 0.002; CoCoOp M=4
    # batch 1; CLAP lr 0.1; OrdinalCLIP's 1e-4 for rank prompts)
    assert d["epochs"] is None and d["n_ctx"] is None and d["ctx_init"] is None and d["batch_size"] is None
    assert d["lr"] is None and TrainConfig.for_method("coop", 16).lr == cfg.lr
    assert TrainConfig.for_method("coop", 16) == cfg
    cocoop = TrainConfig.for_method("cocoop", 16)
    assert (cocoop.method.n_ctx, cocoop.method.ctx_init, cocoop.batch_size, cocoop.max_epoch) == (4, "a photo of a", 1, 10)
    i = _cli_defaults("interpret")
    assert (i["topk"], i["metric"]) == (InterpretConfig.topk, InterpretConfig.metric)
    r = _cli_defaults("report")
    assert (r["gain_method"], r["gain_shots"]) == (ReportConfig.gain_method, ReportConfig.gain_shots)


def test_params_loader_rejects_unknown_keys(tmp_path):
    from coopipe.errors import ParamsError

    load = _params_module().load_params
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match="unknown key.*epochs.*max_epoch"):
        load(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("encode:\n  views: 2\n  precision: fp32\n")
    p = load(tmp_path / "p.yaml")
    assert p.encode.views == 2 and p.encode_options.precision == "fp32"


def test_help_texts_keep_their_brackets():
    """Help is rendered with rich markup, which silently drops ``[word]`` (the README's `pip install
    'coopipe[onnx]'` read as `pip install 'coopipe'`): a literal bracket must be escaped as ``\\[``."""
    import re

    def commands(group):
        for cmd in getattr(group, "commands", {}).values():
            yield cmd
            yield from commands(cmd)

    eaten = [f"{cmd.name} {p.name}: {p.help}" for cmd in commands(typer.main.get_command(app)) for p in cmd.params
             if re.search(r"(?<!\\)\[[A-Za-z_][\w ,.-]*\]", getattr(p, "help", None) or "")]
    assert not eaten, "help texts whose [..] rich markup would drop:\n" + "\n".join(eaten)
    out = CliRunner().invoke(app, ["encode", "--help"], env={"COLUMNS": "300"}).output
    assert "coopipe[onnx]" in out
