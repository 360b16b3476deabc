"""The thread policy of small steps (coopipe.threads): the size rule, the wait policy libgomp reads, exactness.

Exactness: the thread count a step runs on changes only float summation order, so a float64 CoCoOp step's loss and
gradients on one thread and on two, through the policy, equal the plain computation (open_clip's own transformer on
the unpacked prompts, one mean loss, one backward) to float64 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from coopipe import threads
from coopipe.cocoop import CoCoOpLearner
from coopipe.cocoop_text import cocoop_backward, cocoop_logits, cocoop_predict
from coopipe.models import LoadedClip, load_clip
from coopipe.text_encoder import PromptTextEncoder

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
NAMES = ["a", "golden retriever", "st. bernard with a very long name"]
TIGHT = 1e-10  # float64


def test_one_thread_below_the_split_size_the_pool_above() -> None:
    width = 512
    small = threads.SPLIT_ROWS_WIDTH // width - 1
    assert threads.threads_for(small, width, 2) == 1
    assert threads.threads_for(small + 1, width, 2) == 2
    assert threads.threads_for(10_000, width, 8) == 8
    assert threads.threads_for(10_000, width, 0) == 1


def test_step_threads_sets_the_count_for_the_block_and_restores_it() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        idle = lambda: 2  # noqa: E731  # both cores free: the size rule alone decides
        with threads.step_threads(2, 512, free=idle) as used:
            assert used == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.step_threads(500, 512, free=idle) as used:
            assert used == 2 and torch.get_num_threads() == 2
        with threads.step_threads(500, 512, free=lambda: 1) as used:  # another process wants the other core
            assert used == 1 and torch.get_num_threads() == 1
        with threads.step_threads(500, 512, free=lambda: None) as used:  # counts unreadable: the pool's size
            assert used == 2
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads.step_threads(2, 512, free=idle):
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_the_runnable_threads_of_other_processes() -> None:
    own = ["12 (python) R 1 2", "13 (pt main thread) S 1 2", "14 (a) b) R 1 2"]  # a name may hold ") "
    assert threads._runnable_elsewhere("1.00 0.50 0.20 3/120 999\n", own) == 1
    assert threads._runnable_elsewhere("1.00 0.50 0.20 1/120 999\n", own[:2]) == 0
    assert threads._runnable_elsewhere("1.00 0.50 0.20 1/120 999\n", []) == 0  # the caller counts as its own
    free = threads.free_cores()
    if free is not None:  # Linux
        assert 1 <= free <= len(os.sched_getaffinity(0))


def test_yielding_waits_leaves_a_users_wait_policy_alone() -> None:
    for name in threads.WAIT_VARIABLES:
        environ = {name: "ACTIVE" if name == "OMP_WAIT_POLICY" else "5"}
        assert not threads.yielding_waits(environ)
        assert environ == {name: "ACTIVE" if name == "OMP_WAIT_POLICY" else "5"}
    environ = {}
    assert threads.yielding_waits(environ)
    assert environ == {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}


def _libgomp_settings(extra: dict[str, str]) -> str:
    """libgomp's settings as it prints them at start-up, in a process that imports coopipe and then torch."""
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    env.update(PYTHONPATH=str(PIPELINE), OMP_DISPLAY_ENV="VERBOSE", **extra)
    code = "import coopipe, torch; torch.set_num_threads(2); torch.ones(4096).add_(1)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_libgomp_reads_the_spin_count_set_on_import() -> None:
    if not any(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*")):
        pytest.skip("this torch does not ship GNU libgomp")
    assert f"GOMP_SPINCOUNT = '{threads.SPIN_COUNT}'" in _libgomp_settings({})
    assert "GOMP_SPINCOUNT = '123'" in _libgomp_settings({"GOMP_SPINCOUNT": "123"})


@pytest.fixture(scope="module")
def clip64() -> LoadedClip:
    """A float64 copy of RN50's text tower cut to two blocks (exactness does not depend on depth)."""
    clip = load_clip("RN50", "none")
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:2]
    return dataclasses.replace(clip, model=model.double())


