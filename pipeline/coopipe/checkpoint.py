"""Prompt checkpoints: a run folder's ``prompt.safetensors`` + ``prompt.json``, written and read.

A checkpoint is a directory::

    prompt.safetensors   every learner parameter by name as ``param.<name>`` (``param.ctx``,
                         ``param.meta_net.linear1.weight``, ...), whatever the method; for resuming also the
                         optimiser's state as ``optim.<name>.<key>`` (SGD: ``optim.ctx.momentum_buffer``) and the
                         data generator's state
    prompt.json          how it was made: model name, weights identity, class names, prompt variant, the cache
                         stores it was trained on (paths + provenance keys), training config and extra params,
                         epoch, history, coopipe / open_clip versions, sha256 of prompt.safetensors

and, once exported, ``classifier.safetensors`` (:mod:`coopipe.classifier`).

Why this way: safetensors holds only tensors (no pickle, safe to load) and the JSON is readable by people and
DVC. Every file is written atomically (:func:`coopipe.atomic.atomic_write`: a temporary file, then ``os.replace``),
and the JSON (written last) records the tensor file's hash, so a reader never sees a half-written or mismatched
pair; while a checkpoint is overwritten, the previous tensor file is kept as ``prompt.safetensors.prev`` so a run
killed between the two writes still resumes from the last consistent state. A loaded record is checked field by
field (:mod:`coopipe.checkpoint_check`); whether it fits a store is :mod:`coopipe.compatibility`; the learner is
rebuilt by :mod:`coopipe.trained_learner`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import coopipe
from coopipe.atomic import atomic_write, write_json
from coopipe.checkpoint_check import (
    RECORD_DIGEST,
    check_record,
    check_record_digest,
    check_tensors,
    record_digest,
)
from coopipe.checkpoint_files import (
    CLASSIFIER_FILE,
    META_FILE,
    OPTIM_PREFIX,
    PARAM_PREFIX,
    PREVIOUS_SUFFIX,
    TENSORS_FILE,
    prefixed,
    read_tensors,
    write_tensors,
)
from coopipe.classifier import Classifier, export_classifier, load_classifier
from coopipe.compatibility import check_compatible
from coopipe.errors import CheckpointError, ParamsError
from coopipe.json_records import fields_of, read_folder_record
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip, open_clip_version, sha256_file
from coopipe.store import FeatureStore, provenance_key
from coopipe.trained_learner import load_learner
from coopipe.train_config import EpochRecord, TrainConfig, TrainResult, TrainState

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "RunRecord",
    "load_checkpoint",
    "save_checkpoint",
    "save_result",
    "store_ref",
]

CHECKPOINT_FORMAT = "coopipe.prompt/2"


def store_ref(store: FeatureStore) -> dict[str, Any]:
    """What a checkpoint records about a store it used: path, provenance key and the identifying fields."""
    prov = store.provenance
    return {
        "path": str(store.path),
        "provenance_key": provenance_key(prov),
        "dataset": prov.get("dataset"),
        "split": prov.get("split"),
        "model": prov.get("model"),
        "weights": prov.get("weights"),
        "views": prov.get("views"),
        "rows": prov.get("rows"),
        "n_classes": len(prov.get("classnames", [])),
    }



# ---------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class RunRecord:
    """What a run was trained for, typed (``prompt.json`` key ``run``); the model, weights, method, class list and
    stores are recorded beside it. ``pretrained`` is how the weights were loaded (an open_clip tag, a local file,
    ``none``), so a reader can load them again; ``fewshot_index`` is the draw's index file."""

    dataset: str | None = None
    shots: int | None = None
    seed: int | None = None
    classes: str = "all"
    pretrained: str | None = None
    fewshot_index: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "run record") -> RunRecord:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: 'run' must be an object, got {type(data).__name__}; re-train")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{where}: malformed 'run' record ({exc}); re-train") from exc


