"""A run's resume state: what is saved after an epoch, and how a new run continues from it.

Why apart from the loop: the state (every learner parameter and the optimiser's state by name, the data generator's
state, the epoch and history) is the loop's contract with the checkpoint (:mod:`coopipe.checkpoint`); written and
read in one place, a resumed run equals an uninterrupted one whatever the method and its optimiser.
"""

from __future__ import annotations

from typing import Any

import torch

from coopipe.errors import CheckpointError
from coopipe.learners import Learner
from coopipe.train_config import EpochRecord, TrainState

__all__ = ["learner_variant", "restore", "snapshot"]


def snapshot(
    epoch: int,
    learner: Learner,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    history: list[EpochRecord],
) -> TrainState:
    """The run's state after ``epoch`` epochs: every parameter and the optimiser's state by name (CPU copies)."""
    params = dict(learner.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        for key, value in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
            state[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return TrainState(
        epoch=epoch,
        params={name: p.detach().cpu().clone() for name, p in params.items()},
        generator_state=generator.get_state().clone(),
        optimizer=state,
        history=list(history),
        variant=learner_variant(learner),
        frozen=tuple(name for name, p in params.items() if not p.requires_grad),
    )


def learner_variant(learner: Learner) -> dict[str, Any]:
    """The learner's shape (method options, M, ...) without its class names: what a resumed run must rebuild."""
    return {k: v for k, v in learner.config().items() if k != "classnames"}


def restore(
    state: TrainState,
    learner: Learner,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    max_epoch: int,
) -> None:
    """Load ``state`` into a freshly built learner, optimiser and data generator; raise :class:`CheckpointError`
    (one line, the fix) unless it is a state of this learner (variant, parameter names and shapes, epoch range)."""
    variant = learner_variant(learner)
    if state.variant and state.variant != variant:
        raise CheckpointError(
            f"cannot resume: the saved state is for learner variant {state.variant}, this run builds {variant}; "
            f"resume with the checkpoint's method and options or start a new run"
        )
    params = dict(learner.named_parameters())
    if set(state.params) != set(params):
        raise CheckpointError(
            f"cannot resume: the saved state holds parameters {sorted(state.params)}, this learner has "
            f"{sorted(params)}; resume with the checkpoint's method or start a new run"
        )
    for name, param in params.items():
        if tuple(state.params[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"cannot resume: saved {name} has shape {tuple(state.params[name].shape)}, this run needs "
                f"{tuple(param.shape)} (another class list, model or variant); start a new run"
            )
    if not 0 <= state.epoch <= max_epoch:
        raise CheckpointError(f"cannot resume: saved state is at epoch {state.epoch} of a {max_epoch}-epoch run")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state.params[name].to(param.device, param.dtype))
    for key, value in state.optimizer.items():
        name, _, field = key.rpartition(".")
        if name not in params or optimizer is None:
            raise CheckpointError(f"cannot resume: optimiser state {key!r} names no parameter of this learner")
        param = params[name]
        as_param = value.is_floating_point() and value.shape == param.shape
        optimizer.state[param][field] = value.to(param.device, param.dtype).clone() if as_param else value.clone()
    generator.set_state(state.generator_state.clone())