def _grads(learner: CoCoOpLearner) -> list[torch.Tensor]:
    return [p.grad.clone() for p in learner.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "pool"])
def test_step_with_the_policy_equals_the_plain_computation(
    clip64: LoadedClip, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    monkeypatch.setattr(threads, "SPLIT_ROWS_WIDTH", 1 if split else 10**12)  # force either choice
    monkeypatch.setattr(threads, "free_cores", lambda: None)  # whatever else runs on this machine
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        learner = CoCoOpLearner(clip64, NAMES, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            learner.meta_net.linear2.weight.mul_(20.0)  # a shift as large as the context: the image matters
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(3, clip64.embed_dim, generator=gen, dtype=torch.float64) * 3.0
        labels = torch.tensor([2, 0, 1])
        scale = clip64.model.logit_scale

        plain = PromptTextEncoder(clip64, cut=False, share_prefix=False)
        loss = F.cross_entropy(cocoop_logits(plain, learner, images, scale, image_chunk=None), labels)
        loss.backward()
        expected = _grads(learner)
        learner.zero_grad()

        policy_loss, _ = cocoop_backward(PromptTextEncoder(clip64), learner, images, labels, scale, image_chunk=2)
        assert torch.get_num_threads() == 2  # restored after the step
        assert abs(float(policy_loss) - float(loss.detach())) < TIGHT
        for got, want in zip(_grads(learner), expected):
            assert torch.allclose(got, want, rtol=0, atol=TIGHT)
        with torch.no_grad():
            want_logits = cocoop_logits(plain, learner, images, scale)
        got_logits = cocoop_predict(PromptTextEncoder(clip64), learner, images, scale, batch_size=2)
        assert torch.allclose(got_logits.double(), want_logits, rtol=0, atol=1e-5)  # predict returns float32
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_step_on_one_thread_and_on_two(clip64: LoadedClip, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The free-core cap picks a step's threads by what else runs. In float64 (every exactness and resume test)
    the result does not depend on it, bit for bit; in float32 oneDNN's products may round differently on one
    thread and on two (seen with a 13-row class name), so a float32 run's rounding follows the load."""
    monkeypatch.setattr(threads, "SPLIT_ROWS_WIDTH", 1)  # the pool's threads at any size
    monkeypatch.setattr(threads, "free_cores", lambda: None)
    clip = dataclasses.replace(clip64, model=copy.deepcopy(clip64.model).to(dtype))
    images = torch.randn(4, clip.embed_dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
    labels = torch.tensor([2, 0, 1, 1])
    before = torch.get_num_threads()
    grads = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            learner = CoCoOpLearner(clip, NAMES, generator=torch.Generator().manual_seed(0))
            cocoop_backward(PromptTextEncoder(clip), learner, images, labels, clip.model.logit_scale, image_chunk=2)
            grads[count] = _grads(learner)
    finally:
        torch.set_num_threads(before)
    for one, two in zip(grads[1], grads[2]):
        if dtype == torch.float64:
            assert torch.equal(one, two)
        else:
            assert torch.allclose(one, two, rtol=1e-4, atol=1e-6 * float(two.abs().max()))


def test_the_free_core_cap_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``COOPIPE_SHARE_CORES`` a step's threads follow its size alone, whatever else runs, so the same seed
    gives the identical float32 run; with it the cores other processes leave free cap them."""
    monkeypatch.setattr(threads, "free_cores", lambda: 1)  # as if another process wanted the other core
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv(threads.SHARE_VARIABLE, raising=False)
        with threads.step_threads(500, 512) as used:
            assert used == 2
        monkeypatch.setenv(threads.SHARE_VARIABLE, "0")
        with threads.step_threads(500, 512) as used:
            assert used == 2
        monkeypatch.setenv(threads.SHARE_VARIABLE, "1")
        with threads.step_threads(500, 512) as used:
            assert used == 1
    finally:
        torch.set_num_threads(before)
