"""Stacked runs: runs trained together in one text pass equal the same runs trained alone.

Tolerance: fp32 on the CPU; the stacked pass runs the same arithmetic as the solo one but through GEMMs over R x the
rows (one group per run in the text path), so results differ by float rounding only. Measured over the 2-3 epochs
here: contexts (entries up to ~0.08) differ by <= 5e-8, final text features (up to ~0.1) by <= 2e-7, epoch losses by
<= 2e-7, SGD momentum buffers (sums of gradients, entries up to ~0.7) by <= 1.6e-6. We assert rtol 1e-5 with atol
1e-6 for contexts, features and losses and atol 1e-5 for the momentum buffers (gradient scale): about 5-20x above
the measured rounding, far below a real difference (a wrong batch, lr or gradient moves these by 1e-3 or more). The
stacked text pass itself, exact in float64 for every stackable method: ``tests/test_text_path.py``.
"""

from __future__ import annotations

import pytest
import torch

from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec
from coopipe.loop import StackedRun
from coopipe.stacked import stack_key, train_stacked
from coopipe.stacked_text import check_stackable
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig, TrainState

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
RTOL, ATOL = 1e-5, 1e-6
GRAD_ATOL = 1e-5  # momentum buffers: sums of gradients, entries up to ~0.7


def _features(shots: int, seed: int, dim: int = 1024, views: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random raw features (N, V, D) with a class-dependent mean (N = K x shots), and labels (N,)."""
    g = torch.Generator().manual_seed(100 + seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(shots)
    means = torch.randn(len(CLASSES), dim, generator=torch.Generator().manual_seed(0))
    return means[labels][:, None] + 0.5 * torch.randn(len(labels), views, dim, generator=g), labels


def _runs(on_epoch=None, resume=None, **config) -> list[StackedRun]:
    """2 seeds x shots 1 and 2: different images, batches per epoch (1 and 3) and epochs (2 and 3)."""
    val_feats, val_labels = _features(2, 99)
    runs = []
    for i, (seed, shots, epochs) in enumerate([(1, 1, 2), (2, 2, 3), (1, 2, 3)]):
        feats, labels = _features(shots, seed * 10 + shots)
        cfg = TrainConfig(max_epoch=epochs, batch_size=2, seed=seed, lr=0.01, method=MethodSpec.of("coop", n_ctx=4), **config)
        runs.append(StackedRun(feats, labels, CLASSES, cfg, val_feats=val_feats[:, 0], val_labels=val_labels,
                               on_epoch=None if on_epoch is None else (lambda rec, st, i=i: on_epoch(i, rec, st)),
                               resume_state=None if resume is None else resume[i]))
    return runs



def _assert_same(a, b) -> None:
    torch.testing.assert_close(a.ctx, b.ctx, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a.text_features, b.text_features, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a.state.momentum_buffer, b.state.momentum_buffer, rtol=RTOL, atol=GRAD_ATOL)
    assert torch.equal(a.state.generator_state, b.state.generator_state)
    assert [r.epoch for r in a.history] == [r.epoch for r in b.history]
    for x, y in zip(a.history, b.history):
        assert x.lr == y.lr and x.train_acc == y.train_acc and x.val_acc == y.val_acc
        assert x.loss == pytest.approx(y.loss, rel=RTOL, abs=ATOL)


def test_stacked_runs_equal_runs_trained_alone(rn50):
    seen: list[tuple[int, int]] = []
    stacked = train_stacked(_runs(on_epoch=lambda i, rec, st: seen.append((i, rec.epoch))), rn50, max_stack=3)
    alone = [train_prompt(r.train_feats, r.train_labels, rn50, r.classnames, r.config, val_feats=r.val_feats,
                          val_labels=r.val_labels) for r in _runs()]
    assert [len(r.history) for r in stacked] == [2, 3, 3]  # shots and epochs of each run kept
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    for a, b in zip(stacked, alone):
        _assert_same(a, b)
    assert not torch.allclose(stacked[0].ctx, stacked[2].ctx)  # the runs really differ


def test_resumed_stack_in_groups_of_two_equals_uninterrupted_stack(rn50):
    states: dict[int, TrainState] = {}

    def keep(i: int, rec, state: TrainState) -> None:
        if rec.epoch == 1:
            states[i] = state

    full = train_stacked(_runs(on_epoch=keep), rn50, max_stack=3)
    # resumed with a group bound of 2 (runs 0-1 stacked, then run 2 alone): the same results
    resumed = train_stacked(_runs(resume=[states[0], states[1], states[2]]), rn50, max_stack=2)
    for a, b in zip(resumed, full):
        _assert_same(a, b)
        assert a.history[0] == b.history[0]  # the first epoch comes from the state, as it was


def test_what_cannot_stack_is_refused(rn50):
    cocoop = [MethodSpec("cocoop").build_learner(rn50, CLASSES, generator=torch.Generator()) for _ in range(2)]
    with pytest.raises(ParamsError, match="image-conditional"):
        check_stackable(cocoop)
    feats, labels = _features(1, 1)
    runs = [StackedRun(feats, labels, CLASSES, TrainConfig.for_method("cocoop", 1, seed=s, max_epoch=1))
            for s in (1, 2)]
    with pytest.raises(ParamsError, match="cannot be stacked"):
        train_stacked(runs, rn50, max_stack=2)
    mixed = [StackedRun(feats, labels, CLASSES, TrainConfig(method=MethodSpec.of("coop", n_ctx=4))), StackedRun(feats, labels, CLASSES, TrainConfig())]
    assert stack_key(mixed[0]) != stack_key(mixed[1])
    with pytest.raises(ParamsError, match="share the class list"):
        train_stacked(mixed, rn50)


def test_group_bound_follows_the_memory_estimate(rn50):
    from coopipe.stacked import default_max_stack, run_bytes

    one = run_bytes(rn50, 10)
    assert run_bytes(rn50, 20) == 2 * one  # R x K x L x width x layers: linear in the classes
    assert run_bytes(rn50, 1000, TrainConfig(class_chunk=100, checkpoint_chunks=True)) == run_bytes(rn50, 100)
    assert default_max_stack(rn50, 10) >= 1
