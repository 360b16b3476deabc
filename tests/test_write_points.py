"""A full disk at every write point of every command that writes: one line naming the path and the fix, exit code 1,
no temporary file left, and the same command re-run after space is freed gives results equal to an uninterrupted run.

Every file coopipe writes goes through :func:`coopipe.atomic.atomic_write`, which flushes each file with ``fsync``
before publishing it; the disk is made "full" at the n-th ``fsync`` of a command, for every n the command reaches.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_toy_cache
from coopipe.cli import app
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

CLASSES = ["cat", "dog", "sea or lake"]
Command = Callable[[Path], list[str]]


@pytest.fixture(scope="module")
def world(rn50, tmp_path_factory) -> dict[str, Path]:
    """A toy cache, a trained 2-epoch run, a store and two images: the inputs of every writing command."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("world")
    cache = make_toy_cache(base / "cache", rn50, CLASSES, {"train": (6, 1), "val": (4, 1), "test": (5, 1)})
    run = base / "runs" / "toy" / "coop" / "shots2_seed1"
    for args in (_train_args(cache, run), ["eval", str(run), "--features", str(cache)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 30, 0)).save(base / f"img{i}.png")
    store = next((cache / "toy").glob("test_*.zarr"))
    return {"cache": cache, "run": run, "runs": base / "runs", "store": store, "img": base / "img0.png"}


def _train_args(cache: Path, out: Path) -> list[str]:
    return ["train", "--features", str(cache), "--dataset", "toy", "--shots", "2", "--seed", "1", "--out", str(out),
            "--epochs", "2", "--n-ctx", "2", "--batch-size", "4", "--no-progress", "--checkpoint-every", "0"]


def _commands(world: dict[str, Path]) -> dict[str, tuple[Command, Callable[[Path], object]]]:
    """name -> (arguments writing under a folder, what a finished result is read as)."""
    def metrics(path: Path) -> object:
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if k not in ("store", "cost")}  # cost: measured times, memory

    def train_result(folder: Path) -> object:
        out = folder / "run"
        history = json.loads((out / "prompt.json").read_text())["history"]
        tensors = load_file(out / "classifier.safetensors")  # its metadata names the run folder: compare values
        return ([{k: v for k, v in h.items() if k != "seconds"} for h in history],
                {k: v.tolist() for k, v in sorted(tensors.items())})

    def h5(out: Path) -> object:
        with h5py.File(out / "s.h5", "r") as f:
            return {k: np.asarray(f[k][:]).tolist() for k in ("features", "labels", "index", "valid")}

    run, cache = world["run"], world["cache"]
    return {
        "train": (lambda d: _train_args(cache, d / "run"), train_result),
        "eval --out": (lambda d: ["eval", str(run), "--features", str(cache), "--out", str(d / "m.json")],
                       lambda d: metrics(d / "m.json")),
        "predict --out": (lambda d: ["predict", str(run), str(world["img"]), "--out", str(d / "p.json")],
                          lambda d: json.loads((d / "p.json").read_text())),
        "zeroshot": (lambda d: ["zeroshot", "--features", str(cache), "--dataset", "toy", "--out", str(d / "zs")],
                     lambda d: metrics(d / "zs" / "metrics.json")),
        "report": (lambda d: ["report", str(world["runs"]), "--out", str(d / "rep")],
                   lambda d: (d / "rep" / "report.md").read_text()),
        "cache export": (lambda d: ["cache", "export", str(world["store"]), str(d / "s.h5"), "--overwrite"], h5),
        "interpret (FAISS index)": (
            lambda d: ["interpret", str(run), "--cache", str(d / "vocab_cache"), "--no-accuracy", "--json",
                       str(d / "i.json")],
            lambda d: {k: v for k, v in json.loads((d / "i.json").read_text()).items() if k != "index"}),
    }


