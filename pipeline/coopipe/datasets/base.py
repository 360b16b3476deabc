"""The dataset model every adapter produces, and the registry that finds adapters by name."""

from __future__ import annotations

import dataclasses

import difflib
import hashlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coopipe.errors import DatasetError, MissingFileError, UnknownDatasetError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split: image paths relative to :attr:`Dataset.image_root`, and integer labels."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"split has {len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)


LABEL_KINDS = ("class", "ordinal")

@dataclass(frozen=True)
class Dataset:
    """A classification dataset: where its images are, its splits, class names and zero-shot prompt.

    ``name`` is the registry name (plus a qualifier for user datasets, e.g. ``imagefolder-pets``); it is part
    of store paths, so it must be file-name safe. ``label_kind``: ``class`` (CoOp's datasets: K-shot draws need K
    images of every class) or ``ordinal`` (ages: the labels are ordered ranks, a rank with fewer than K images keeps
    them all, and evaluation adds the age metrics).
    """

    name: str
    image_root: Path
    classnames: tuple[str, ...]
    template: str
    splits: dict[str, Split] = field(default_factory=dict)
    source: str = ""  # e.g. the split file used, for error messages and provenance
    label_kind: str = "class"  # or "ordinal"
    options: dict[str, Any] = field(default_factory=dict)  # the builder options it was built with (provenance)

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise DatasetError(f"dataset {self.name}: label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Split:
        if name not in self.splits or len(self.splits[name]) == 0:
            have = ", ".join(k for k, v in self.splits.items() if len(v)) or "none"
            raise DatasetError(
                f"dataset {self.name} has no {name!r} split (it has: {have}); check {self.source or self.image_root}"
            )
        return self.splits[name]

    def file_list_hash(self, split: str) -> str:
        """sha256 over the split's (path, label) list and the class names: the dataset's identity in stores."""
        digest = hashlib.sha256()
        for name in self.classnames:
            digest.update(f"class\t{name}\n".encode("utf-8", "surrogateescape"))
        data = self.split(split)
        for path, label in zip(data.paths, data.labels):
            digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))  # non-UTF-8 names too
        return digest.hexdigest()

    def prompts(self) -> list[str]:
        """The hand-crafted zero-shot prompt filled with each class name."""
        return [self.template.format(name) for name in self.classnames]


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: how to build a dataset from a data root, and the label kind of what it builds."""

    name: str
    description: str
    builder: Callable[..., Dataset]
    label_kind: str = "class"  # the built datasets' (Dataset.label_kind), known without the images


class DatasetRegistry:
    """Name -> adapter. Built explicitly (no import side effects): see :func:`default_registry`.

    Names are case-insensitive; aliases (e.g. CoOp's ``EuroSAT``, ``OxfordPets``) resolve to one registered name
    and are not listed by :meth:`names`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, DatasetInfo] = {}
        self._aliases: dict[str, str] = {}  # lower-case alias -> lower-case registered name

    def register(
        self, name: str, builder: Callable[..., Dataset], description: str, *, aliases: Iterable[str] = (),
        label_kind: str = "class",
    ) -> None:
        key = name.lower()
        if key in self._entries or key in self._aliases:
            raise ValueError(f"dataset {name!r} registered twice")
        if label_kind not in LABEL_KINDS:
            raise ValueError(f"dataset {name!r}: label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
        self._entries[key] = DatasetInfo(name, description, builder, label_kind)
        for alias in aliases:
            self.add_alias(alias, name)

    def add_alias(self, alias: str, name: str) -> None:
        """Let ``alias`` (case-insensitive) stand for the registered dataset ``name``."""
        key, target = alias.lower(), name.lower()
        if target not in self._entries:
            raise ValueError(f"cannot alias {alias!r} to unregistered dataset {name!r}")
        if key == target:
            return
        if key in self._entries or self._aliases.get(key, target) != target:
            raise ValueError(f"alias {alias!r} already names another dataset")
        self._aliases[key] = target

    def names(self) -> list[str]:
        return [info.name for info in self._entries.values()]

    def label_kind(self, built_name: str) -> str:
        """The label kind of a built dataset by the name stores and run records carry: a registered name or alias,
        or one with a qualifier (``agemanifest-faces``, ``imagefolder-pets``); ``class`` for a name no adapter
        registered (a store written directly, as the tests do).

        Why by name: the label kind is not in a store's provenance (adding it would change every store's key, and
        stores encoded before would no longer be found), so a job that holds only a store or a checkpoint asks the
        adapter that built it."""
        key = built_name.lower()
        while True:
            entry = self._entries.get(self._aliases.get(key, key))
            if entry is not None:
                return entry.label_kind
            if "-" not in key:
                return "class"
            key = key.rpartition("-")[0]

    def infos(self) -> list[DatasetInfo]:
        return list(self._entries.values())

    def info(self, name: str) -> DatasetInfo:
        """The entry for a registered name or alias; :class:`UnknownDatasetError` (listing the known ones) if none."""
        key = name.lower()
        key = self._aliases.get(key, key)
        if key not in self._entries:
            close = difflib.get_close_matches(key, [*self._entries, *self._aliases], n=1)
            hint = f" (did you mean {self._entries[self._aliases.get(close[0], close[0])].name!r}?)" if close else ""
            raise UnknownDatasetError(
                f"unknown dataset {name!r}{hint}; known: {', '.join(self.names())} (see `coopipe datasets`)"
            )
        return self._entries[key]

    def resolve(self, name: str) -> str:
        """The registered name that ``name`` (any case, or an alias) stands for."""
        return self.info(name).name

    def build(self, name: str, data_root: str | Path, **options: Any) -> Dataset:
        info = self.info(name)
        _check_options(info, options)
        root = Path(data_root).expanduser()
        if not root.exists():  # say so, rather than "split file missing" somewhere below it
            raise MissingFileError(f"data root {root} does not exist (dataset {info.name} expects: {info.description})")
        return dataclasses.replace(info.builder(root, **options), options=dict(options))


def parse_dataset_options(items: Sequence[str]) -> dict[str, Any]:
    """``["min_age=1", "max_age=116", "split_file=s.json"]`` -> options for a dataset builder (integers, numbers,
    true/false and text), as the CLI and the sweep take them (``--dataset-option KEY=VALUE``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DatasetError(f"dataset option {item!r} is not KEY=VALUE (e.g. max_age=116)")
        value: Any = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                pass
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        options[key.strip()] = value
    return options


def _check_options(info: DatasetInfo, options: dict[str, Any]) -> None:
    """Turn an option the builder does not take into a clear :class:`DatasetError` (not a ``TypeError``)."""
    params = list(inspect.signature(info.builder).parameters.values())[1:]  # the first one is data_root
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"dataset {info.name} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    for p in params:
        if p.name in options and not _fits(options[p.name], str(p.annotation)):
            raise DatasetError(f"dataset {info.name}: option {p.name} must be {p.annotation}, got "
                               f"{options[p.name]!r} (--dataset-option {p.name}=... or params data.options)")


def _fits(value: Any, annotation: str) -> bool:
    """Whether ``value`` has a type the annotation names (int, float, bool, str, Path, None; others pass): a value
    of another type failed inside the builder with a bare ``TypeError`` or ``invalid literal for int()``."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int) and ("int" in kinds or "float" in kinds):
        return True
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str | Path):
        return "str" in kinds or ("Path" in kinds and isinstance(value, Path))
    return not {"int", "float", "bool", "str", "Path"} >= set(kinds) - {"None"}
