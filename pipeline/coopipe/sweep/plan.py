"""The sweep plan: every run of a grid as a typed task with its run folder, result files and a cost estimate.

A run folder is the unit of idempotence and locking: a task is finished when all its ``done_files`` exist, and
while it runs it holds ``flock`` on ``<run_dir>.lock`` (see :mod:`coopipe.sweep.tasks`). Folders are the ones the
shell scripts always used, so finished grids of earlier versions are recognised:

- CoOp: ``<runs>/<dataset>/<method label>/shots<K>_seed<S>/metrics.json``;
- base-to-new: ``<runs>/<dataset>/base2new/<method label>/shots<K>_seed<S>/metrics_{base,new}.json`` and
  ``<runs>/<dataset>/base2new/zeroshot/metrics_{base,new}.json``;
- baselines are methods (:mod:`coopipe.methods.zeroshot`, :mod:`coopipe.methods.probes`) in the same layout; zero-shot
  CLIP reads no training image, so it has one run per dataset: ``<runs>/<dataset>/zeroshot[_ensemble]/metrics.json``
  and ``<runs>/<dataset>/base2new/zeroshot/metrics_{base,new}.json``; ``--linear-probe`` and ``--ridge`` (age
  datasets) add ``<runs>/<dataset>/{linear_probe,ridge}/shots<K>_seed<S>/``;
- transfer: ``<source run>/transfer/<target>/metrics.json`` (phase 1: after the source runs).

Tasks are ordered longest first (CoOp, most shots first), so the cheap ones fill the workers at the end.

Age datasets (:func:`~coopipe.datasets.is_age_dataset`: those whose adapter declares ordinal labels, ``utkface``,
``morph``, ``agemanifest-*``) get their own defaults: without ``methods`` the grid runs OrdinalCLIP's comparison
(:data:`AGE_METHODS`: its CoOp row ``ordcoop``, CoCoOp and the rank prompts), zero-shot runs both the age prompt and
prompt ensembling, and ``ridge`` adds the ridge-regression probe beside the (rank) linear probe.

Base-to-new without ``methods`` trains :data:`BASE2NEW_METHODS`: the CoOp row of CoCoOp's base-to-new table, CoOp's
``vit_b16_ctxv1`` config (M = 4 from "a photo of a"; ``KaiyangZhou/CoOp: configs/trainers/CoOp/vit_b16_ctxv1.yaml``),
not CoOp's own default (M = 16, random init); a user's ``methods`` replace it.
"""

from __future__ import annotations

import json

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coopipe.config import EncodeConfig, FewShotConfig, ModelSpec, PathsConfig
from coopipe.datasets import is_age_dataset
from coopipe.errors import CoopipeError, DatasetError, ParamsError
from coopipe.lookup import run_name
from coopipe.methods import MethodSpec, epochs_for, get_method, method_names
from coopipe.methods.rank import ORDINALCLIP_INIT
from coopipe.option_check import check_train_options
from coopipe.prompt import CLASS_TOKEN_POSITIONS
from coopipe.train_config import TrainConfig
from coopipe.safe_names import safe_name

logger = logging.getLogger(__name__)

PAPER_SHOTS = (1, 2, 4, 8, 16)
INIT_WORDS = "a photo of a"  # the ``init`` variant token
AGE_INIT_WORDS = ORDINALCLIP_INIT  # the ``age`` variant token: CoOp from OrdinalCLIP's words, rank names frozen
AGE_METHODS = (  # an age dataset's default methods: OrdinalCLIP's table (its CoOp row, rank prompts) and CoCoOp
    MethodSpec("ordcoop"),
    MethodSpec("cocoop"),
    MethodSpec("rank"),
)
BASE2NEW_METHODS = (MethodSpec.of("coop", ctx_init=INIT_WORDS),)  # CoCoOp's table: CoOp vit_b16_ctxv1
ALL_METHODS = "all"  # ``--methods all``: every registered method that suits the dataset (registered_methods)
ZEROSHOT, LINEAR_PROBE, RIDGE = "zeroshot", "linear_probe", "ridge"  # the baselines' methods (coopipe.methods)
BASELINES = (ZEROSHOT, LINEAR_PROBE, RIDGE)  # asked by their sweep flags


