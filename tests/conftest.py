"""Shared fixtures: the real data in ../shared/data (skipped when absent unless COOPIPE_REQUIRE_DATA=1), and the
session's check that no process outlives the suite."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from leftovers import adopt_orphans, describe, kill_all, leftover_processes
from model_memo import RandomInitMemo

# The real data: ../shared/data beside the repository, or wherever COOPIPE_TEST_DATA points (a checkout elsewhere).
SHARED_DATA = Path(os.environ.get("COOPIPE_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def pytest_configure(config) -> None:
    """Adopt orphaned descendants, so that the session-end check sees a process whose parent was killed."""
    adopt_orphans()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if any process a test started (or its children) is still alive: a leak costs the next user
    memory and CPU (kill loops used to leave decode workers holding 256 MB each).

    Under pytest-xdist the controller checks, after its workers have exited: what a worker's tests left behind is
    then the controller's (an adopted orphan), and only the controller's status is the run's."""
    if hasattr(session.config, "workerinput"):
        return
    leftovers = leftover_processes()
    if not leftovers:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(leftovers)} process(es) outlived the test session (now killed):",
             *(f"  {describe(p)}" for p in leftovers)]
    if reporter is not None:
        for line in lines:
            reporter.write_line(line, red=True)
    kill_all(leftovers)
    # multiprocessing's fork servers (and resource trackers) of tests that used the forkserver context are idle
    # helpers that end with their parent; they are killed above, and only a process doing work fails the run
    if any(not any(helper in line for helper in _MP_HELPERS) for line in lines[1:]):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(session, config, items) -> None:
    """In a pytest-xdist worker (``scripts/test.sh``), the files holding a slow test come first, in their order: the
    scheduler hands out whole files in collection order, and a long file started last would leave the other worker
    idle at the end. A plain ``pytest`` run keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


_MP_HELPERS = ("multiprocessing.forkserver import main", "multiprocessing.resource_tracker import main")


def require_data(path: Path, what: str) -> Path:
    """``path`` if it exists; else skip (or fail when COOPIPE_REQUIRE_DATA=1) with a clear reason."""
    if path.exists():
        return path
    reason = f"{what} not found at {path} (the shared data folder next to the repository)"
    if os.environ.get("COOPIPE_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason}; COOPIPE_REQUIRE_DATA=1 requires it")
    pytest.skip(f"{reason}; set COOPIPE_REQUIRE_DATA=1 to make this a failure")


@pytest.fixture(autouse=True)
def _no_leaked_log_handler():
    """A test that runs the CLI in-process installs coopipe's root handler (``coopipe.logs.setup_logging``); take it
    away afterwards, so that no later test sees log lines written through it (or into a stream since closed)."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler).__name__ == "AboveProgressBars":
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def _random_init_memo() -> dict[str, RandomInitMemo]:
    return {}


@pytest.fixture(autouse=True)
def _random_weights_built_once(request, _random_init_memo):
    """Random-weights models are built once per session and copied (exactly: ``tests/model_memo.py``): in-process
    CLI runs each load their model, and the random initialisation is most of a short command's time. Tests of model
    building itself opt out with ``pytest.mark.fresh_models``. Patched only once open_clip is imported (the session
    fixtures a test uses, such as ``rn50``, import it before this runs)."""
    open_clip = sys.modules.get("open_clip")
    if open_clip is None or request.node.get_closest_marker("fresh_models"):
        yield
        return
    memo = _random_init_memo.setdefault("memo", RandomInitMemo(open_clip))
    real = open_clip.create_model
    open_clip.create_model = memo.wrap(real)
    try:
        yield
    finally:
        open_clip.create_model = real