class DiskFull:
    """``os.fsync`` that raises ENOSPC at its ``fail_at``-th call (0: never) and counts the calls."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls, self._real = fail_at, 0, os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._real(fd)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# Commands with many write points (a training run's checkpoints and logs, a report's figures, an index build): the
# fast tier fails their first, middle and last write; the slow tier every other one.
MANY_POINTS = ("train", "report", "interpret (FAISS index)")


def _sampled(points: int) -> set[int]:
    """The write points the fast tier fails for a command of ``MANY_POINTS``: the first, the middle and the last."""
    return {1, (points + 1) // 2, points}


@pytest.mark.parametrize("name", ["train", "eval --out", "predict --out", "zeroshot", "report", "cache export",
                                  "interpret (FAISS index)"])
def test_a_full_disk_at_each_write_point_is_one_line_and_a_rerun_finishes(world, uninterrupted, tmp_path, monkeypatch,
                                                                           name):
    """Every write point, except for ``MANY_POINTS`` the first, the middle and the last (the others: the next test)."""
    _full_disk_at(world, uninterrupted, tmp_path, monkeypatch, name,
                  lambda points: _sampled(points) if name in MANY_POINTS else set(range(1, points + 1)))


@pytest.mark.slow  # the other write points of a training run, a report and an index build: about 30 s of CPU
@pytest.mark.parametrize("name", MANY_POINTS)
def test_a_full_disk_at_every_other_write_point_is_one_line_and_a_rerun_finishes(world, uninterrupted, tmp_path,
                                                                                 monkeypatch, name):
    _full_disk_at(world, uninterrupted, tmp_path, monkeypatch, name,
                  lambda points: set(range(1, points + 1)) - _sampled(points))


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> Callable[[str], tuple[object, int]]:
    """Command name -> (its uninterrupted result, its number of write points), run once per module: the fast test and
    the slow one of a command in ``MANY_POINTS`` compare with the same run."""
    done: dict[str, tuple[object, int]] = {}

    def of(name: str) -> tuple[object, int]:
        if name not in done:
            args, result = _commands(world)[name]
            clean = tmp_path_factory.mktemp("clean")
            counter = DiskFull(0)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(os, "fsync", counter)
                res = CliRunner().invoke(app, args(clean))
            assert res.exit_code == 0, res.output
            done[name] = result(clean), counter.calls
        return done[name]

    return of


def _full_disk_at(world: dict[str, Path], uninterrupted: Callable[[str], tuple[object, int]], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch, name: str, chosen: Callable[[int], set[int]]) -> None:
    """For each write point that ``chosen`` picks from command ``name``'s count, fill the disk there (one line, exit 1,
    no temporary file) and re-run to the uninterrupted result."""
    args, result = _commands(world)[name]
    runner = CliRunner()
    expected, points = uninterrupted(name)
    assert points >= 1
    for n in sorted(chosen(points)):
        folder = tmp_path / f"full{n}"
        monkeypatch.setattr(os, "fsync", DiskFull(n))
        res = runner.invoke(app, args(folder))
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1, (n, res.output)
        assert "disk is full" in lines[-1] and res.output.count("error:") == 1, (n, res.output)
        assert not _leftovers(folder) and not _leftovers(world["run"]), n
        monkeypatch.setattr(os, "fsync", DiskFull(0))
        res = runner.invoke(app, args(folder))
        assert res.exit_code == 0, (n, res.output)
        assert result(folder) == expected, (name, n)
        shutil.rmtree(folder)


def test_a_folder_in_the_way_or_a_name_too_long_is_one_line_and_leaves_no_temporary_file(world, tmp_path):
    runner = CliRunner()
    (tmp_path / "p.json").mkdir()
    (tmp_path / "s.h5").mkdir()
    cases = {
        "it is a folder": [
            ["predict", str(world["run"]), str(world["img"]), "--out", str(tmp_path / "p.json")],
            ["cache", "export", str(world["store"]), str(tmp_path / "s.h5"), "--overwrite"],
            ["eval", str(world["run"]), "--features", str(world["cache"]), "--out", str(tmp_path / "p.json")],
        ],
        "name is too long": [
            ["eval", str(world["run"]), "--features", str(world["cache"]), "--out", str(tmp_path / ("m" * 300 + ".json"))],
        ],
    }
    for fix, commands in cases.items():
        for args in commands:
            res = runner.invoke(app, args)
            assert res.exit_code == 1 and fix in res.output and res.output.count("error:") == 1, (args, res.output)
            assert str(tmp_path) in res.output
    assert not _leftovers(tmp_path)


class HalfWrite:
    """``open`` for a library module: its ``fail_at``-th opening for writing (0: never) returns a file whose first
    write stores half of the text and then raises ENOSPC, as a full disk does inside a write in place."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        import builtins

        fh = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode or "a" in mode:
            self.calls += 1
            if self.calls == self.fail_at:
                return _FullAfterHalf(fh)
        return fh


