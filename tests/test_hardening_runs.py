"""Prediction and encoding never hang on special files and never print a silent wrong result: a FIFO among the
images is refused before it is opened (encode and predict, with either bad-image policy), a damaged logit scale
is an error instead of ``nan%``, and predict on an image-conditional run says what to do instead."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_cache
from coopipe.checkpoint import load_checkpoint
from coopipe.checkpoint_files import CLASSIFIER_FILE, META_FILE
from coopipe.classifier import export_classifier
from coopipe.checkpoint_check import record_digest
from coopipe.cli import app
from coopipe.datasets.base import Dataset, Split
from coopipe.encode import EncodeOptions, encode_split
from coopipe.errors import BadImageError, CheckpointError
from coopipe.imageio import load_rgb
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.predict import predict
from coopipe.models import sha256_file
from PIL import Image
from typer.testing import CliRunner

CLASSES = ["cat", "dog", "sea or lake"]
OPTS = dict(precision="fp32", chunk_rows=2, batch_size=6, num_workers=0, progress=False)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging for ever (what a FIFO did)."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (6, 2), "val": (4, 1), "test": (5, 1)})


@pytest.fixture(scope="module")
def run(cache, rn50, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "coop"
    run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=out, progress=False, clip=rn50,
              overrides={"max_epoch": 2, "n_ctx": 2, "batch_size": 4})
    return out


def _images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.new("RGB", (32, 32), (60 * i, 20, 0)).save(path)
    return paths


def test_a_fifo_among_images_is_refused_before_it_is_opened(tmp_path, rn50, run):
    root = tmp_path / "imgs"
    _images(root, 5)
    os.mkfifo(root / "5.jpg")  # nobody ever writes to it: opening it would block for ever
    with deadline(20), pytest.raises(BadImageError, match=r"5\.jpg is not a regular file \(a FIFO\)"):
        load_rgb(root / "5.jpg")
    names = tuple(f"{i}.png" for i in range(5)) + ("5.jpg",)
    data = Dataset("tiny", root, ("cat", "dog"), "a photo of a {}.", {"test": Split(names, (0, 1) * 3)})
    with deadline(60), pytest.raises(BadImageError, match="FIFO"):
        encode_split(data, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)
    with deadline(60):
        skip = EncodeOptions(**{**OPTS, "on_bad_image": "skip"})
        result = encode_split(data, "test", cache_dir=tmp_path / "c", options=skip, clip=rn50)
    assert [s["path"] for s in result.skipped] == ["5.jpg"]
    with deadline(60):
        preds = predict(run, [root], on_bad_image="skip", clip=rn50)
        assert sorted(Path(p.path).name for p in preds) == [f"{i}.png" for i in range(5)]
        preds = predict(run, [root / "5.jpg", root / "0.png"], on_bad_image="skip", clip=rn50)
        assert [Path(p.path).name for p in preds] == ["0.png"]
        with pytest.raises(BadImageError, match="FIFO"):
            predict(run, [root], clip=rn50)


def test_a_damaged_logit_scale_is_an_error_not_nan_percent(tmp_path, rn50, run, cache):
    import shutil

    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    clf = load_checkpoint(damaged).classifier()
    export_classifier(damaged / CLASSIFIER_FILE, clf.text_features, classnames=list(clf.classnames), model=clf.model,
                      weights=clf.weights, logit_scale=1e4)
    meta = json.loads((damaged / META_FILE).read_text())
    meta["classifier"]["sha256"] = sha256_file(damaged / CLASSIFIER_FILE)  # consistently re-bound: only the scale lies
    meta["record_sha256"] = record_digest(meta)
    (damaged / META_FILE).write_text(json.dumps(meta))
    images = _images(tmp_path / "imgs", 2)
    with pytest.raises(CheckpointError, match=r"non-finite logits \(logit_scale 10000"):
        predict(damaged, images, clip=rn50)
    with pytest.raises(CheckpointError, match="non-finite logits"):
        run_eval(damaged, cache_dir=cache, clip=rn50)
    res = CliRunner().invoke(app, ["predict", str(damaged), str(images[0])])
    assert res.exit_code == 1 and "nan%" not in res.output and "logit_scale" in res.output
    assert np.isfinite([p.prob for p in predict(run, images, clip=rn50)]).all()


def test_predict_on_an_image_conditional_run_predicts(tmp_path, rn50, cache):
    """A CoCoOp run has no fixed classifier; predict runs its prompt through the text tower for each image (it used to
    say "classifier not found", which re-training cannot help)."""
    out = tmp_path / "cocoop"
    run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=out, progress=False, clip=rn50,
              overrides={"max_epoch": 1, "batch_size": 4, "method": "cocoop"})
    images = _images(tmp_path / "imgs", 1)
    [pred] = predict(out, images, clip=rn50, topk=2)
    assert len(pred.labels) == 2 and sum(pred.probs) <= 1 + 1e-6 and all(0 <= p <= 1 for p in pred.probs)


def test_rank_prompts_need_ordered_labels(cache, rn50, tmp_path):
    from coopipe.errors import DatasetError

    with pytest.raises(DatasetError, match=r"--method rank needs ordered labels .*toy's classes \(cat, dog"):
        run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=tmp_path / "rank", progress=False,
                  clip=rn50, overrides={"max_epoch": 1, "method": "rank"})
    assert not (tmp_path / "rank" / META_FILE).exists()


@pytest.mark.parametrize("written", ["1e1", "0x1e", "3_0", "nan", "30.5", " ", "true"])
def test_ages_are_whole_numbers_as_written(written, tmp_path):
    from coopipe.datasets.ages import parse_age, read_age_split_file
    from coopipe.errors import DatasetError

    with pytest.raises(DatasetError, match="not a whole number of years"):
        parse_age(written, min_age=0, max_age=100, where="list.txt line 3")
    assert [parse_age(v, min_age=0, max_age=100, where="x") for v in ("30", "30.0", 30, 30.0, "+7")] == [30, 30, 30, 30, 7]
    split = tmp_path / "split.json"
    split.write_text('{"train": [["a.jpg", 1e1]], "test": [["b.jpg", 12]]}')
    with pytest.raises(DatasetError, match=r"split\.json, train\[0\]: age '1e1'"):
        read_age_split_file(split)


_BLOCKED_ENCODE = """
import os, sys, time
from pathlib import Path
from PIL import Image
import coopipe.encode as enc
from coopipe.datasets.base import Dataset, Split

