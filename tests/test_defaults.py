"""Each default is written once: the CLI's option defaults and params.yaml agree with the library's dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from coopipe.cli import app
from coopipe.config import EncodeConfig, FewShotConfig, InterpretConfig, ModelSpec, PathsConfig, ReportConfig
from coopipe.encode import EncodeOptions
from coopipe.methods.coop import CoOpOptions
from coopipe.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
METHOD_SETTING = ("max_epoch", "n_ctx", "ctx_init", "batch_size", "csc", "class_token_position")  # null in params.yaml: the method's paper setting


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


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def test_params_yaml_equals_the_dataclass_defaults():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
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
    p = _params_module().load_params(ROOT / "params.yaml")
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
    assert (d["lr"], d["views"], d["class_chunk"], d["bf16"]) == (cfg.lr, cfg.views, cfg.class_chunk, cfg.autocast_bf16)
    # left out: the method's paper setting, from TrainConfig.for_method (CoOp M=16 batch 32; CoCoOp M=4 batch 1)
    assert d["epochs"] is None and d["n_ctx"] is None and d["ctx_init"] is None and d["batch_size"] is None
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
