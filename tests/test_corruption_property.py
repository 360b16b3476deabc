"""Property: random type and shape corruptions of ``prompt.json``, of the tensor file (re-bound by its hash, so only
the content lies) and of store metadata never give a traceback and never a wrong result. Evaluation through the
command line's error boundary either stops with one line and exit code 1, or gives exactly the uncorrupted result
(a corruption of a field nothing reads, or of the record's digest field removed). Every registered method.
Corruptions are drawn from a fixed seed, so a failure names a reproducible case."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from conftest import make_toy_cache
from coopipe.checkpoint_files import META_FILE, TENSORS_FILE
from coopipe.checkpoint_check import record_digest
from coopipe.cli_common import errors
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.methods import get_method, method_names
from coopipe.models import sha256_file
from safetensors.torch import load_file, save_file

CASES = 40  # per method and target for the prompt methods; the others share their code paths and get fewer
OTHER_CASES = 12
PROMPT_METHODS = ("coop", "cocoop", "rank")
ODD_VALUES: list[Any] = [None, "x", "", 1.5, -3, 0, 10**12, True, [], {}, [1, "a"], {"a": [1]}, float("nan"), "1e1"]
# every registered method (a method added as a module is fuzzed with no list to update); ranks for ordered labels
METHODS = {name: ["10", "20", "30"] if get_method(name).ordered_labels else ["cat", "dog", "sea or lake"]
           for name in method_names()}


def _cases(method: str) -> int:
    return CASES if method in PROMPT_METHODS else OTHER_CASES


def _overrides(method: str) -> dict[str, Any]:
    """One short epoch (none for a training-free method), a short context where the method has one."""
    definition = get_method(method)
    options = {f.name for f in dataclasses.fields(definition.options)}
    return {"method": method, "batch_size": 4, **({"max_epoch": 1} if definition.trains else {}),
            **({"n_ctx": 4} if method == "prograd" else {"n_ctx": 2} if "n_ctx" in options else {})}  # ProGrad: its 4 words


@pytest.fixture(scope="module")
def runs(rn50, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """method -> (cache, trained run, its uncorrupted metrics)."""
    torch.set_num_threads(1)
    out = {}
    for method, classes in METHODS.items():
        base = tmp_path_factory.mktemp(method)
        cache = make_toy_cache(base / "cache", rn50, classes, {"train": (3, 1), "val": (2, 1), "test": (2, 1)})
        run = base / "run"
        run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, progress=False, clip=rn50,
                  overrides=_overrides(method))
        out[method] = (cache, run, _comparable(run_eval(run, cache_dir=cache, clip=rn50, out=base / "m.json")))
    return out


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("store",)}


def _outcome(run: Path, cache: Path, rn50, capsys) -> tuple[int, dict | None, str]:
    """(exit code, metrics or None, stderr) of `coopipe eval` through the CLI's error boundary."""
    capsys.readouterr()
    try:
        with errors():
            metrics = run_eval(run, cache_dir=cache, clip=rn50, out=run.parent / "out.json")
    except typer.Exit as exc:
        return int(exc.exit_code), None, capsys.readouterr().err
    return 0, _comparable(metrics), capsys.readouterr().err


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (objects and lists), the root excluded."""
    found: list[tuple] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found += _paths(value, (*prefix, key))
    return found


def _corrupt_json(data: Any, rng: np.random.Generator) -> str:
    paths = [p for p in _paths(data) if p[0] not in ("tensors",) or p[-1] != "sha256"]
    path = paths[rng.integers(len(paths))]
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
        return f"deleted {path}"
    parent[path[-1]] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    return f"{path} = {parent[path[-1]]!r}"


def _corrupt_tensors(tensors: dict[str, torch.Tensor], rng: np.random.Generator) -> str:
    name = sorted(tensors)[rng.integers(len(tensors))]
    t = tensors[name]
    kind = ["drop-row", "add-dim", "dtype-half", "dtype-int", "nan", "delete", "transpose", "empty"][rng.integers(8)]
    if kind == "drop-row" and t.ndim and t.shape[0] > 1:
        tensors[name] = t[:-1].clone()
    elif kind == "add-dim":
        tensors[name] = t.unsqueeze(0).clone()
    elif kind == "dtype-half":
        tensors[name] = t.to(torch.float16)
    elif kind == "dtype-int":
        tensors[name] = t.to(torch.int64)
    elif kind == "nan" and t.dtype.is_floating_point:
        tensors[name] = t.clone().fill_(float("nan"))
    elif kind == "transpose" and t.ndim == 2 and t.shape[0] != t.shape[1]:
        tensors[name] = t.t().contiguous()
    elif kind == "empty":
        tensors[name] = t.new_zeros((0,))
    else:
        del tensors[name]
        kind = "delete"
    return f"{name}: {kind}"


def _check(outcome: tuple[int, dict | None, str], expected: dict, case: str, named: tuple[Path, ...]) -> None:
    """Exit 0 with the uncorrupted result, or exit 1 with one line that names the run or the cache it read."""
    code, metrics, err = outcome
    if code == 0:  # the same result; its measured cost (seconds, images/s, memory) differs from run to run
        assert metrics is not None and {k: v for k, v in metrics.items() if k != "cost"} == {
            k: v for k, v in expected.items() if k != "cost"}, f"exit 0 with a different result after {case}"
    else:
        assert code == 1 and err.count("error:") == 1 and len(err.strip().splitlines()) == 1, (case, err)
        assert any(str(path) in err for path in named), (case, err)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_corrupted_prompt_json_never_tracebacks_nor_lies(runs, rn50, tmp_path, capsys, method):
    cache, run, expected = runs[method]
    rng = np.random.default_rng(1)
    original = json.loads((run / META_FILE).read_text())
    for i in range(_cases(method)):
        target = tmp_path / f"case{i}"
        shutil.copytree(run, target)
        data = json.loads(json.dumps(original))
        case = _corrupt_json(data, rng)
        (target / META_FILE).write_text(json.dumps(data))
        _check(_outcome(target, cache, rn50, capsys), expected, f"{method} prompt.json {case}", (target, cache))
        shutil.rmtree(target)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_corrupted_tensors_never_traceback_nor_lie(runs, rn50, tmp_path, capsys, method):
    cache, run, expected = runs[method]
    rng = np.random.default_rng(2)
    for i in range(_cases(method)):
        target = tmp_path / f"case{i}"
        shutil.copytree(run, target)
        tensors = load_file(str(target / TENSORS_FILE))
        case = _corrupt_tensors(tensors, rng)
        save_file(tensors, str(target / TENSORS_FILE))
        meta = json.loads((target / META_FILE).read_text())
        meta["tensors"]["sha256"] = sha256_file(target / TENSORS_FILE)  # bound again: only the content lies
        meta["record_sha256"] = record_digest(meta)
        (target / META_FILE).write_text(json.dumps(meta))
        _check(_outcome(target, cache, rn50, capsys), expected, f"{method} tensors {case}", (target, cache))
        shutil.rmtree(target)


def test_corrupted_store_metadata_never_tracebacks_nor_lies(runs, rn50, tmp_path, capsys):
    cache, run, expected = runs["coop"]
    rng = np.random.default_rng(3)
    edits: list[Callable[[Path], str]] = []

    def json_file(rel: str) -> Callable[[Path], str]:
        def edit(store: Path) -> str:
            path = store / rel
            data = json.loads(path.read_text())
            case = _corrupt_json(data, rng)
            path.write_text(json.dumps(data))
            return f"{rel}: {case}"
        return edit

    for rel in ("zarr.json", "features/zarr.json", "labels/zarr.json", "valid/zarr.json", "checksums/zarr.json"):
        edits.append(json_file(rel))
    for i in range(CASES):
        copy = tmp_path / f"cache{i}"
        shutil.copytree(cache, copy)
        store = next((copy / "toy").glob("test_*.zarr"))
        case = edits[rng.integers(len(edits))](store)
        code, metrics, err = _outcome(run, copy, rn50, capsys)
        _check((code, metrics, err), expected, f"store {case}", (run, copy))
        shutil.rmtree(copy)


def _rebound(target: Path, change_meta=None, change_tensors=None) -> None:
    """Apply the changes and bind the tensor file to the record again (only the content lies)."""
    tensors = load_file(str(target / TENSORS_FILE))
    if change_tensors:
        change_tensors(tensors)
        save_file(tensors, str(target / TENSORS_FILE))
    meta = json.loads((target / META_FILE).read_text())
    meta["tensors"]["sha256"] = sha256_file(target / TENSORS_FILE)
    if change_meta:
        change_meta(meta)
    if isinstance(meta, dict):
        meta["record_sha256"] = record_digest(meta)
    (target / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(("method", "case", "message"), [
    ("coop", "tensors-list", "field 'tensors' must be an object"),
    ("coop", "config-list", "field 'config' must be an object"),
    ("coop", "history-dict", "field 'history' must be a list"),
    ("coop", "momentum-shape", "optim.ctx.momentum_buffer has shape"),
    ("cocoop", "meta-net-momentum-shape", "optim.meta_net.linear1.weight.momentum_buffer has shape"),
    ("rank", "rank-embeds-shape", "rank embeddings must have shape"),
    ("coop", "short-generator", "generator_state is"),
    ("coop", "float-generator", "generator_state is"),
    ("coop", "momentum-missing-on-resume", "misses optimiser tensor"),
    ("coop", "nan-context", "holds NaN/inf"),
    ("coop", "classifier-rows", "not one row per class"),
    ("coop", "n-aug-text", "field 'stores.train' must be an object whose 'views' is an object with a whole 'n_aug'"),
    ("cocoop", "class-chunk-fraction", "training option class_chunk must be a whole number, got 1.5"),
    ("rank", "classes-null", "field 'run.classes' must be one of all, base, new, got None"),
])
def test_the_reported_checkpoint_damage_is_one_line(runs, rn50, tmp_path, capsys, method, case, message):
    from coopipe.checkpoint import load_checkpoint
    from coopipe.checkpoint_files import CLASSIFIER_FILE
    from coopipe.classifier import export_classifier
    from coopipe.errors import CheckpointError

    cache, run, _ = runs[method]
    target = tmp_path / "run"
    shutil.copytree(run, target)
    edits = {
        "tensors-list": dict(change_meta=lambda m: m.update(tensors=[1])),
        "config-list": dict(change_meta=lambda m: m.update(config=["x"])),
        "history-dict": dict(change_meta=lambda m: m.update(history={"epoch": 1})),
        "momentum-shape": dict(change_tensors=lambda t: t.update(
            {"optim.ctx.momentum_buffer": t["optim.ctx.momentum_buffer"][:1].clone()})),
        "meta-net-momentum-shape": dict(change_tensors=lambda t: t.update(
            {"optim.meta_net.linear1.weight.momentum_buffer": t["optim.meta_net.linear1.weight.momentum_buffer"][:3].clone()})),
        "rank-embeds-shape": dict(change_tensors=lambda t: t.update(  # the parameter and its RAdam state, consistently
            {k: v[:2].clone() for k, v in t.items() if k == "param.rank_embeds" or (k.startswith("optim.rank_embeds.") and v.ndim == 2)})),
        "short-generator": dict(change_tensors=lambda t: t.update(generator_state=t["generator_state"][:100].clone())),
        "float-generator": dict(change_tensors=lambda t: t.update(generator_state=t["generator_state"].float())),
        "momentum-missing-on-resume": dict(change_meta=lambda m: m.update(complete=False),
                                           change_tensors=lambda t: t.pop("optim.ctx.momentum_buffer")),
        "nan-context": dict(change_tensors=lambda t: t["param.ctx"].fill_(float("nan"))),
        "n-aug-text": dict(change_meta=lambda m: m["stores"]["train"]["views"].update(n_aug="abc")),
        "class-chunk-fraction": dict(change_meta=lambda m: m["config"].update(class_chunk=1.5)),
        "classes-null": dict(change_meta=lambda m: m["run"].update(classes=None)),
    }
    if case == "classifier-rows":
        clf = load_checkpoint(target).classifier()
        export_classifier(target / CLASSIFIER_FILE, clf.text_features, classnames=clf.classnames, model=clf.model,
                          weights=clf.weights, logit_scale=clf.logit_scale)
        tensors = load_file(str(target / CLASSIFIER_FILE))
        from safetensors import safe_open

        with safe_open(str(target / CLASSIFIER_FILE), framework="pt") as fh:
            metadata = fh.metadata()
        save_file({**tensors, "text_features": tensors["text_features"][:2].clone()}, str(target / CLASSIFIER_FILE),
                  metadata=metadata)
        _rebound(target, change_meta=lambda m: m["classifier"].update(sha256=sha256_file(target / CLASSIFIER_FILE)))
    else:
        _rebound(target, **edits[case])
        if case == "nan-context":
            (target / CLASSIFIER_FILE).unlink(missing_ok=True)  # a re-export would have written a NaN classifier
            with pytest.raises(CheckpointError, match=message):
                run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=target, progress=False, clip=rn50,
                          overrides={"max_epoch": 1, "batch_size": 4, "method": method, "n_ctx": 2})
            assert not (target / CLASSIFIER_FILE).exists()
    code, metrics, err = _outcome(target, cache, rn50, capsys)
    assert code == 1 and metrics is None and message in err and len(err.strip().splitlines()) == 1, err
