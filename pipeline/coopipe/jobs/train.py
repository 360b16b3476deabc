"""Stage `train`: learn a CoOp prompt for one dataset x shots x seed from the cached features.

Reads the few-shot draw (``<cache>/<dataset>/fewshot/...json``, written by the encode stage; drawn here from a
full-split store when absent), the train store with augmented views and the val store, trains with the
reference protocol (``TrainConfig``), checkpoints atomically every few epochs (a killed run resumes from its
last checkpoint when re-run), and writes ``prompt.safetensors`` + ``prompt.json``, the exported
``classifier.safetensors``, ``history.tsv``, the dvclive metrics (``dvclive/``, one step per epoch, for ``dvc plots``;
see :mod:`coopipe.metrics_log`) and ``train.json`` into the run folder.
A finished run with the same config is not trained again. ``classes='base'`` (or ``'new'``) trains on that half
of the classes only (CoCoOp's base-to-new protocol, see :mod:`coopipe.transfer`).

Run by DVC as ``python stages/train.py --shots K --seed S`` (reads params.yaml) and by ``coopipe train``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import ExitStack
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from coopipe.atomic import write_json, write_text
from coopipe.cost import training_cost
from coopipe.departures import warn_single_view
from coopipe.baselines import dataset_template
from coopipe.checkpoint_check import RECORD_DIGEST, record_digest
from coopipe.checkpoint import Checkpoint, RunRecord, load_checkpoint, save_checkpoint, save_result
from coopipe.checkpoint_files import CLASSIFIER_FILE, META_FILE
from coopipe.classifier import export_classifier
from coopipe.errors import CheckpointError, MissingFileError, StoreError, TrainingDivergedError
from coopipe.hardware import check_device
from coopipe.locks import exclusive_lock
from coopipe.option_check import check_interval, check_train_options
from coopipe.ordinal import check_ordered_labels
from coopipe.datasets import is_age_dataset
from coopipe.features import SplitFeatures, read_split, select_store
from coopipe.models import LoadedClip, sha256_file
from coopipe.lookup import fewshot_index_for, fewshot_index_path, resolve_model
from coopipe.methods import MethodSpec
from coopipe.metrics_log import EpochMetricsLog
from coopipe.loop import StackedRun
from coopipe.selection import BestEpoch, selection_record
from coopipe.selection_store import clear_best, load_best, save_best
from coopipe.store import FeatureStore, find_stores
from coopipe.stacked import default_max_stack, train_stacked
from coopipe.train import train_prompt
from coopipe.train_config import EpochRecord, TrainConfig, TrainResult, TrainState, batch_slices
from coopipe.transfer import ClassSubset, check_store_classes

logger = logging.getLogger(__name__)

RUN_LOCK = ".lock"  # in the run folder: one writer at a time
CHECKPOINT_EVERY_S = 30.0  # default: save resume state at most this often (and at the end)


def _history_tsv(records: Sequence[EpochRecord]) -> str:
    lines = ["epoch\tlr\tloss\ttrain_acc\tval_acc\tseconds"]
    for r in records:
        val = "" if r.val_acc is None else f"{r.val_acc:.6f}"
        lines.append(f"{r.epoch}\t{r.lr:.8g}\t{r.loss:.6f}\t{r.train_acc:.6f}\t{val}\t{r.seconds:.4f}")
    return "\n".join(lines) + "\n"


def run_train(
    *,
    cache_dir: str | Path,
    dataset: str,
    shots: int,
    seed: int,
    out_dir: str | Path,
    model: str | None = None,
    pretrained: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    params_record: Mapping[str, Any] | None = None,
    clip: LoadedClip | None = None,
    classes: str = "all",
    checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one CoOp run; returns the run summary written to train.json.

    ``classes``: ``all``, or ``base``/``new`` to train on that half of the (sorted) classes only.
    ``checkpoint_every``: seconds between resume checkpoints (0: after every epoch).
    """
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    # one writer per run folder: a second `coopipe train --out` on the same folder stops at once
    with exclusive_lock(out_dir / RUN_LOCK, f"run {out_dir}"):
        return _train_locked(cache_dir=cache_dir, dataset=dataset, shots=shots, seed=seed, out_dir=out_dir, model=model,
                             pretrained=pretrained, overrides=overrides, device=device, progress=progress,
                             params_record=params_record, clip=clip, classes=classes,
                             checkpoint_every=checkpoint_every)