class _FullAfterHalf:
    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, text: str) -> int:
        self._fh.write(text[: len(text) // 2])
        self._fh.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def _dvclive_files(run: Path) -> dict[str, object]:
    live = run / "dvclive"
    return {str(p.relative_to(live)): json.loads(p.read_text()) if p.suffix == ".json" else p.read_text()
            for p in sorted(live.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_full_disk_inside_a_dvclive_write_is_one_line_and_a_rerun_equals_an_uninterrupted_run(world, tmp_path,
                                                                                             monkeypatch):
    import dvclive.plots.metric
    import dvclive.serialize

    def patch(opener: HalfWrite) -> HalfWrite:
        for module in (dvclive.serialize, dvclive.plots.metric):
            monkeypatch.setattr(module, "open", opener, raising=False)
        return opener

    args, result = _commands(world)["train"]
    runner = CliRunner()
    counter = patch(HalfWrite(0))
    assert runner.invoke(app, args(tmp_path / "clean")).exit_code == 0
    expected = (result(tmp_path / "clean"), _dvclive_files(tmp_path / "clean" / "run"))
    assert counter.calls >= 4
    # the first row appended, a write in the middle (epoch 2: the resume starts from epoch 1's checkpoint), the summary
    # that end() writes last; the points between repeat these writes for other metrics
    for n in sorted({1, counter.calls // 2 + 1, counter.calls}):
        folder = tmp_path / f"full{n}"
        patch(HalfWrite(n))
        res = runner.invoke(app, args(folder))
        assert res.exit_code == 1 and res.output.count("error:") == 1, (n, res.output)
        assert "disk is full" in res.output and str(folder / "run" / "dvclive") in res.output, (n, res.output)
        patch(HalfWrite(0))
        res = runner.invoke(app, args(folder))
        assert res.exit_code == 0, (n, res.output)
        assert (result(folder), _dvclive_files(folder / "run")) == expected, n
        assert not _leftovers(folder), n
        shutil.rmtree(folder)


@pytest.mark.slow
def test_a_full_disk_inside_each_zarr_write_of_an_encode_is_one_line_and_a_rerun_equals_an_uninterrupted_run(
        rn50, tmp_path, monkeypatch, capsys):
    """Each kind of ``LocalStore.set`` of an encode (array metadata, chunks, attributes, the final record) fails once."""
    import typer
    import zarr
    from coopipe.cli_common import errors
    from coopipe.datasets.base import Dataset, Split
    from coopipe.encode import EncodeOptions, encode_split
    from coopipe.store import open_store

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    names = [f"{i}.png" for i in range(4)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name)
    data = Dataset("tiny", tmp_path / "imgs", ("cat", "dog"), "a photo of a {}.",
                   {"test": Split(tuple(names), (0, 1, 0, 1))})
    options = EncodeOptions(precision="fp32", chunk_rows=2, batch_size=4, num_workers=0, progress=False)
    real_set = zarr.storage.LocalStore.set
    state = {"calls": 0, "fail_at": 0}

    keys: list[str] = []

    async def counted_set(self, key, value):
        state["calls"] += 1
        keys.append(key)
        if state["calls"] == state["fail_at"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real_set(self, key, value)

    def encode(cache: Path) -> int:
        capsys.readouterr()
        try:
            with errors():
                encode_split(data, "test", cache_dir=cache, options=options, clip=rn50)
        except typer.Exit as exc:
            return int(exc.exit_code)
        return 0

    def content(cache: Path) -> object:
        store = open_store(next((cache / "tiny").glob("*.zarr")), checksums=True)
        return store.read(view=None).tolist(), store.labels().tolist(), store.provenance

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counted_set)
    assert encode(tmp_path / "clean") == 0
    expected, points = content(tmp_path / "clean"), state["calls"]
    assert points >= 8
    # the first write of each kind (each array's metadata, its first chunk, the group's record) and the last one
    # (the record that marks the store complete); later writes of a kind take the same path through the code
    kinds = {re.sub(r"/c/.*", "/c", key): 0 for key in keys}
    for i, key in reversed(list(enumerate(keys, start=1))):
        kinds[re.sub(r"/c/.*", "/c", key)] = i
    for n in sorted({*kinds.values(), points}):
        cache = tmp_path / f"full{n}"
        state.update(calls=0, fail_at=n)
        code, err = encode(cache), capsys.readouterr().err
        assert code == 1 and err.count("error:") == 1 and "\n" not in err.strip(), (n, err)
        assert "full" in err and str(cache) in err, (n, err)
        state.update(calls=0, fail_at=0)
        assert encode(cache) == 0, n
        assert content(cache) == expected, n
        shutil.rmtree(cache)


@pytest.mark.parametrize("name", ["eval --out", "train"])
def test_a_permission_error_on_a_write_is_one_line_naming_the_path_and_a_rerun_finishes(world, tmp_path, monkeypatch,
                                                                                        name):
    """EACCES when a finished file is published (tests run as root, where chmod denies nothing: ``os.replace`` raises
    as the kernel would): one line naming the path and the fix, no temporary file, and a re-run finishes."""
    args, result = _commands(world)[name]
    runner = CliRunner()
    assert runner.invoke(app, args(tmp_path / "clean")).exit_code == 0
    real_replace = os.replace

    def denied(src, dst, *rest, **kwargs):
        if str(tmp_path / "denied") in str(dst):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), str(dst))
        return real_replace(src, dst, *rest, **kwargs)

    folder = tmp_path / "denied"
    monkeypatch.setattr(os, "replace", denied)
    res = runner.invoke(app, args(folder))
    assert res.exit_code == 1 and res.output.count("error:") == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert "Permission denied" in line and "fix the permissions" in line and str(folder) in line, line
    assert not _leftovers(folder) and not _leftovers(world["run"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert runner.invoke(app, args(folder)).exit_code == 0
    assert result(folder) == result(tmp_path / "clean")


def test_a_permission_error_on_a_read_is_one_line_naming_the_file(world, monkeypatch):
    record = world["run"] / "prompt.json"
    real_read = Path.read_text

    def denied(self, *args, **kwargs):
        if self == record:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    res = CliRunner().invoke(app, ["eval", str(world["run"]), "--features", str(world["cache"])])
    assert res.exit_code == 1 and res.output.count("error:") == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert f"Permission denied ({record})" in line and "fix the permissions" in line, line
