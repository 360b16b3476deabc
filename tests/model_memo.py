"""One build per random-weights model in a test session.

Why: every in-process `coopipe` command (``CliRunner``, ``run_train``, ...) loads its CLIP model, and building
RN50 with random weights (``open_clip.create_model(..., load_weights=False)``) costs 1-2 s of CPU, most of it the
random initialisation of 100 M parameters; a copy of the built model costs a tenth of that. A full-disk loop of
`coopipe train` builds it twenty times.

The memo is exact, not an approximation: it answers only a random-weights build, keyed by the arguments, the model's
config, the default dtype and the state of torch's generator before the build (``load_clip`` seeds it); a hit returns
a deep copy of the model that build returned, leaves the generator where the build left it, and makes the same
module-level ``logging`` calls the build made (open_clip logs through the root logger, and tests read those lines).
Anything else (weights from a file or a tag, a Hub name) goes to open_clip unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

_LOG_FUNCTIONS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@contextlib.contextmanager
def _module_logging_calls() -> Iterator[list[tuple[int, object, tuple]]]:
    """The ``logging.info(...)``-style calls this thread makes inside the block (open_clip's way of logging), whatever
    the level set now: a replay must log what a build at that later time would log."""
    calls: list[tuple[int, object, tuple]] = []
    thread = threading.get_ident()
    originals = {name: getattr(logging, name) for name in _LOG_FUNCTIONS}

    def recording(name: str) -> Callable[..., None]:
        def log(msg: object, *args: object, **kwargs: Any) -> None:
            if threading.get_ident() == thread:
                calls.append((_LOG_FUNCTIONS[name], msg, args))
            originals[name](msg, *args, **kwargs)
        return log

    for name in _LOG_FUNCTIONS:
        setattr(logging, name, recording(name))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(logging, name, function)


class RandomInitMemo:
    """Wraps ``open_clip.create_model``: random-weights builds are made once and copied (see the module docstring);
    the ``maxsize`` most recently used models are kept (RN50 is 400 MB)."""

    def __init__(self, open_clip: Any, maxsize: int = 2) -> None:
        self._open_clip, self._maxsize = open_clip, maxsize
        self._built: OrderedDict[tuple, tuple[torch.nn.Module, torch.Tensor, list]] = OrderedDict()
        self._lock = threading.Lock()

    def wrap(self, create_model: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        def memo_create_model(model_name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
            if args or kwargs.get("pretrained") is not None or kwargs.get("load_weights", True) \
                    or self._open_clip.get_model_config(model_name) is None:
                return create_model(model_name, *args, **kwargs)
            return self._build(create_model, model_name, kwargs)

        return memo_create_model

    def _key(self, model_name: str, kwargs: dict[str, Any]) -> tuple:
        config = json.dumps(self._open_clip.get_model_config(model_name), sort_keys=True, default=repr)
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        return model_name, repr(sorted(kwargs.items())), config, str(torch.get_default_dtype()), rng

    def _build(self, create_model: Callable[..., torch.nn.Module], model_name: str,
               kwargs: dict[str, Any]) -> torch.nn.Module:
        with self._lock:
            key = self._key(model_name, kwargs)
            hit = self._built.get(key)
            if hit is None:
                with _module_logging_calls() as calls:
                    model = create_model(model_name, **kwargs)
                self._built[key] = (copy.deepcopy(model), torch.get_rng_state(), calls)
                while len(self._built) > self._maxsize:
                    self._built.popitem(last=False)
                return model
            self._built.move_to_end(key)
            pristine, rng_after, calls = hit
            for level, msg, args in calls:
                logging.log(level, msg, *args)
            torch.set_rng_state(rng_after)
            return copy.deepcopy(pristine)