@dataclass(frozen=True)
class RunSettings:
    """What every task of one sweep shares: where the stores are and which model and training options."""

    cache: str = PathsConfig.cache
    model: str = ModelSpec.name
    pretrained: str = ModelSpec.pretrained
    device: str = "cpu"
    epochs: int | None = None
    train_options: Mapping[str, Any] = field(default_factory=dict)
    ensemble: bool = False


@dataclass(frozen=True)
class RunTask:
    """One run: a run folder, the files that mark it finished, and what to compute there."""

    kind: str  # coop (a run of a method on all classes) | base2new (on the base half, evaluated on both) | transfer
    dataset: str  # the dataset's cache name (for transfer: the source)
    run_dir: str
    label: str
    done_files: tuple[str, ...]
    cost: float
    method: MethodSpec | None = None
    shots: int = 0
    seed: int | None = None
    target: str | None = None  # transfer: the dataset evaluated on
    phase: int = 0  # 1: needs a phase-0 run's result (transfer)

    @property
    def needs(self) -> str:
        """The dataset whose stores this task reads (encoded before it runs)."""
        return self.target if self.kind == "transfer" and self.target else self.dataset

    @property
    def reads_fewshot(self) -> bool:
        """Whether the task needs the few-shot train/val stores (a training run of a method that reads images)."""
        return self.kind in ("coop", "base2new") and self.method is not None and self.method.definition.fewshot

    def finished(self) -> bool:
        """Every done file exists and none is a metrics file marked incomplete (``eval --allow-incomplete``)."""
        return all(Path(f).exists() and not marked_incomplete(Path(f)) for f in self.done_files)


def marked_incomplete(path: Path) -> bool:
    """A JSON done file that is unreadable or says ``"incomplete": true``: not a finished result."""
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # truncated (a full disk at the wrong moment): the run is done again
    return isinstance(data, dict) and bool(data.get("incomplete", False))


@dataclass(frozen=True)
class EncodeTask:
    """One ``run_encode`` call for a dataset: every split, shot and seed of the grid at once."""

    dataset: str  # the registry name (``eurosat``, ``imagefolder``)
    name: str  # the cache name (``imagefolder-<folder>``)
    data_root: str
    splits: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    views: int
    augment: str = EncodeConfig.augment  # coopipe.views.AUGMENTATIONS
    options: Mapping[str, Any] = field(default_factory=dict)  # EncodeOptions fields (batch_size, num_workers...)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)  # the dataset builder's (min_age, max_age...)