@pytest.fixture(scope="session", autouse=True)
def engine_export_dir(request, tmp_path_factory):
    """ONNX Runtime exports of the test towers go to pytest's cache folder (reused by later sessions, like the
    EuroSAT stores), never into the user's ~/.cache; subprocesses (CLI, kill loops) inherit the variable."""
    from coopipe.engines import CACHE_ENV

    if os.environ.get(CACHE_ENV):
        yield Path(os.environ[CACHE_ENV])
        return
    try:
        path = request.config.cache.mkdir("coopipe-engines")
    except AttributeError:  # cache provider disabled (-p no:cacheprovider)
        path = tmp_path_factory.mktemp("engines")
    os.environ[CACHE_ENV] = str(path)
    yield path
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``../shared/data`` folder (CoOp's ``$DATA`` layout for EuroSAT, plus ``splits/``)."""
    return require_data(SHARED_DATA, "shared data")


@pytest.fixture(scope="session")
def eurosat_root(shared_data: Path) -> Path:
    """The CoOp data root holding ``eurosat/2750`` and ``eurosat/split_zhou_EuroSAT.json``."""
    require_data(shared_data / "eurosat" / "split_zhou_EuroSAT.json", "EuroSAT split file")
    require_data(shared_data / "eurosat" / "2750", "EuroSAT images")
    return shared_data


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS thread for a test module: on the 2 shared cores more threads are many times slower
    (they spin-wait on each other while other processes hold a core), and determinism checks need a fixed count.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rn50():
    """RN50 with random weights (the same for every call: fixed init seed), loaded once per test session."""
    from coopipe.models import load_clip

    return load_clip("RN50", "none")


@pytest.fixture(scope="session")
def eurosat(eurosat_root: Path):
    """CoOp's EuroSAT split over the real images."""
    from coopipe.datasets import load_dataset

    return load_dataset("eurosat", eurosat_root)


def copy_eurosat_folder(eurosat_root: Path, dest: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """A small image-folder dataset (one sub-folder per class) of the first real EuroSAT images of ``classes``."""
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        for src in sorted((eurosat_root / "eurosat" / "2750" / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(src, dest / cls / src.name)
    return dest


def copy_utkface(shared_data: Path, dest_root: Path, ages: range, per_age: int) -> Path:
    """``$DATA`` with ``utkface/images`` holding the first ``per_age`` real faces of each age in ``ages``."""
    src = require_data(shared_data / "utkface" / "images", "UTKFace images")
    dest = dest_root / "utkface" / "images"
    dest.mkdir(parents=True)
    for age in ages:
        for path in sorted(src.glob(f"{age}_*.jpg"))[:per_age]:
            shutil.copy(path, dest / path.name)
    return dest_root


def make_store(cache_dir: Path, *, model: str, weights: str, classnames: list[str], feats: np.ndarray,
                labels: np.ndarray, dataset: str = "toy", split: str = "test", rows="all",
                views: dict | None = None) -> Path:
    """Write a complete store directly (no encoding): for provenance, bad-input and run-folder tests. ``views``:
    the view record beside ``n_aug`` (an augmentation, say)."""
    from coopipe.store import store_path
    from coopipe.store_writer import StoreWriter

    prov = {"dataset": dataset, "split": split, "model": model, "weights": weights, "classnames": classnames,
            "views": {**(views or {}), "n_aug": feats.shape[1] - 1}, "rows": rows}
    path = store_path(cache_dir, prov)
    n = len(labels)
    writer = StoreWriter.create(path, prov, labels=labels.tolist(), index=list(range(n)),
                                paths=[f"img{i}.jpg" for i in range(n)], n_views=feats.shape[1], dim=feats.shape[2],
                                dtype="float32")
    for chunk in writer.pending_chunks():
        span = writer.chunk_rows_range(chunk)
        writer.write_chunk(chunk, feats[span.start:span.stop])
    return writer.finalize()


def make_toy_cache(cache_dir: Path, clip, classnames: list[str], sizes: dict[str, tuple[int, int]]) -> Path:
    """Full stores of a toy dataset with class-dependent features: ``sizes`` maps a split to (images per class,
    views), e.g. ``{"train": (6, 2), "val": (4, 1), "test": (5, 1)}``."""
    g = np.random.default_rng(0)
    means = g.normal(size=(len(classnames), clip.embed_dim)).astype(np.float32)
    for split, (n, views) in sizes.items():
        labels = np.repeat(np.arange(len(classnames)), n)
        feats = means[labels][:, None] + 0.5 * g.normal(size=(len(labels), views, clip.embed_dim)).astype(np.float32)
        make_store(cache_dir, model=clip.name, weights=clip.weights_id, classnames=list(classnames), feats=feats,
                   labels=labels, split=split)
    return cache_dir
