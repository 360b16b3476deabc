"""Validation of a prompt checkpoint on load: the record against a schema, the tensors against what it implies.

Why: ``prompt.json`` and ``prompt.safetensors`` are files people copy, edit and half-write. Read without checks, a
``history`` that is an object, a momentum buffer of another shape or a generator state of floats surfaced as an
``AttributeError``, ``TypeError`` or ``IndexError`` deep inside training or evaluation, and a NaN context whose
classifier was missing was re-exported as a NaN classifier of a run "already complete". Here every field that
readers use is checked for its type, the training config and method record are rebuilt, and the tensors are
checked by name, shape, dtype and finiteness against the method and config the record states (every method: CoOp,
CoCoOp's Meta-Net, rank embeddings), so a damaged checkpoint is one :class:`~coopipe.errors.CheckpointError`
naming the file and the field. The tensor file is bound to the record by its sha256 (checked by the loader).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coopipe.checkpoint_files import OPTIM_PREFIX, PARAM_PREFIX, TENSORS_FILE
from coopipe.config import CLASS_SUBSETS
from coopipe.errors import CheckpointError, ParamsError
from coopipe.methods import MethodSpec, get_method
from coopipe.option_check import check_train_options
from coopipe.selection import check_selection_record
from coopipe.train_config import ADDED_OPTIONS, EpochRecord, TrainConfig

_PER_PARAM_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # SGD's, Adam's: a parameter's shape
_FIX = "delete the run folder and re-train (or restore it from a copy)"

# field -> accepted JSON types; None means the field may be absent or null
_RECORD: dict[str, tuple[tuple[type, ...], bool]] = {
    "model": ((str,), True), "weights": ((str,), True), "classnames": ((list,), True), "variant": ((dict,), True),
    "config": ((dict,), True), "epoch": ((int,), True), "tensors": ((dict,), True), "history": ((list,), False),
    "method": ((dict,), True), "run": ((dict,), False), "stores": ((dict,), False), "params": ((dict,), False),
    "complete": ((bool,), False), "max_epoch": ((int,), False), "embed_dim": ((int,), False),
    "logit_scale": ((int, float), False), "classifier": ((dict,), False), "selection": ((dict,), False),
}


# the run record's fields (RunRecord): each present, of its type or null (unknown)
_RUN_RECORD: dict[str, tuple[type, ...]] = {"dataset": (str,), "shots": (int,), "seed": (int,), "classes": (str,),
                                            "pretrained": (str,), "fewshot_index": (str,)}
# what each built-in method's learner records as its variant (the prompt's shape), for a record missing a field
_VARIANT_KEYS = {"coop": {"n_ctx", "ctx_init", "csc", "class_token_position"},
                 "cocoop": {"n_ctx", "ctx_init", "csc", "class_token_position"},
                 "rank": {"n_ctx", "ctx_init", "n_ranks", "n_base_ranks"}}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a text", int: "a whole number", float: "a number",
               bool: "true or false", type(None): "null"}


def _fail(where: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {where}: {what}; {_FIX}")


RECORD_DIGEST = "record_sha256"


def record_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint record without its own digest field, keys sorted: written with the record, so that a
    plausible value changed afterwards (a weight decay, a batch size: values every schema check accepts, which the
    report would show as the run's setting) is damage, not a different run."""
    payload = {k: v for k, v in meta.items() if k != RECORD_DIGEST}
    text = json.dumps(payload, sort_keys=True, default=str, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_record_digest(meta: Mapping[str, Any], where: Path) -> None:
    """Raise unless the record's digest (when it has one: records written before it have none) matches its content."""
    want = meta.get(RECORD_DIGEST)
    if want is not None and want != record_digest(meta):
        raise _fail(where, "its record was changed after it was written (its record_sha256 differs); restore the "
                           "folder from a copy")


def check_record(meta: Mapping[str, Any], where: Path) -> None:
    """Raise unless ``prompt.json``'s fields have the schema's types and rebuild into a config and a method."""
    for key, (types, required) in _RECORD.items():
        value = meta.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join(_JSON_NAMES[t] for t in types)
            raise _fail(where, f"field {key!r} must be {want}, got {_JSON_NAMES.get(type(value), type(value).__name__)}")
    names = meta["classnames"]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise _fail(where, "field 'classnames' must be a non-empty list of names")
    if meta["epoch"] < 0 or not math.isfinite(float(meta.get("logit_scale") or 0.0)):
        raise _fail(where, "field 'epoch' is negative or 'logit_scale' is not finite")
    file = meta["tensors"].get("file", TENSORS_FILE)
    if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
        raise _fail(where, f"field 'tensors.file' must be a file name in the run folder, got {file!r}")
    if not isinstance(meta["tensors"].get("sha256"), str | None):
        raise _fail(where, "field 'tensors.sha256' must be a text")
    frozen = meta["tensors"].get("frozen")
    if frozen is not None and not (isinstance(frozen, list) and all(isinstance(n, str) for n in frozen)):
        raise _fail(where, "field 'tensors.frozen' must be a list of parameter names")
    try:
        absent = sorted({f.name for f in dataclasses.fields(TrainConfig)} - set(meta["config"]) - set(ADDED_OPTIONS))
        if absent:  # a default would silently replace what the run trained with
            raise _fail(where, f"field 'config' misses {', '.join(absent)}")
        check_train_options({k: v for k, v in meta["config"].items() if k != "method"})
        config = TrainConfig.from_dict(meta["config"])
        MethodSpec.from_dict(meta["method"])
        history = [EpochRecord.from_dict(r) for r in meta.get("history") or []]
    except (ParamsError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise _fail(where, f"its config, method or history record is malformed ({exc})") from exc
    selection = meta.get("selection")  # model selection's kept epoch (coopipe.selection)
    if selection is not None and (problem := check_selection_record(selection, int(meta["config"]["max_epoch"]))):
        raise _fail(where, problem)
    run = meta.get("run")
    if run is not None:
        for key, types in _RUN_RECORD.items():
            value = run.get(key, ...)
            if value is ... or (value is not None and (not isinstance(value, types) or isinstance(value, bool))):
                raise _fail(where, f"field 'run.{key}' is missing or not {_JSON_NAMES[types[0]]}")
        if any(isinstance(run.get(k), int) and run[k] < 0 for k in ("shots", "seed")):
            raise _fail(where, "fields 'run.shots' and 'run.seed' cannot be negative")
        if run.get("classes") not in CLASS_SUBSETS:
            raise _fail(where, f"field 'run.classes' must be one of {', '.join(CLASS_SUBSETS)}, got {run['classes']!r}")
    for role, ref in (meta.get("stores") or {}).items():
        views = ref.get("views") if isinstance(ref, dict) else None
        n_aug = views.get("n_aug", 0) if isinstance(views, dict) else 0
        if not isinstance(ref, dict) or not isinstance(ref.get("views", {}), dict | None) or type(n_aug) is not int:
            raise _fail(where, f"field 'stores.{role}' must be an object whose 'views' is an object with a whole "
                               f"'n_aug'")
    if (run or {}).get("fewshot_index") and not isinstance((meta.get("stores") or {}).get("train"), dict):
        # a run trained by a job from a few-shot index records its train store (its views feed the departures)
        raise _fail(where, "field 'stores' misses the train store the run was trained on")
    variant = meta["variant"]
    if not all(isinstance(v, str | int | None) or (isinstance(v, float) and math.isfinite(v)) for v in variant.values()):
        raise _fail(where, "field 'variant' must hold plain values (names, numbers, true/false)")
    spec_name = meta["method"].get("method", "coop")
    floats = {f.name for f in dataclasses.fields(get_method(spec_name).options) if "float" in str(f.type)}
    if odd := sorted(k for k, v in variant.items() if isinstance(v, float) and k not in floats):
        raise _fail(where, f"field 'variant' holds a fractional {', '.join(odd)}, which the method records as a whole "
                           f"number, a name or true/false")
    if "n_ranks" in variant and variant["n_ranks"] != len(names):
        raise _fail(where, f"its variant has {variant['n_ranks']!r} ranks for {len(names)} classes")
    absent = sorted(_VARIANT_KEYS.get(spec_name, set()) - set(variant))
    if absent:
        raise _fail(where, f"its 'variant' record misses {', '.join(absent)}")
    method = meta["method"]
    differ = sorted(k for k in set(method) & set(meta["variant"]) if method[k] != meta["variant"][k])
    if differ:
        raise _fail(where, f"its 'variant' and 'method' records disagree on {', '.join(differ)}")
    if any(not isinstance(r.epoch, int) or isinstance(r.epoch, bool) for r in history):
        raise _fail(where, "field 'history' holds a record without a whole epoch number")
    for r in history:  # the config's schedule must be the one the history ran (binds lr, warm-up and epochs to it)
        scheduled = config.lr_at(r.epoch - 1)
        if (isinstance(r.lr, bool) or not isinstance(r.lr, int | float)
                or not math.isclose(r.lr, scheduled, rel_tol=1e-9)):
            raise _fail(where, f"its config's learning-rate schedule gives {scheduled:g} at epoch {r.epoch}, its "
                               f"history records {r.lr!r}")
    if run is not None and run.get("seed") is not None and run["seed"] != config.seed:
        raise _fail(where, f"its run record says seed {run['seed']}, its training config seed {config.seed}")
    if meta.get("complete") and meta["epoch"] < config.max_epoch:
        raise _fail(where, f"it says complete at epoch {meta['epoch']} of {config.max_epoch}")


def check_tensors(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """Raise unless the tensors are the ones the record implies: names, shapes, dtypes, finite values.

    Every method stores its learner's parameters as ``param.<name>`` and its optimiser's state as
    ``optim.<name>.<key>``; the context (methods with ``n_ctx``) and OrdinalCLIP's base rank embeddings have the
    shapes their options give."""
    spec = MethodSpec.from_dict(meta["method"])
    n_cls = len(meta["classnames"])
    unknown = sorted(n for n in tensors if n != "generator_state" and not n.startswith((PARAM_PREFIX, OPTIM_PREFIX)))
    if unknown:
        raise _fail(where, f"unexpected tensor(s) {', '.join(unknown[:3])}")
    for name, t in tensors.items():
        if name == "generator_state":
            continue
        if not t.dtype.is_floating_point:
            raise _fail(where, f"tensor {name} is {t.dtype}, not floating point")
        if name.startswith(PARAM_PREFIX) and t.dtype not in (torch.float32, torch.float64):  # the model's dtype
            raise _fail(where, f"tensor {name} is {t.dtype}, not float32 (or float64, the exactness tests' dtype)")
        if not bool(torch.isfinite(t).all()):
            raise _fail(where, f"tensor {name} holds NaN/inf (its training diverged; re-train with a lower --lr)")
    params = {n[len(PARAM_PREFIX):]: t for n, t in tensors.items() if n.startswith(PARAM_PREFIX)}
    ctx = params.get("ctx")
    n_ctx = getattr(spec.options, "n_ctx", None)
    if n_ctx is not None:
        csc = bool(getattr(spec.options, "csc", False))
        want_ndim = 3 if csc else 2
        if ctx is None or ctx.ndim != want_ndim or ctx.shape[-2] != n_ctx or (csc and ctx.shape[0] != n_cls):
            shape = "(n_cls, n_ctx, width)" if csc else "(n_ctx, width)"
            raise _fail(where, f"tensor param.ctx has shape {None if ctx is None else tuple(ctx.shape)}, the record "
                               f"implies {shape} with n_ctx={n_ctx}" + (f", n_cls={n_cls}" if csc else ""))
    n_base = getattr(spec.options, "n_base_ranks", None)
    if n_base is not None and ctx is not None:
        ranks = params.get("rank_embeds")
        if ranks is None or tuple(ranks.shape) != (n_base, int(ctx.shape[-1])):
            raise _fail(where, f"rank embeddings must have shape ({n_base}, {int(ctx.shape[-1])}), got "
                               f"{None if ranks is None else tuple(ranks.shape)}")
    if spec.image_conditional and len(params) < 2:
        raise _fail(where, f"a {spec.label()} checkpoint holds no Meta-Net tensors")
    _check_resume_state(meta, tensors, params, where)


def _check_resume_state(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                        params: Mapping[str, torch.Tensor], where: Path) -> None:
    """Per-parameter optimiser state matches its parameter (and none is missing once training stepped); a sound
    generator state."""
    stateful: dict[str, set[str]] = {}
    for name, buffer in tensors.items():
        if not name.startswith(OPTIM_PREFIX):
            continue
        param_name, _, key = name[len(OPTIM_PREFIX):].rpartition(".")
        param = params.get(param_name)
        if param is None:
            raise _fail(where, f"tensor {name} has no parameter {PARAM_PREFIX}{param_name}")
        if key in _PER_PARAM_STATE and buffer.shape != param.shape:
            raise _fail(where, f"tensor {name} has shape {tuple(buffer.shape)}, its parameter {tuple(param.shape)}")
        stateful.setdefault(param_name, set()).add(key)
    state = tensors.get("generator_state")
    resume = bool(meta["tensors"].get("resume", state is not None))
    if not resume:
        return
    if state is None:
        raise _fail(where, "it records resume state but holds no generator_state")
    want = torch.Generator().get_state()
    if state.dtype != want.dtype or state.shape != want.shape:
        raise _fail(where, f"generator_state is {state.dtype} {tuple(state.shape)}, a generator's is "
                           f"{want.dtype} {tuple(want.shape)}")
    if meta["epoch"] < 1 or meta.get("complete"):
        return
    keys = set().union(*stateful.values()) if stateful else set()
    if not keys and float((meta.get("config") or {}).get("momentum") or 0) > 0:
        keys = {"momentum_buffer"}  # SGD with momentum has stepped: every parameter has its buffer
    frozen = set(meta["tensors"].get("frozen") or ())  # computed from the data, never optimised: no state
    missing = [f"{OPTIM_PREFIX}{p}.{k}" for p in params if p not in frozen for k in sorted(keys)
               if k not in stateful.get(p, set())]
    if missing:
        raise _fail(where, f"it resumes after epoch {meta['epoch']} but misses optimiser tensor(s) "
                           f"{', '.join(missing[:3])} (training would go on from a fresh momentum)")