root, pidfile = Path(sys.argv[1]), Path(sys.argv[2])
root.mkdir()
names = tuple(f"{i}.png" for i in range(4))
for name in names:
    Image.new("RGB", (24, 24)).save(root / name)

def blocked(path):  # a decode that never returns (what a FIFO did), in the worker
    pidfile.write_text(str(os.getpid()))
    time.sleep(600)

enc.load_rgb = blocked
data = Dataset("tiny", root, ("cat", "dog"), "a photo of a {}.", {"test": Split(names, (0, 1, 0, 1))})
opts = enc.EncodeOptions(precision="fp32", engine="eager", chunk_rows=2, batch_size=2, num_workers=1, progress=False)
enc.encode_split(data, "test", cache_dir=root.parent / "c", options=opts, pretrained="none")
"""


def test_decode_workers_die_with_a_killed_encode_and_free_the_store_lock(tmp_path):
    import subprocess
    import sys
    import time

    from coopipe.locks import exclusive_lock

    pidfile = tmp_path / "worker.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    main = subprocess.Popen([sys.executable, "-c", _BLOCKED_ENCODE, str(tmp_path / "imgs"), str(pidfile)], env=env)
    worker = None
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                worker = int(pidfile.read_text())
                break
            assert main.poll() is None, "the encode ended before its worker blocked"
            time.sleep(0.2)
        assert worker is not None and worker != main.pid
        main.kill()  # SIGKILL: no cleanup runs in the main process
        main.wait(timeout=30)
        for _ in range(100):
            if not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"decode worker {worker} outlived its killed parent")
        (lock,) = (tmp_path / "c").rglob("*.lock")
        with exclusive_lock(lock, "the store"):  # free: no orphan holds it
            pass
    finally:
        if main.poll() is None:
            main.kill()
        if worker is not None and Path(f"/proc/{worker}").exists():
            os.kill(worker, signal.SIGKILL)


def _cli(*args: object):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, res.output.strip().splitlines()


@pytest.mark.parametrize(("option", "value", "named"), [
    ("lr", float("nan"), "lr must be a finite number"), ("lr", -1.0, "lr must be greater than 0"),
    ("lr", float("inf"), "lr must be a finite number"), ("max_epoch", "ten", "max_epoch must be a whole number"),
    ("max_epoch", 2.5, "max_epoch must be a whole number"), ("batch_size", 0, "batch_size must be greater than 0"),
    ("momentum", "0.9", "momentum must be a finite number"), ("csc", "yes", "csc must be true or false"),
])
def test_training_options_are_checked_at_the_boundary(cache, rn50, tmp_path, option, value, named):
    from coopipe.errors import ParamsError

    with pytest.raises(ParamsError, match=rf"{named}, got .*params\.yaml train\.{option}"):
        run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=tmp_path / "r", progress=False, clip=rn50,
                  overrides={option: value})
    assert not (tmp_path / "r" / META_FILE).exists()


def test_cli_options_and_devices_are_named(cache, run, tmp_path):
    base = ["train", "--features", cache, "--dataset", "toy", "--shots", 2, "--seed", 1, "--out", tmp_path / "r",
            "--epochs", 1, "--no-progress"]
    for extra, named in ((["--lr", "nan"], "lr must be a finite number"),
                         (["--checkpoint-every", "nan"], "checkpoint_every"),
                         (["--checkpoint-every", "-5"], "checkpoint_every")):
        res, lines = _cli(*base, *extra)
        assert res.exit_code == 1 and named in res.output and len(lines) == 1, res.output
    if not torch.cuda.is_available():
        img = _images(tmp_path / "imgs", 1)[0]
        for args in ([*base, "--device", "cuda"], ["eval", run, "--features", cache, "--device", "cuda"],
                     ["predict", run, img, "--device", "cuda"]):
            res, lines = _cli(*args)
            assert res.exit_code == 1 and "no CUDA GPU is available here" in res.output and len(lines) == 1, res.output


def test_zeroshot_needs_only_test_features(rn50, tmp_path):
    from conftest import make_store

    g = np.random.default_rng(0)
    make_store(tmp_path / "c", model=rn50.name, weights=rn50.weights_id, classnames=CLASSES,
               feats=g.normal(size=(6, 1, rn50.embed_dim)).astype(np.float32), labels=np.arange(6) % 3)
    res, _ = _cli("zeroshot", "--features", tmp_path / "c", "--dataset", "toy", "--out", tmp_path / "zs")
    assert res.exit_code == 0 and "train features" not in res.output, res.output
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text())["n"] == 6