def run_train_stacked(
    *,
    cache_dir: str | Path,
    dataset: str,
    runs: Sequence[tuple[int, int, str | Path]],
    model: str | None = None,
    pretrained: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    params_record: Mapping[str, Any] | None = None,
    clip: LoadedClip | None = None,
    classes: str = "all",
    checkpoint_every: float = CHECKPOINT_EVERY_S,
    max_stack: int | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_train` for several ``(shots, seed, out_dir)`` runs of one dataset, method and class list, trained
    stacked in one text pass (:func:`coopipe.stacked.train_stacked`, groups of at most ``max_stack``).

    Each run folder is locked, resumed from its own checkpoint, checkpointed and written exactly as by
    :func:`run_train` (the same preparing and saving code); finished runs are skipped. Returns the summaries in order.
    """
    cache_dir = Path(cache_dir)
    clip = clip or resolve_model(cache_dir, dataset, model, pretrained, device)
    common = dict(cache_dir=cache_dir, dataset=dataset, model=model, pretrained=pretrained, overrides=overrides,
                  device=device, progress=progress, params_record=params_record, clip=clip, classes=classes,
                  checkpoint_every=checkpoint_every)
    with ExitStack() as stack:
        prepared: list[_Prepared | dict[str, Any]] = []
        for shots, seed, out_dir in runs:
            stack.enter_context(exclusive_lock(Path(out_dir) / RUN_LOCK, f"run {out_dir}"))
            prepared.append(_prepare(shots=shots, seed=seed, out_dir=Path(out_dir), **common))  # type: ignore[arg-type]
        todo = [item for item in prepared if isinstance(item, _Prepared)]
        for run in todo:
            stack.enter_context(run.bar)
            stack.enter_context(run.metrics)
        results = iter(train_stacked([run.stacked_run() for run in todo], clip, max_stack=max_stack))
        sizes = iter(_group_sizes(todo, clip, max_stack))
        summaries: list[dict[str, Any]] = []
        diverged: list[TrainingDivergedError] = []
        for item in prepared:  # every sound run is saved before a diverged one's error is raised
            try:
                summaries.append(item if isinstance(item, dict) else
                                 _finish(item, next(results), stacked_runs=next(sizes)))
            except TrainingDivergedError as exc:
                diverged.append(exc)
        if diverged:
            raise diverged[0]
        return summaries


def _group_sizes(todo: Sequence[_Prepared], clip: LoadedClip, max_stack: int | None) -> list[int]:
    """How many runs shared each run's text pass (the groups :func:`coopipe.stacked.train_stacked` forms): the cost
    a run records is its group's."""
    if not todo:
        return []
    config = todo[0].config
    group = 1 if not config.method.definition.stackable else (
        max_stack or default_max_stack(clip, len(todo[0].train.classnames), config))
    return [min(group, len(todo) - (i // group) * group) for i in range(len(todo))]


@dataclass
class _Prepared:
    """One run folder ready to train: what :func:`coopipe.train.train_prompt` takes and what saving its result needs."""

    out_dir: Path
    clip: LoadedClip
    config: TrainConfig
    train: Any  # the few-shot train split (features, labels, classnames)
    val_feats: Any
    val_labels: Any
    resume: TrainState | None
    stores: dict[str, Any]
    record: dict[str, Any]
    run: RunRecord
    bar: Any
    metrics: EpochMetricsLog
    on_epoch: Callable[[EpochRecord, TrainState], None]
    on_step: Callable[[], None]
    template: str  # the dataset's hand-crafted prompt (for methods that need zero-shot text features)
    dataset: str  # its name (for a method whose published setting differs by dataset)
    ordinal: bool  # the classes are ranks (ages)
    best: BestEpoch | None = None  # model selection: the best epoch stored before a resume
    on_best: Callable[[BestEpoch], None] | None = None  # model selection: stores each new best epoch

    def stacked_run(self) -> StackedRun:
        return StackedRun(self.train.features, self.train.labels, self.train.classnames, self.config,
                          val_feats=self.val_feats, val_labels=self.val_labels, on_epoch=self.on_epoch,
                          resume_state=self.resume, on_step=self.on_step, template=self.template,
                          dataset=self.dataset, ordinal=self.ordinal, best=self.best, on_best=self.on_best)


def _train_locked(**kwargs: Any) -> dict[str, Any]:
    prepared = _prepare(**kwargs)
    if isinstance(prepared, dict):
        return prepared
    with prepared.bar, prepared.metrics:
        result = train_prompt(prepared.train.features, prepared.train.labels, prepared.clip, prepared.train.classnames,
                            prepared.config, val_feats=prepared.val_feats, val_labels=prepared.val_labels,
                            on_epoch=prepared.on_epoch, resume_state=prepared.resume, on_step=prepared.on_step,
                            template=prepared.template, dataset=prepared.dataset, ordinal=prepared.ordinal,
                            best=prepared.best, on_best=prepared.on_best)
    return _finish(prepared, result)


def _prepare(
    *,
    cache_dir: Path,
    dataset: str,
    shots: int,
    seed: int,
    out_dir: Path,
    model: str | None,
    pretrained: str | None,
    overrides: Mapping[str, Any] | None,
    device: str,
    progress: bool,
    params_record: Mapping[str, Any] | None,
    clip: LoadedClip | None,
    classes: str,
    checkpoint_every: float,
) -> _Prepared | dict[str, Any]:
    """Everything before training one run folder; a finished run's summary instead when there is nothing to do."""
    opts = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    check_train_options(opts)
    check_interval(checkpoint_every, "checkpoint_every (--checkpoint-every)")
    check_device(device)
    clip = clip or resolve_model(cache_dir, dataset, model, pretrained, device)
    method = opts.pop("method", "coop")  # a label or a spec (a spec keeps what its label does not say: a user's prompts)
    config = TrainConfig.for_method(method if isinstance(method, MethodSpec) else str(method), shots, dataset, seed=seed,
                                    **opts)
    # M in tokens (init words) and whatever else only the model knows: every record of the run holds the same
    config = dataclasses.replace(config, method=config.method.resolve(clip))
    if 0 < config.max_epoch <= config.warmup_epoch:
        logger.warning("%d epoch(s), all of them warm-up: the run trains at the warm-up learning rate %g only, never at "
                       "lr %g; train more epochs or set warmup_epoch 0", config.max_epoch, config.warmup_lr, config.lr)

    if config.method.definition.fewshot:
        train, train_store, val_feats, val_labels, stores = _fewshot_data(cache_dir, dataset, shots, seed, clip,
                                                                          config, classes)
    else:  # a method that reads no training image (zero-shot CLIP): the dataset's class names, no draw
        split, train_store = _class_list_store(cache_dir, dataset, clip)
        names = ClassSubset.of(train_store.classnames(), classes).classnames
        train = SplitFeatures(torch.zeros(0, 1, int(clip.embed_dim)), torch.zeros(0, dtype=torch.long), list(names),
                              train_store)
        val_feats = val_labels = None
        stores = {split: train_store}

    resume: TrainState | None = None
    if (out_dir / META_FILE).is_file():
        ckpt = load_checkpoint(out_dir)
        ckpt.check_resumable(config)
        trained_classes = ckpt.run.classes
        if trained_classes != classes:
            raise CheckpointError(
                f"run {out_dir} was trained on {trained_classes} classes, not {classes}; use another output folder"
            )
        if classes == "all":
            ckpt.check_store(train_store)
        else:
            check_store_classes(ckpt, train_store, classes)
        if ckpt.complete:
            logger.info("run %s is already complete: nothing to do", out_dir)
            return _complete_outputs(ckpt, clip)
        resume = ckpt.train_state()
        logger.info("resuming %s from epoch %d", out_dir, resume.epoch)
    # model selection's best epoch so far: stored as it is found, read back on resume, cleared on a fresh start
    if resume is None:
        clear_best(out_dir)
    best = load_best(out_dir, config, resumed_epoch=resume.epoch) if resume is not None else None

    record = dict(params_record or {})
    fewshot = config.method.definition.fewshot
    run = RunRecord(dataset=dataset, shots=shots if fewshot else 0, seed=seed if fewshot else None, classes=classes,
                    pretrained="none" if clip.weights.kind == "none" else clip.weights.value,
                    fewshot_index=str(fewshot_index_path(cache_dir, dataset, shots, seed)) if fewshot else None)
    last_save = [time.monotonic()]
    # the bar counts optimiser steps, so a long epoch (CoCoOp's batch 1, a large K) shows its rate and ETA as it goes
    steps = len(batch_slices(len(train.labels), config.batch_size, config.drop_last))
    done = resume.epoch if resume else 0
    bar = tqdm(total=config.max_epoch * steps, initial=done * steps, unit="step", disable=not progress,
               desc=f"{config.method.label()} {dataset} {shots}-shot seed {seed}", dynamic_ncols=True)
    bar.set_postfix({"epoch": f"{done + 1}/{config.max_epoch}"}, refresh=False)
    metrics = EpochMetricsLog(out_dir, start_epoch=resume.epoch if resume else 0,  # dvclive, one step per epoch
                              history=resume.history if resume else [])

    def on_epoch(rec: EpochRecord, state: TrainState) -> None:
        check_finite(rec, state, config, out_dir)
        post = {"epoch": f"{min(rec.epoch + 1, config.max_epoch)}/{config.max_epoch}", "loss": f"{rec.loss:.3f}",
                "acc": f"{rec.train_acc:.3f}", "lr": f"{rec.lr:.2e}"}
        if rec.val_acc is not None:
            post["val"] = f"{rec.val_acc:.3f}"
        bar.set_postfix(post)
        metrics.log(rec)
        if time.monotonic() - last_save[0] >= checkpoint_every and rec.epoch < config.max_epoch:
            save_checkpoint(out_dir, clip=clip, classnames=train.classnames, config=config, state=state,
                            stores=stores, params=record, run=run)
            last_save[0] = time.monotonic()

    return _Prepared(out_dir=out_dir, clip=clip, config=config, train=train, val_feats=val_feats,
                     val_labels=val_labels, resume=resume, stores=stores, record=record, run=run, bar=bar,
                     metrics=metrics, on_epoch=on_epoch, on_step=lambda: bar.update(1),
                     template=dataset_template(dataset), dataset=dataset, ordinal=is_age_dataset(dataset), best=best,
                     on_best=lambda kept: save_best(out_dir, kept, config))


def _class_list_store(cache_dir: Path, dataset: str, clip: LoadedClip) -> tuple[str, FeatureStore]:
    """The split and store whose class list a method that reads no image takes: the train or val store where there
    is one (so that the run touches nothing of the test split, as no method's fit does), else the test store (a
    zero-shot sweep encodes only that). Every split's store holds the dataset's whole class list."""
    for split in ("train", "val"):
        found = find_stores(cache_dir, dataset, split, model=clip.name, weights=clip.weights_id)
        if found:
            return split, found[0]
    return "test", select_store(cache_dir, dataset, "test", model=clip.name, weights=clip.weights_id)


def _fewshot_data(cache_dir: Path, dataset: str, shots: int, seed: int, clip: LoadedClip, config: TrainConfig,
                  classes: str) -> tuple[SplitFeatures, FeatureStore, Any, Any, dict[str, Any]]:
    """The (shots, seed) draw's train split (every cached view the run draws from), its few-shot validation
    features and labels (None when the draw has none) and the stores they came from."""
    index = fewshot_index_for(cache_dir, dataset, shots, seed, clip)
    train_store = select_store(cache_dir, dataset, "train", model=clip.name, weights=clip.weights_id,
                               positions=index.train_indices, need_views=config.views != "center")
    warn_single_view(int(train_store.provenance.get("views", {}).get("n_aug", 0)), trains=config.views != "center")
    train = read_split(train_store, index.train_indices)
    subset = ClassSubset.of(train.classnames, classes)
    train = subset.apply(train)
    if config.method.definition.ordered_labels:
        check_ordered_labels(train.classnames, dataset, config.method.label())
    stores: dict[str, Any] = {"train": train_store}
    val_feats = val_labels = None
    if index.val_indices:
        try:
            val_store = select_store(cache_dir, dataset, "val", model=clip.name, weights=clip.weights_id,
                                     positions=index.val_indices)
            val = subset.apply(read_split(val_store, index.val_indices, all_views=False))
            val_feats, val_labels, stores["val"] = val.features, val.labels, val_store
        except StoreError as exc:
            if config.select_every:  # selection scores the validation split, never anything else
                raise StoreError(f"model selection (select_every {config.select_every}) needs the few-shot "
                                 f"validation split: {exc}") from exc
            logger.warning("training without validation: %s", exc)

    return train, train_store, val_feats, val_labels, stores


def _finish(prepared: _Prepared, result: TrainResult, *, stacked_runs: int = 1) -> dict[str, Any]:
    """Check and save a trained run (the same for a run trained alone or stacked, with ``stacked_runs`` runs in its
    text pass); returns its summary, with the run's cost (:mod:`coopipe.cost`)."""
    out_dir, config, clip = prepared.out_dir, prepared.config, prepared.clip
    final = result.text_features if result.text_features is not None else torch.cat(
        [t.flatten() for t in result.params.values()])
    if not bool(torch.isfinite(final).all()):
        raise TrainingDivergedError(
            f"run {out_dir}: training diverged (the final prompt gives non-finite text features, lr {config.lr:g}); "
            f"the learning rate is likely too high: re-run with a lower --lr in a new output folder"
        )
    # the order is the crash-consistency argument: classifier, then the complete prompt.json that records its
    # hash, then history.tsv and train.json; a kill before prompt.json resumes, a kill after it is completed by
    # _complete_outputs on the next run
    save_result(out_dir, result, clip=clip, classnames=prepared.train.classnames, config=config,
                stores=prepared.stores, params=prepared.record, run=prepared.run)
    cost = training_cost(result.history, setup_seconds=result.setup_seconds, images=len(prepared.train.labels),
                         stacked_runs=stacked_runs, device=str(next(clip.model.parameters()).device))
    return _complete_outputs(load_checkpoint(out_dir), clip, seconds=result.seconds, skipped=False, cost=cost.to_dict())




def check_finite(rec: EpochRecord, state: TrainState, config: TrainConfig, out_dir: Path) -> None:
    """Stop a diverged run before anything of it is saved (the last finite checkpoint stays, never marked complete)."""
    if math.isfinite(rec.loss) and all(bool(torch.isfinite(t).all()) for t in state.params.values()):
        return
    what = f"loss {rec.loss}" if not math.isfinite(rec.loss) else "non-finite learned values"
    raise TrainingDivergedError(
        f"run {out_dir}: training diverged at epoch {rec.epoch} ({what}, lr {rec.lr:.3g}); the learning rate is "
        f"likely too high (--lr {config.lr:g}): re-run with a lower --lr in a new output folder"
    )


def _complete_outputs(ckpt: Checkpoint, clip: LoadedClip, *, seconds: float | None = None,
                      skipped: bool = True, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make every output of a complete run exist: a missing or foreign classifier is re-exported from the saved
    context, ``history.tsv`` and ``train.json`` are (re)written. Returns the run summary."""
    out_dir = ckpt.path
    try:
        if not ckpt.method.image_conditional:  # an image-conditional prompt (CoCoOp) has no single classifier
            ckpt.classifier()
    except (CheckpointError, MissingFileError) as exc:
        logger.warning("run %s: %s; re-exporting the classifier from the saved context", out_dir, exc)
        clf = export_classifier(out_dir / CLASSIFIER_FILE, ckpt.text_features(clip), classnames=ckpt.classnames,
                                model=ckpt.model, weights=ckpt.weights, logit_scale=float(ckpt.meta["logit_scale"]),
                                source={"checkpoint": str(out_dir), "epoch": ckpt.epoch, "variant": ckpt.variant})
        meta = {**ckpt.meta, "classifier": {"file": CLASSIFIER_FILE, "sha256": sha256_file(clf)}}
        meta[RECORD_DIGEST] = record_digest(meta)
        write_json(out_dir / META_FILE, meta)
        ckpt = load_checkpoint(out_dir)
    history = out_dir / "history.tsv"
    if not skipped or not history.is_file():
        write_text(history, _history_tsv(ckpt.history))
    summary = _summary(ckpt, skipped=skipped, seconds=seconds)
    if cost is not None:
        summary["cost"] = cost
    if not skipped or not (out_dir / "train.json").is_file():
        write_json(out_dir / "train.json", summary)
    return summary


def _summary(ckpt: Checkpoint, *, skipped: bool, seconds: float | None = None) -> dict[str, Any]:
    out_dir, meta = ckpt.path, ckpt.meta
    history = meta.get("history") or [{}]
    run = ckpt.run
    return {
        "run": str(out_dir),
        "method": ckpt.method.label(),
        "method_spec": ckpt.method.to_dict(),
        "dataset": run.dataset,
        "shots": run.shots,
        "seed": run.seed,
        "classes": run.classes,
        "model": meta["model"],
        "weights": meta["weights"],
        "variant": meta["variant"],
        "epochs": meta["epoch"],
        "final_loss": history[-1].get("loss"),
        "final_train_acc": history[-1].get("train_acc"),
        "final_val_acc": history[-1].get("val_acc"),
        "selection": meta.get("selection") or selection_record(0, None),
        "train_seconds": seconds,
        "skipped": skipped,
    }
