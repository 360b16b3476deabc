"""Output a person can read: log lines above progress bars, library warnings through logging, open_clip's
root-logger noise filtered (in the CLI and in sweep workers)."""

from __future__ import annotations

import logging
import re
import sys
import warnings

import pytest
from tqdm import tqdm

from coopipe.logs import route_worker_logging, setup_logging


@pytest.fixture()
def root_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logging.captureWarnings(False)  # an earlier test's set-up may have captured them under pytest's own recorder
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def _own_line(err: str, text: str) -> str:
    """What the terminal shows on the line holding ``text``: the part after the last carriage return."""
    line = next(li for li in err.split("\n") if text in li)
    return line.split("\r")[-1]


def test_log_lines_and_warnings_are_written_above_the_bars(root_logging, capsys):
    setup_logging("INFO")
    with tqdm(total=4, desc="encode", file=sys.stderr, mininterval=0) as bar:
        bar.update(1)
        logging.getLogger("coopipe.models").warning("random weights")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        logging.getLogger().warning("No pretrained weights loaded for model 'RN50'")  # open_clip, via the root
        bar.update(1)
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING coopipe\.models: random weights", _own_line(err, "random weights"))
    assert re.match(r"\d\d:\d\d:\d\d WARNING py\.warnings: .*a library's warning", _own_line(err, "library's warning"))
    assert "No pretrained weights" not in err


def test_a_worker_without_handlers_filters_open_clip_and_keeps_info_out(root_logging, capsys):
    logging.getLogger().handlers[:] = []
    route_worker_logging()
    logging.getLogger().warning("No pretrained weights loaded for model 'RN50'")
    logging.getLogger("coopipe.train").info("epoch 1")
    logging.getLogger("coopipe.train").warning("diverged")
    err = capsys.readouterr().err
    assert "WARNING:root" not in err and "No pretrained" not in err and "epoch 1" not in err
    assert "WARNING coopipe.train: diverged" in err


@pytest.mark.usefixtures("one_thread")
def test_a_run_whose_epochs_never_leave_the_warm_up_says_so(rn50, tmp_path, caplog):
    from conftest import make_toy_cache

    from coopipe.jobs.train import run_train

    cache = make_toy_cache(tmp_path / "cache", rn50, ["cat", "dog"], {"train": (4, 2)})
    kwargs = dict(cache_dir=cache, dataset="toy", shots=2, seed=1, progress=False, clip=rn50)
    with caplog.at_level(logging.WARNING, logger="coopipe"):
        run_train(out_dir=tmp_path / "one", overrides={"max_epoch": 1, "n_ctx": 2}, **kwargs)
    assert "all of them warm-up" in caplog.text and "1e-05" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coopipe"):
        run_train(out_dir=tmp_path / "two", overrides={"max_epoch": 2, "n_ctx": 2}, **kwargs)
    assert "warm-up" not in caplog.text


@pytest.mark.usefixtures("one_thread")
def test_training_progress_counts_steps_inside_epochs(rn50, tmp_path, capsys):
    """A long epoch (CoCoOp's batch 1: hundreds of steps) shows rate and ETA as it goes, not 0/1 epochs."""
    from conftest import make_toy_cache

    from coopipe.jobs.train import run_train

    cache = make_toy_cache(tmp_path / "cache", rn50, ["cat", "dog"], {"train": (4, 2)})
    run_train(cache_dir=cache, dataset="toy", shots=4, seed=1, progress=True, clip=rn50, out_dir=tmp_path / "run",
              overrides={"max_epoch": 2, "n_ctx": 2, "batch_size": 2})
    err = capsys.readouterr().err
    assert "8/8" in err and ("step/s" in err or "s/step" in err)  # 4 steps per epoch x 2 epochs, with a rate
    assert "epoch=2/2" in err
