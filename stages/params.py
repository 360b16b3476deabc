"""params.yaml, loaded once into typed dataclasses (the only place that knows the file's layout).

Stage scripts call :func:`load_params` and pass plain values to library functions; the library never sees
this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from coopipe.errors import ParamsError

T = TypeVar("T")


@dataclass(frozen=True)
class PathsParams:
    cache: str = "cache"
    runs: str = "runs"


@dataclass(frozen=True)
class DataParams:
    dataset: str = "eurosat"
    root: str = "data"


@dataclass(frozen=True)
class ModelParams:
    name: str = "RN50"
    pretrained: str = "openai"


@dataclass(frozen=True)
class EncodeParams:
    views: int = 16
    crop_scale: tuple[float, float] = (0.08, 1.0)
    aug_seed: int = 0
    dtype: str = "float16"
    precision: str = "bf16"
    batch_size: int = 64
    num_workers: int = 1
    chunk_rows: int = 256
    on_bad_image: str = "fail"
    device: str = "cpu"
    scheduler: str | None = None


@dataclass(frozen=True)
class FewShotParams:
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class Params:
    paths: PathsParams = field(default_factory=PathsParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    encode: EncodeParams = field(default_factory=EncodeParams)
    fewshot: FewShotParams = field(default_factory=FewShotParams)
    extra: dict[str, Any] = field(default_factory=dict)  # sections owned by later stages (train, evaluate, ...)


def _build(cls: type[T], section: str, raw: Any) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section '{section}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {', '.join(sorted(unknown))} in '{section}'; known: {', '.join(fields)}"
        )
    values = {}
    for key, value in raw.items():
        default = fields[key].default
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"no params file at {path}; run from the project root or pass --params")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"paths": PathsParams, "data": DataParams, "model": ModelParams, "encode": EncodeParams, "fewshot": FewShotParams}
    sections = {name: _build(cls, name, raw.get(name)) for name, cls in known.items()}
    extra = {k: v for k, v in raw.items() if k not in known}
    return Params(**sections, extra=extra)  # type: ignore[arg-type]