@dataclass
class Checkpoint:
    """A loaded prompt checkpoint."""

    path: Path  # the checkpoint directory
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def learner_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor of the learner by name, for ``restore_learner``."""
        return prefixed(self.tensors, PARAM_PREFIX)

    @property
    def ctx(self) -> torch.Tensor:
        """The learned context (prompt methods)."""
        return self.learner_tensors["ctx"]

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def weights(self) -> str:
        return str(self.meta["weights"])

    @property
    def classnames(self) -> list[str]:
        return list(self.meta["classnames"])

    @property
    def variant(self) -> dict[str, Any]:
        return dict(self.meta["variant"])

    @property
    def method(self) -> MethodSpec:
        """The method and its options."""
        raw = self.meta.get("method") or {}
        try:
            return MethodSpec.from_dict(raw)
        except ParamsError as exc:
            raise CheckpointError(f"checkpoint {self.path}: unreadable method record {raw!r} ({exc}); re-train "
                                  f"(or register the method it names before loading it)") from exc

    @property
    def run(self) -> RunRecord:
        """What the run was trained for."""
        return RunRecord.from_dict(self.meta.get("run") or {}, where=f"checkpoint {self.path / META_FILE}")

    @property
    def dataset(self) -> str | None:
        """The dataset the prompt was trained on (its run record, else the stores it records)."""
        if self.run.dataset:
            return self.run.dataset
        for ref in (self.meta.get("stores") or {}).values():
            if isinstance(ref, Mapping) and ref.get("dataset"):
                return str(ref["dataset"])
        return None

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    @property
    def config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(self.meta["config"])
        except ParamsError as exc:
            raise CheckpointError(f"checkpoint {self.path}: unreadable training config ({exc}); re-train") from exc

    @property
    def history(self) -> list[EpochRecord]:
        return [EpochRecord.from_dict(r) for r in self.meta.get("history", [])]

    def train_state(self) -> TrainState:
        """The state to pass to ``train_prompt(resume_state=...)``; needs a checkpoint saved with resume tensors."""
        if "generator_state" not in self.tensors:
            raise CheckpointError(f"checkpoint {self.path} holds no resume state (saved without it); start a new run")
        return TrainState(
            epoch=self.epoch,
            params=self.learner_tensors,
            generator_state=self.tensors["generator_state"],
            optimizer=prefixed(self.tensors, OPTIM_PREFIX),
            history=self.history,
            variant=self.variant,
            frozen=tuple(self.meta["tensors"].get("frozen") or ()),
        )

    def classifier(self) -> Classifier:
        """The run's exported classifier, checked to be the one this checkpoint recorded (same file hash), for its
        classes, model and weights, and finite."""
        path = self.path / CLASSIFIER_FILE
        record = self.meta.get("classifier") or {}
        want = record.get("sha256") if isinstance(record, Mapping) else None
        if want and path.is_file() and sha256_file(path) != want:
            raise CheckpointError(
                f"{path} is not the classifier of run {self.path} (sha256 differs from prompt.json: copied from "
                f"another run or modified); re-run `coopipe train` with the same options to regenerate it"
            )
        clf = load_classifier(path)
        if (clf.model, clf.weights, clf.classnames) != (self.model, self.weights, self.classnames):
            raise CheckpointError(
                f"{path} was exported for {clf.model} ({clf.weights}) and {len(clf.classnames)} classes, run "
                f"{self.path} is {self.model} ({self.weights}) with {len(self.classnames)} classes; re-run "
                f"`coopipe train` with the same options to regenerate it"
            )
        return clf

    def check_clip(self, clip: LoadedClip) -> None:
        """Raise unless ``clip`` is the model and weights the prompt was trained with."""
        if (clip.name, clip.weights_id) != (self.model, self.weights):
            raise CheckpointError(
                f"checkpoint {self.path} was trained with {self.model} ({self.weights}), not {clip.name} "
                f"({clip.weights_id}); load the checkpoint's model and weights"
            )

    def check_store(self, store: FeatureStore) -> None:
        """Raise unless ``store`` holds features of this checkpoint's model, weights and class list."""
        check_compatible(
            what=f"checkpoint {self.path}",
            model=self.model,
            weights=self.weights,
            classnames=self.classnames,
            store=store,
        )

    def check_resumable(self, config: TrainConfig) -> None:
        """Raise unless ``config`` gives the result this checkpoint's config gives (memory-only options such as
        ``class_chunk`` may change)."""
        saved = self.config
        diffs = saved.result_differences(config)
        if diffs:
            shown = ", ".join(f"{k}: {getattr(saved, k)!s} -> {getattr(config, k)!s}" for k in diffs[:4])
            raise CheckpointError(
                f"cannot resume checkpoint {self.path} with another training config ({shown}); use the saved "
                f"config or start a new run in another output folder"
            )

    def text_features(self, clip: LoadedClip, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """The class text features (K, D), CPU float32, of the saved prompt for ``classnames`` (default: its own),
        computed with ``clip``'s text tower and the checkpoint's text-path options."""
        learner = load_learner(self, clip, classnames)
        with torch.no_grad():
            return learner.class_text_features(self.config.text_encoder(clip)).float().cpu()


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    clip: LoadedClip,
    classnames: Sequence[str],
    config: TrainConfig,
    state: TrainState,
    stores: Mapping[str, FeatureStore] | None = None,
    params: Mapping[str, Any] | None = None,
    run: RunRecord | None = None,
    classifier_sha256: str | None = None,
    include_resume: bool = True,
    selection: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``prompt.safetensors`` then ``prompt.json`` into ``directory``; returns the directory.

    ``stores`` maps a role (``train``, ``val``) to the store it came from; ``params`` is any extra record (e.g.
    the pipeline's params.yaml section). ``include_resume`` also saves the momentum buffer and generator state.
    ``selection``: a finished run's model-selection record (:mod:`coopipe.selection`), kept as ``selection``.
    """
    directory = Path(directory)
    # M in tokens (and whatever else only the model knows), as the learner records it: the two records must agree
    config = dataclasses.replace(config, method=config.method.resolve(clip))
    tensor_file = directory / TENSORS_FILE
    previous = tensor_file.with_name(TENSORS_FILE + PREVIOUS_SUFFIX)
    if tensor_file.is_file() and (directory / META_FILE).is_file():
        # keep the tensors the current prompt.json describes until the new JSON is in place: a run killed between
        # the two writes then still loads (see load_checkpoint)
        atomic_write(previous, lambda tmp: shutil.copyfile(tensor_file, tmp))
    tensors = {PARAM_PREFIX + name: t for name, t in state.params.items()}
    if include_resume:
        tensors["generator_state"] = state.generator_state
        tensors.update({OPTIM_PREFIX + key: t for key, t in state.optimizer.items()})
    tensor_path = write_tensors(tensor_file, tensors, {"format": CHECKPOINT_FORMAT})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": clip.name,
        "weights": clip.weights_id,
        "embed_dim": clip.embed_dim,
        "logit_scale": float(clip.model.logit_scale.detach()),
        "classnames": list(classnames),
        "method": config.method.to_dict(),
        "run": (run or RunRecord()).to_dict(),
        "variant": dict(state.variant),
        "stores": {role: store_ref(store) for role, store in (stores or {}).items()},
        "config": config.to_dict(),
        "params": dict(params or {}),
        "epoch": state.epoch,
        "max_epoch": config.max_epoch,
        "complete": state.epoch >= config.max_epoch,
        "history": [r.to_dict() for r in state.history],
        "tensors": {"file": TENSORS_FILE, "sha256": sha256_file(tensor_path), "resume": include_resume,
                    "frozen": list(state.frozen)},
        "classifier": {"file": CLASSIFIER_FILE, "sha256": classifier_sha256} if classifier_sha256 else None,
        "coopipe_version": coopipe.__version__,
        "open_clip_version": open_clip_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if selection is not None:  # model selection: the state's tensors are the kept epoch's
        meta["selection"] = dict(selection)
    meta[RECORD_DIGEST] = record_digest(meta)  # binds every field: a value changed afterwards is damage
    write_json(directory / META_FILE, meta, default=str)
    previous.unlink(missing_ok=True)
    logger.info("saved checkpoint %s (epoch %d/%d)", directory, state.epoch, config.max_epoch)
    return directory


def save_result(
    directory: str | os.PathLike[str],
    result: TrainResult,
    *,
    clip: LoadedClip,
    classnames: Sequence[str],
    config: TrainConfig,
    stores: Mapping[str, FeatureStore] | None = None,
    params: Mapping[str, Any] | None = None,
    run: RunRecord | None = None,
) -> Path:
    """Save a finished run: its exported ``classifier.safetensors``, then the checkpoint that records the
    classifier's hash (so a classifier is bound to its run, and a kill between the two leaves an incomplete
    checkpoint that resumes, never a complete one without its classifier). An image-conditional prompt (CoCoOp)
    has no single classifier: only the checkpoint is written."""
    if result.text_features is None:
        return save_checkpoint(directory, clip=clip, classnames=classnames, config=config, state=result.state,
                               stores=stores, params=params, run=run, selection=result.selection)
    clf = export_classifier(
        Path(directory) / CLASSIFIER_FILE,
        result.text_features,
        classnames=classnames,
        model=clip.name,
        weights=clip.weights_id,
        logit_scale=result.logit_scale,
        source={"checkpoint": str(directory), "epoch": result.state.epoch, "variant": result.variant},
    )
    return save_checkpoint(
        directory, clip=clip, classnames=classnames, config=config, state=result.state, stores=stores, params=params,
        run=run, classifier_sha256=sha256_file(clf), selection=result.selection,
    )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory (or its ``prompt.json``), checking format and the tensor file's hash."""
    directory, meta = read_folder_record(path, META_FILE, missing="no checkpoint there; train first (coopipe train)",
                                         fix="re-train")
    meta_path = directory / META_FILE
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{meta_path} is not a coopipe prompt checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in ("model", "weights", "classnames", "variant", "config", "epoch", "tensors") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata {meta_path} misses {', '.join(missing)}; re-train")
    with fields_of(meta_path, what="checkpoint", fix="delete the run folder and re-train", error=CheckpointError):
        check_record(meta, meta_path)
        tensor_path = directory / str(meta["tensors"].get("file", TENSORS_FILE))
        want = meta["tensors"].get("sha256")
        if want and tensor_path.is_file() and sha256_file(tensor_path) != want:
            previous = tensor_path.with_name(tensor_path.name + PREVIOUS_SUFFIX)
            if previous.is_file() and sha256_file(previous) == want:  # killed between writing tensors and JSON
                logger.warning("checkpoint %s: using %s (the last save was interrupted)", directory, previous.name)
                tensor_path = previous
            else:
                raise CheckpointError(
                    f"{tensor_path} does not match {meta_path} (sha256 differs: written by another run or modified); "
                    f"delete the folder and re-train"
                )
        tensors = read_tensors(tensor_path, "checkpoint tensors")
        if not any(name.startswith(PARAM_PREFIX) for name in tensors):
            raise CheckpointError(f"{tensor_path} holds no learned tensor; re-train")
        check_tensors(meta, tensors, tensor_path)
        check_record_digest(meta, meta_path)  # last: the checks above name what is wrong where they can
    return Checkpoint(path=directory, meta=meta, tensors=tensors)
