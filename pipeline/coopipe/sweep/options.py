"""Extra `coopipe train` / `coopipe encode` options given to a sweep as one string (``--train-args "--bf16
--batch-size 32"``), read into the fields of :class:`~coopipe.train_config.TrainConfig` / :class:`~coopipe.encode.EncodeOptions`.

Why a string: the shell scripts always took them that way, and a sweep forwards them to every run unchanged.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from coopipe.errors import ParamsError

# option name (without --) -> (field, value for a flag) or field
TRAIN_ALIASES: dict[str, Any] = {"bf16": ("autocast_bf16", True), "epochs": "max_epoch"}
ENCODE_ALIASES: dict[str, Any] = {"workers": "num_workers"}


def _convert(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        raise TypeError("a flag takes no value")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if default is None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def parse_extra_args(text: str | None, target: type, aliases: dict[str, Any], what: str) -> dict[str, Any]:
    """``--name value`` / ``--flag`` / ``--no-flag`` tokens -> {field: value} for dataclass ``target``."""
    defaults = {f.name: f.default for f in dataclasses.fields(target)}
    tokens = shlex.split(text or "")
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ParamsError(f"{what}: expected an option, got {token!r}")
        name = token[2:]
        alias = aliases.get(name, name.replace("-", "_"))
        if isinstance(alias, tuple):
            out[alias[0]] = alias[1]
            i += 1
            continue
        negated = alias.startswith("no_") and isinstance(defaults.get(alias[3:]), bool)
        field = alias[3:] if negated else alias
        if field not in defaults:
            raise ParamsError(f"{what}: unknown option {token!r}; known: {', '.join(sorted(defaults))}")
        if isinstance(defaults[field], bool):
            out[field] = not negated
            i += 1
            continue
        if i + 1 >= len(tokens):
            raise ParamsError(f"{what}: option {token!r} needs a value")
        try:
            out[field] = _convert(tokens[i + 1], defaults[field])
        except (TypeError, ValueError) as exc:
            raise ParamsError(f"{what}: bad value {tokens[i + 1]!r} for {token}: {exc}") from None
        i += 2
    return out


def train_args(text: str | None) -> dict[str, Any]:
    from coopipe.train_config import TrainConfig

    return parse_extra_args(text, TrainConfig, TRAIN_ALIASES, "--train-args")


def encode_args(text: str | None) -> dict[str, Any]:
    from coopipe.encode import EncodeOptions

    return parse_extra_args(text, EncodeOptions, ENCODE_ALIASES, "--encode-args")
