"""Every file coopipe reads names itself when it is damaged: a field of the wrong shape (``dictionary update sequence
...``), a tensor where a number belongs (``only one element tensors ...``), a NUL byte in a path or name (``embedded
null byte``), text that is not UTF-8 or not JSON, nesting too deep to parse, and ``int('abc')`` each give one line
naming the file (and the field where there is one), never the bare message of the built-in error."""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from coopipe.classifier import export_classifier, load_classifier
from coopipe.cli import app
from coopipe.datasets.ages import read_age_list
from coopipe.datasets.common import read_split_file
from coopipe.datasets.fewshot import FewShotIndex
from coopipe.datasets.manifest import build_manifest
from coopipe.errors import CoopipeError
from coopipe.export import read_record
from coopipe.json_records import read_folder_record
from coopipe.sweep.plan import RunSettings, SweepSpec, plan_sweep
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _load_params() -> Callable[[Path], object]:
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        return importlib.import_module("params").load_params
    finally:
        sys.path.remove(str(ROOT / "stages"))


def _readers(tmp: Path) -> dict[str, tuple[Path, Callable[[Path], object]]]:
    """name -> (the file it reads, a call that reads it)."""
    (tmp / "images").mkdir(exist_ok=True)
    (tmp / "m.csv").write_text("path,label\na.png,cat\n")
    return {
        "split file": (tmp / "split.json", read_split_file),
        "few-shot index": (tmp / "index.json", FewShotIndex.load),
        "manifest": (tmp / "m.json", lambda p: build_manifest(p, check_files=False)),
        "class-name file": (tmp / "names.txt", lambda p: build_manifest(tmp / "m.csv", classnames=p, check_files=False)),
        "age list": (tmp / "ages.txt", lambda p: read_age_list(p, min_age=1, max_age=90)),
        "params file": (tmp / "params.yaml", _load_params()),
        "checkpoint record": (tmp / "run" / "prompt.json",
                              lambda p: read_folder_record(p.parent, "prompt.json", missing="", fix="re-train")),
        "export record": (tmp / "export" / "export.json", read_record),
    }


@pytest.mark.parametrize("content", [b"\xff\xfe{", b'{"train": [', b"[" * 100_000 + b"]" * 100_000],
                         ids=["not-utf8", "not-json", "nested-100000-deep"])
def test_unreadable_files_name_themselves(tmp_path, content):
    for name, (path, read) in _readers(tmp_path).items():
        if path.suffix == ".txt" and content[:1] in (b"{", b"["):
            continue  # plain-text files have no JSON syntax to break
        if path.suffix == ".yaml" and len(content) > 1000:
            continue  # YAML's pure-Python parser takes seconds to reach its recursion limit (named, not timed here)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        started = time.perf_counter()
        with pytest.raises(CoopipeError) as info:
            read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), (name, str(info.value)[:300])
        assert time.perf_counter() - started < 2, name


def test_a_split_file_nested_100000_deep_is_one_line_through_the_cli(tmp_path):
    split = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    split.write_text("[" * 100_000 + "]" * 100_000)
    res = CliRunner().invoke(app, ["encode", "--dataset", "eurosat", "--data-root", str(tmp_path), "--pretrained",
                                   "none", "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert f"split file {split} is nested too deeply to read" in res.output


def test_a_nul_byte_in_an_argument_a_split_line_a_name_or_params_is_named(tmp_path):
    res = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "a\0b")])
    assert res.exit_code == 1 and "NUL byte" in res.output and res.output.count("\n") == 1, res.output
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [["a\0.png", 0, "cat"]]}))
    with pytest.raises(CoopipeError, match=f"{split}: train\\[0\\].*NUL byte"):
        read_split_file(split)
    ages = tmp_path / "ages.txt"
    ages.write_text("a.png 30\nb\0.png 31\n")
    with pytest.raises(CoopipeError, match=f"{ages}, line 2: holds a NUL byte"):
        read_age_list(ages, min_age=1, max_age=90)
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\n")
    names = tmp_path / "names.txt"
    names.write_text("cat\0dog\n")
    with pytest.raises(CoopipeError, match=f"{names}.*NUL"):
        build_manifest(tmp_path / "m.csv", classnames=names, check_files=False)
    params = tmp_path / "params.yaml"
    params.write_text('paths:\n  cache: "ca\\0che"\n')
    with pytest.raises(CoopipeError, match=f"params file {params}: paths.cache holds a NUL byte"):
        _load_params()(params)


def test_a_record_field_of_the_wrong_shape_names_the_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"format": "coopipe.export/1", "files": ["abc"]}))
    with pytest.raises(CoopipeError, match=f"export record {export / 'export.json'} has a field of the wrong type.*"
                                           "dictionary update sequence"):
        read_record(export)
    params = tmp_path / "params.yaml"
    params.write_text("encode: [abc]\n")
    with pytest.raises(CoopipeError, match=f"params file {params}"):
        _load_params()(params)


def test_a_tensor_where_a_number_belongs_names_the_file(tmp_path):
    path = export_classifier(tmp_path / "classifier.safetensors", torch.randn(3, 8), classnames=["a", "b", "c"],
                             model="RN50", weights="w", logit_scale=4.6)
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safetensors API
    tensors["logit_scale"] = torch.tensor([4.6, 4.6])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CoopipeError, match=f"classifier {path} has a field of the wrong type.*only one element"):
        load_classifier(path)


def test_a_whole_number_written_as_text_names_the_field(tmp_path):
    spec = SweepSpec(datasets=("eurosat",), encode=False, settings=RunSettings(train_options={"max_epoch": "abc"}))
    with pytest.raises(CoopipeError, match="training option max_epoch must be a whole number, got 'abc'"):
        plan_sweep(spec)


@pytest.mark.parametrize(("option", "value"), [("seed", "abc"), ("min_age", "abc"), ("split_file", 3), ("template", 5)])
def test_a_dataset_option_of_the_wrong_type_names_the_option(tmp_path, option, value):
    from coopipe.datasets import load_dataset

    (tmp_path / "utkface" / "images").mkdir(parents=True)
    with pytest.raises(CoopipeError, match=f"dataset utkface: option {option} must be .*got {value!r}"):
        load_dataset("utkface", tmp_path, **{option: value})
