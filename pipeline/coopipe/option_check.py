"""Training options checked at the boundary, by type, before any of them is used.

Why: options come from the command line and from ``params.yaml`` (where ``max_epoch: "ten"`` or ``lr: .nan`` are
valid YAML). A value of the wrong type used to fail deep inside training (``'<=' not supported ...``) or, worse,
work: ``lr: nan`` trained one epoch of NaN. Each option is compared with the type of its field in
:class:`~coopipe.train_config.TrainConfig` or in a registered method's options (``n_ctx``, ``csc``, ...), and numbers
must be finite, so the error names the option and its value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from coopipe.errors import ParamsError
from coopipe.methods import get_method, method_names
from coopipe.train_config import TrainConfig

_POSITIVE = {"lr", "batch_size", "n_ctx"}  # zero or below cannot mean anything
# max_epoch 0 is a training-free method's (Tip-Adapter); TrainConfig refuses it for a method that trains
_NON_NEGATIVE = {"momentum", "weight_decay", "warmup_lr", "warmup_epoch", "max_epoch", "select_every"}


def check_train_options(options: Mapping[str, Any]) -> None:
    """Raise :class:`ParamsError` naming the first option whose value has the wrong type or is not finite/positive."""
    kinds = {f.name: str(f.type) for name in method_names() for f in dataclasses.fields(get_method(name).options)}
    kinds.update({f.name: str(f.type) for f in dataclasses.fields(TrainConfig)})
    for name, value in options.items():
        kind = kinds.get(name)
        if kind is None or (value is None and "None" in kind):
            continue  # unknown names are TrainConfig's to report; None where the field allows it
        if kind.startswith("bool"):
            ok, want = isinstance(value, bool), "true or false"
        elif kind.startswith("int"):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif kind.startswith("float"):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind.startswith("str"):
            ok, want = isinstance(value, str), "a text"
        else:
            continue
        if ok and name in _POSITIVE and value <= 0:
            ok, want = False, "greater than 0"
        if ok and name in _NON_NEGATIVE and value < 0:
            ok, want = False, "0 or more"
        if not ok:
            raise ParamsError(f"training option {name} must be {want}, got {value!r} "
                              f"(--{name.replace('_', '-')} or params.yaml train.{name})")


def check_interval(seconds: Any, name: str) -> float:
    """A time interval in seconds: finite and not negative (``0``: every time)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise ParamsError(f"{name} must be a finite number of seconds >= 0, got {seconds!r}")
    return float(seconds)
