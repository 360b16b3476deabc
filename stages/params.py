"""params.yaml, loaded once into the library's config dataclasses (the only place that knows the file's layout).

Every section maps onto a dataclass whose defaults are the library's (:mod:`coopipe.config`,
:class:`coopipe.encode.EncodeOptions`, :class:`coopipe.train_config.TrainConfig` and the registered methods'
options), so a key left out of params.yaml
takes the same value as the command line would; an unknown key is an error naming the known ones.
Stage scripts import this module as ``params`` (it sits beside them) and pass typed values to the library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from coopipe.config import EncodeConfig, FewShotConfig, InterpretConfig, ModelSpec, PathsConfig, ReportConfig
from coopipe.encode import EncodeOptions
from coopipe.errors import ParamsError
from coopipe.json_records import fields_of, read_text
from coopipe.train_config import train_option_names

T = TypeVar("T")

# TrainConfig fields that params.yaml does not set: the seed comes from the stage's matrix item.
TRAIN_NOT_PARAMS = ("seed",)


@dataclass(frozen=True)
class DataParams:
    dataset: str = "eurosat"
    root: str = "data/sample"  # the EuroSAT sample shipped in the repository (data/sample/README.md)
    options: dict[str, Any] = field(default_factory=dict)  # the dataset builder's options (min_age, max_age, ...)


@dataclass(frozen=True)
class Params:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataParams = field(default_factory=DataParams)
    model: ModelSpec = field(default_factory=ModelSpec)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    encode_options: EncodeOptions = field(default_factory=EncodeOptions)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (max_epoch None: by shots)
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`coopipe.jobs.encode.run_encode` from the ``encode`` section."""
        return {**dataclasses.asdict(self.encode), "options": self.encode_options}

    def train_overrides(self) -> dict[str, Any]:
        """The ``train`` section as :class:`TrainConfig` overrides (``None`` values keep the protocol's)."""
        return {k: v for k, v in self.train.items() if v is not None}


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _values(section: str, raw: Any, known: dict[str, dataclasses.Field[Any]] | set[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section '{section}' must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - set(known)
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {', '.join(sorted(unknown))} in '{section}'; known: {', '.join(sorted(known))}"
        )
    values = {}
    for key, value in raw.items():
        default = known[key].default if isinstance(known, dict) else None
        values[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return values


def _build(cls: type[T], section: str, raw: Any) -> T:
    try:
        return cls(**_values(section, raw, _fields(cls)))
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: section '{section}': {exc}") from exc


def train_keys() -> set[str]:
    """The keys of params.yaml's ``train`` section: TrainConfig's fields and the registered methods' options (``method``
    names a method or a method label such as ``rank_b5``), less those set per stage."""
    return train_option_names() - set(TRAIN_NOT_PARAMS)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"no params file at {path}; run from the project root or pass --params")
    fix = "fix that field (see the params.yaml of the repository for the expected shapes)"
    text = read_text(path, what="params file", fix=fix, error=ParamsError)
    try:
        raw = yaml.safe_load(text) or {}
    except (yaml.YAMLError, RecursionError) as exc:
        raise ParamsError(f"params file {path} is not readable YAML ({str(exc).splitlines()[0]}); {fix}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {path} must hold sections (a mapping), got a {type(raw).__name__}; {fix}")
    _refuse_nul(raw, path)
    with fields_of(path, what="params file", fix=fix, error=ParamsError):
        sections = {"paths", "data", "model", "encode", "fewshot", "train", "interpret", "report"}
        unknown = set(raw) - sections
        if unknown:
            raise ParamsError(f"params.yaml: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(sections))}")
        encode_raw = dict(raw.get("encode") or {})
        option_keys = set(_fields(EncodeOptions))
        options = {k: encode_raw.pop(k) for k in list(encode_raw) if k in option_keys}
        train = _values("train", raw.get("train"), train_keys())
        return Params(
            paths=_build(PathsConfig, "paths", raw.get("paths")),
            data=_build(DataParams, "data", raw.get("data")),
            model=_build(ModelSpec, "model", raw.get("model")),
            encode=_build(EncodeConfig, "encode", encode_raw),
            encode_options=_build(EncodeOptions, "encode", options),
            fewshot=_build(FewShotConfig, "fewshot", raw.get("fewshot")),
            train=train,
            interpret=_build(InterpretConfig, "interpret", raw.get("interpret")),
            report=_build(ReportConfig, "report", raw.get("report")),
        )


def _refuse_nul(node: Any, path: Path, where: str = "") -> None:
    """A value holding a NUL byte (YAML's ``"\\0"``) names its field: as a path or name it fails every os call."""
    if isinstance(node, str) and "\0" in node:
        raise ParamsError(f"params file {path}: {where or 'a value'} holds a NUL byte, which no path or name can hold")
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        _refuse_nul(value, path, f"{where}.{key}" if where else str(key))