@dataclass(frozen=True)
class SweepPlan:
    settings: RunSettings
    runs_dir: str
    encodes: tuple[EncodeTask, ...]
    tasks: tuple[RunTask, ...]


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep (defaults when ``methods`` is None: CoOp's few-shot grid with the paper's default variant,
    :data:`AGE_METHODS` for an age dataset, :data:`BASE2NEW_METHODS` for base-to-new)."""

    datasets: tuple[str, ...]
    data_root: str | None = None
    methods: tuple[MethodSpec, ...] | None = None
    all_methods: bool = False  # every registered method (registered_methods) before ``methods``
    shots: tuple[int, ...] = FewShotConfig.shots
    seeds: tuple[int, ...] = FewShotConfig.seeds
    fewshot: bool = True
    zeroshot: bool = False  # with base2new alone: zero-shot CLIP on the base and new halves
    linear_probe: bool = False
    ridge: bool = False  # age datasets: the ridge-regression probe on the few-shot features
    base2new: bool = False
    targets: tuple[str, ...] = ()
    skip_missing: bool = False
    views: int = EncodeConfig.views
    augment: str = EncodeConfig.augment
    encode_shots: tuple[int, ...] = ()
    encode: bool = True
    encode_options: Mapping[str, Any] = field(default_factory=dict)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)  # every dataset's builder (--dataset-option)
    runs: str | None = None
    settings: RunSettings = field(default_factory=RunSettings)


def registered_methods(dataset: str) -> tuple[MethodSpec, ...]:
    """Every registered method in its paper setting that can train on ``dataset``, in registration order: a method
    that needs ordered labels (rank prompts) only on an age dataset; the baselines only by their own flags
    (``--zeroshot``, ``--linear-probe``, ``--ridge``: ``--no-zeroshot`` leaves zero-shot out of ``--methods all``).
    Why from the registry: a method added as a module joins every comparison with no list to update."""
    age = is_age_dataset(dataset)
    return tuple(MethodSpec(name) for name in method_names()
                 if (age or not get_method(name).ordered_labels) and name not in BASELINES)


def parse_variant(name: str) -> MethodSpec:
    """A method label (``coop_csc_middle``, see :meth:`MethodSpec.label`) or a script variant name made of tokens
    joined by ``_``: ``coop``, ``csc``, ``end|middle|front``, ``m<N>``, ``init`` (context from "a photo of a"), ``age`` (context from
    "age estimation: the age of the person is", OrdinalCLIP's CoOp baseline)."""
    try:
        return MethodSpec.parse(name)
    except ParamsError:
        pass
    options: dict[str, Any] = {}
    for token in name.split("_"):
        if token in ("", "coop"):
            continue
        if token == "csc":
            options["csc"] = True
        elif token in CLASS_TOKEN_POSITIONS:
            options["class_token_position"] = token
        elif token == "init":
            options["ctx_init"] = INIT_WORDS
        elif token == "age":
            options["ctx_init"] = AGE_INIT_WORDS
        elif token[:1] == "m" and token[1:].isdigit() and int(token[1:]) > 0:
            options["n_ctx"] = int(token[1:])
        else:
            raise ParamsError(f"unknown variant token {token!r} in {name!r} (use coop, csc, end, middle, front, "
                              f"m<N>, init, age, or a method label such as coop_csc_middle)")
    return MethodSpec.of("coop", **options)


def encode_shots_for(shots: Sequence[int]) -> tuple[int, ...]:
    """The grid's shots plus the paper's up to the largest: draws are nested, so every script shares one store."""
    top = max(shots, default=0)
    return tuple(sorted(set(shots) | {k for k in PAPER_SHOTS if k <= top}))


def _cache_names(spec: SweepSpec, names: Sequence[str], sources: set[str]) -> dict[str, str]:
    """Registry name -> cache name; every dataset's files are checked first (one error naming each missing one)."""
    if spec.data_root is None or not spec.encode:
        return {n: n for n in names}
    from coopipe.datasets import load_dataset

    found: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    for name in names:
        try:
            found[name] = load_dataset(name, spec.data_root, **dict(spec.dataset_options)).name
        except CoopipeError as exc:
            missing.append((name, str(exc)))
    fatal = [(n, why) for n, why in missing if n in sources or not spec.skip_missing]
    for n, why in missing:
        if (n, why) not in fatal:
            logger.warning("leaving out target %s, its data is missing: %s", n, why)
    if fatal:
        lines = [f"  {n}{' (source)' if n in sources and spec.targets else ''}: {why}" for n, why in fatal]
        hint = ", or leave missing targets out with --skip-missing or --targets" if spec.targets else ""
        raise DatasetError(
            f"data missing under {spec.data_root} for {len(fatal)} dataset(s):\n" + "\n".join(lines)
            + f"\nPut each into CoOp's $DATA layout under {spec.data_root} (`coopipe datasets` lists the folder each "
            f"one expects){hint}."
        )
    return found


def _check(spec: SweepSpec) -> None:
    problems = []
    if not spec.datasets:
        problems.append("no dataset given (--dataset)")
    if spec.methods is not None and not spec.methods and not spec.all_methods and (
            spec.fewshot or spec.base2new or spec.targets):
        problems.append("no method given (--methods)")
    for m in spec.methods or ():
        if (spec.base2new or spec.targets) and not m.transferable:
            problems.append(f"base-to-new and transfer need a method that can score classes it did not train on: "
                            f"{m.label()} cannot ({m.transfer_refusal()})")
    if any(k < 1 for k in spec.shots) or not spec.seeds:
        problems.append("--shots must be positive integers and --seeds non-empty")
    if spec.settings.epochs is not None and spec.settings.epochs < 1:
        problems.append("--epochs must be a positive integer")
    bad = set(spec.settings.train_options) - ({f.name for f in fields(TrainConfig)} - {"method"})
    if bad:
        problems.append(f"unknown or method training option(s) {sorted(bad)} (give methods by --methods)")
    else:
        try:
            check_train_options({k: v for k, v in spec.settings.train_options.items() if v is not None})
        except ParamsError as exc:
            problems.append(str(exc))
    if spec.encode and spec.data_root is None:
        problems.append("--data-root is required to encode (or pass --no-encode when the cache is ready)")
    if problems:
        raise ParamsError("; ".join(problems))


def _epochs(spec: SweepSpec, shots: int, dataset: str, method: MethodSpec | None = None) -> int:
    paper = method.paper_epochs(shots, dataset) if method is not None else epochs_for(shots, dataset)
    if method is not None and not method.definition.trains:
        return paper  # 0: a training-free method ignores the grid's --epochs
    return spec.settings.epochs or int(spec.settings.train_options.get("max_epoch") or paper)


def warmup_only(settings: RunSettings) -> bool:
    """Whether ``--epochs`` leaves no epoch after the warm-up: then training runs at ``warmup_lr`` (1e-5) only and
    the prompt barely leaves its initialisation (measured: a 1-epoch UTKFace grid gave every CoOp run the same MAE)."""
    warmup = int(settings.train_options.get("warmup_epoch", TrainConfig.warmup_epoch))
    return settings.epochs is not None and warmup > 0 and settings.epochs <= warmup


def _once(tasks: Sequence[RunTask]) -> list[RunTask]:
    """Each run folder once, where it was first asked: a baseline asked by ``--methods all`` and by its flag, or
    zero-shot CLIP (one run per dataset) asked at every shot and seed, runs once."""
    seen: set[str] = set()
    return [t for t in tasks if not (t.run_dir in seen or seen.add(t.run_dir))]  # type: ignore[func-returns-value]


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Every run of ``spec`` (finished ones included: the runner skips them) and the encodes they need."""
    _check(spec)
    if warmup_only(spec.settings) and (spec.fewshot or spec.base2new):
        logger.warning("--epochs %d leaves no epoch after the warm-up: the prompts train at the warm-up learning "
                       "rate only and stay near their initialisation; give more epochs or --train-args "
                       "'--warmup-epoch 0'", spec.settings.epochs)
    runs_dir = spec.runs or (f"{PathsConfig.runs}-ep{spec.settings.epochs}" if spec.settings.epochs else PathsConfig.runs)
    targets = tuple(t for t in spec.targets if t not in spec.datasets)
    names = _cache_names(spec, [*spec.datasets, *targets], set(spec.datasets))
    targets = tuple(t for t in targets if t in names)
    if spec.targets and not targets:
        raise DatasetError("no target dataset left to evaluate on")
    runs = Path(runs_dir)
    tasks: list[RunTask] = []

    def coop_task(kind: str, ds: str, m: MethodSpec, k: int, s: int) -> RunTask:
        label = safe_name(m.label())  # the run folder: no ':' or other unsafe characters of the init words
        folder = runs / ds / "base2new" / label if kind == "base2new" else runs / ds / label
        done = ("metrics_base.json", "metrics_new.json") if kind == "base2new" else ("metrics.json",)
        what = f"{m.label()} {ds} base/new" if kind == "base2new" else f"{m.label()} {ds}"
        if not m.definition.fewshot:  # reads no training image (zero-shot CLIP): one run whatever the shots and seeds
            return RunTask(kind, ds, str(folder), what, tuple(str(folder / f) for f in done), 1.0 + len(done) - 1,
                           method=m)
        run = folder / run_name(k, s)
        if kind == "base2new":
            what = f"{m.label()} {ds} base2new"
        per_step = 8.0 if m.image_conditional else 1.0  # image-conditional (CoCoOp): a K-class text pass per image, not per batch
        cost = (_epochs(spec, k, ds, m) * k * per_step * (0.5 if kind == "base2new" else 1.0) + 20
                if m.definition.trains else 5.0 + math.log2(k))  # a closed-form fit: seconds, fewer with few shots
        return RunTask(kind, ds, str(run), f"{what} {k}-shot seed {s}", tuple(str(run / f) for f in done), cost,
                       method=m, shots=k, seed=s)

    for registry_name in spec.datasets:
        ds = names[registry_name]
        age = is_age_dataset(ds)
        if spec.ridge and not age:
            raise ParamsError(f"--ridge needs an age dataset (utkface, morph, agemanifest); {ds} has class labels")
        methods = spec.methods if spec.methods is not None else (AGE_METHODS if age else (MethodSpec(),))
        if spec.all_methods:
            methods = (*registered_methods(ds), *(m for m in methods if m not in registered_methods(ds)))
        shots = sorted(set(spec.shots), reverse=True)
        grid = [(m, k, s) for m in methods for k in shots for s in spec.seeds]
        if spec.all_methods and (spec.base2new or spec.targets):
            for m in {m for m, _, _ in grid if not m.transferable}:
                logger.info("%s cannot score classes it did not train on: left out of base-to-new and transfer", m)
        other_classes = [(m, k, s) for m, k, s in grid if m.transferable and m.definition.fewshot]
        if spec.fewshot:
            tasks += [coop_task("coop", ds, m, k, s) for m, k, s in grid]
        if spec.base2new and spec.methods is None and not spec.all_methods:  # CoCoOp's table's CoOp row
            tasks += [coop_task("base2new", ds, m, k, s) for m in BASE2NEW_METHODS for k in shots for s in spec.seeds]
        elif spec.base2new:
            tasks += [coop_task("base2new", ds, m, k, s) for m, k, s in other_classes]
        if spec.base2new and spec.zeroshot:
            tasks.append(coop_task("base2new", ds, MethodSpec(ZEROSHOT), 0, 0))
        probes = [MethodSpec(name) for name, wanted in ((LINEAR_PROBE, spec.linear_probe), (RIDGE, spec.ridge)) if wanted]
        tasks += [coop_task("coop", ds, m, k, s) for m in probes for k in shots for s in spec.seeds]
        full_zeroshot = spec.zeroshot and (spec.fewshot or spec.linear_probe or spec.ridge or not spec.base2new)
        zeroshot_sets = [ds, *(names[t] for t in targets)] if full_zeroshot else []
        for name in zeroshot_sets:
            # an age dataset gets both (the ensemble of age templates costs one more text pass)
            for ensemble in (False, True) if is_age_dataset(name) else (spec.settings.ensemble,):
                tasks.append(coop_task("coop", name, MethodSpec.of(ZEROSHOT, ensemble=ensemble), 0, 0))
        for m, k, s in other_classes if targets and spec.fewshot else []:
            source = runs / ds / safe_name(m.label()) / run_name(k, s)
            for t in targets:
                out = source / "transfer" / names[t]
                tasks.append(RunTask("transfer", ds, str(out), f"{m.label()} {ds}->{names[t]} {k}-shot seed {s}",
                                     (str(out / "metrics.json"),), 1.0, method=m, shots=k, seed=s,
                                     target=names[t], phase=1))
    tasks = _once(tasks)
    tasks.sort(key=lambda t: (t.phase, -t.cost))  # stable: longest first within a phase
    encodes = []
    for registry_name in [*spec.datasets, *targets]:
        name = names[registry_name]
        fewshot = any(t.dataset == name and t.reads_fewshot for t in tasks)
        encodes.append(EncodeTask(
            dataset=registry_name, name=name, data_root=str(spec.data_root), splits=("train", "val", "test") if fewshot else ("test",),
            shots=(spec.encode_shots or encode_shots_for(spec.shots)) if fewshot else (),
            seeds=tuple(spec.seeds) if fewshot else (), views=spec.views, augment=spec.augment,
            options=dict(spec.encode_options),
            dataset_options=dict(spec.dataset_options),
        ))
    return SweepPlan(settings=spec.settings, runs_dir=runs_dir, encodes=tuple(encodes) if spec.encode else (),
                     tasks=tuple(tasks))

