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

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from coopipe.atomic import write_json, write_text
from coopipe.checkpoint import META_FILE, load_checkpoint, save_checkpoint, save_result
from coopipe.datasets.fewshot import FewShotIndex, sample_few_shot, sample_val
from coopipe.errors import CheckpointError, ParamsError, StoreError
from coopipe.features import read_split, select_store
from coopipe.models import LoadedClip, load_clip
from coopipe.lookup import FEWSHOT_DIR, infer_model, method_label, pretrained_for
from coopipe.metrics_log import EpochMetricsLog
from coopipe.store import FeatureStore, find_stores
from coopipe.train import EpochRecord, TrainConfig, TrainState, train_coop
from coopipe.transfer import ClassSubset, check_store_classes

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 30.0  # save resume state at most this often (and at the end)


def fewshot_index(cache_dir: Path, dataset: str, shots: int, seed: int, train_store: FeatureStore | None) -> FewShotIndex:
    """The recorded draw for (shots, seed); drawn from a full train store (and saved) when none is recorded."""
    path = cache_dir / dataset / FEWSHOT_DIR / f"{dataset}-shots{shots}-seed{seed}.json"
    if path.is_file():
        return FewShotIndex.load(path)
    if train_store is None or train_store.provenance.get("rows", "all") != "all":
        raise StoreError(
            f"no few-shot index {path} and no full train store to draw it from; encode with "
            f"`coopipe encode --dataset {dataset} --shots {shots} --seeds {seed} ...`"
        )
    labels = train_store.labels()
    positions = train_store.index()
    n_classes = len(train_store.classnames())
    train = positions[sample_few_shot(labels, n_classes, shots, seed=seed, classnames=train_store.classnames(),
                                      source=str(train_store.path))]
    val_idx: tuple[int, ...] = ()
    val_stores = [s for s in find_stores(cache_dir, dataset, "val", model=train_store.provenance["model"],
                                         weights=train_store.provenance["weights"]) if s.provenance.get("rows") == "all"]
    if val_stores:
        v = val_stores[0]
        val_idx = tuple(int(i) for i in v.index()[sample_val(v.labels(), n_classes, shots, seed=seed)])
    index = FewShotIndex(dataset=dataset, shots=shots, seed=seed, train_indices=tuple(int(i) for i in train),
                         val_indices=val_idx, val_shots=min(shots, 4))
    index.save(path)
    return index


def fewshot_index_for(cache_dir: Path, dataset: str, shots: int, seed: int, clip: LoadedClip) -> FewShotIndex:
    """:func:`fewshot_index`, drawing (when no index is recorded) from a full train store of ``clip``'s features."""
    full = [s for s in find_stores(cache_dir, dataset, "train", model=clip.name, weights=clip.weights_id)
            if s.provenance.get("rows", "all") == "all"]
    return fewshot_index(cache_dir, dataset, shots, seed, full[0] if full else None)


def _history_tsv(records: Sequence[EpochRecord]) -> str:
    lines = ["epoch\tlr\tloss\ttrain_acc\tval_acc\tseconds"]
    for r in records:
        val = "" if r.val_acc is None else f"{r.val_acc:.6f}"
        lines.append(f"{r.epoch}\t{r.lr:.8g}\t{r.loss:.6f}\t{r.train_acc:.6f}\t{val}\t{r.seconds:.4f}")
    return "\n".join(lines) + "\n"


def resolve_model(cache_dir: Path, dataset: str, model: str | None, pretrained: str | None, device: str) -> LoadedClip:
    """The model whose features are cached for ``dataset`` (inferred when not given), loaded."""
    if model is None:
        model, weights = infer_model(cache_dir, dataset)
        pretrained = pretrained_for(weights, pretrained)
    elif pretrained is None:
        stores = [s for s in find_stores(cache_dir, dataset, "train", model=model)]
        if not stores:
            raise StoreError(f"no {model} train features for {dataset} under {cache_dir}; run `coopipe encode` first")
        pretrained = pretrained_for(stores[0].provenance["weights"])
    return load_clip(model, pretrained, device=device)


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
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one CoOp run; returns the run summary written to train.json.

    ``classes``: ``all``, or ``base``/``new`` to train on that half of the (sorted) classes only.
    """
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    clip = clip or resolve_model(cache_dir, dataset, model, pretrained, device)
    opts = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    config = TrainConfig.for_shots(shots, dataset, seed=seed, **opts)

    index = fewshot_index_for(cache_dir, dataset, shots, seed, clip)
    train_store = select_store(cache_dir, dataset, "train", model=clip.name, weights=clip.weights_id,
                               positions=index.train_indices, need_views=config.views != "center")
    train = read_split(train_store, index.train_indices)
    subset = ClassSubset.of(train.classnames, classes)
    train = subset.apply(train)
    stores = {"train": train_store}
    val_feats = val_labels = None
    if index.val_indices:
        try:
            val_store = select_store(cache_dir, dataset, "val", model=clip.name, weights=clip.weights_id,
                                     positions=index.val_indices)
            val = subset.apply(read_split(val_store, index.val_indices, all_views=False))
            val_feats, val_labels, stores["val"] = val.features, val.labels, val_store
        except StoreError as exc:
            logger.warning("training without validation: %s", exc)

    resume: TrainState | None = None
    if (out_dir / META_FILE).is_file():
        ckpt = load_checkpoint(out_dir)
        ckpt.check_resumable(config)
        trained_classes = (ckpt.meta.get("params") or {}).get("classes", "all")
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
            return _summary(out_dir, ckpt.meta, skipped=True)
        resume = ckpt.train_state()
        logger.info("resuming %s from epoch %d", out_dir, resume.epoch)

    record = {"dataset": dataset, "shots": shots, "seed": seed, "classes": classes, **dict(params_record or {})}
    last_save = [time.monotonic()]
    bar = tqdm(total=config.max_epoch, initial=resume.epoch if resume else 0, unit="epoch", disable=not progress,
               desc=f"CoOp {dataset} {shots}-shot seed {seed}", dynamic_ncols=True)
    metrics = EpochMetricsLog(out_dir, start_epoch=resume.epoch if resume else 0)  # dvclive, one step per epoch

    def on_epoch(rec: EpochRecord, state: TrainState) -> None:
        post = {"loss": f"{rec.loss:.3f}", "acc": f"{rec.train_acc:.3f}", "lr": f"{rec.lr:.2e}"}
        if rec.val_acc is not None:
            post["val"] = f"{rec.val_acc:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        metrics.log(rec)
        if time.monotonic() - last_save[0] >= CHECKPOINT_EVERY_S and rec.epoch < config.max_epoch:
            save_checkpoint(out_dir, clip=clip, classnames=train.classnames, config=config, state=state,
                            stores=stores, params=record)
            last_save[0] = time.monotonic()

    with bar, metrics:
        result = train_coop(train.features, train.labels, clip, train.classnames, config, val_feats=val_feats,
                            val_labels=val_labels, on_epoch=on_epoch, resume_state=resume)
    save_result(out_dir, result, clip=clip, classnames=train.classnames, config=config, stores=stores, params=record)
    write_text(out_dir / "history.tsv", _history_tsv(result.history))
    meta = load_checkpoint(out_dir).meta
    summary = _summary(out_dir, meta, skipped=False, seconds=result.seconds)
    write_json(out_dir / "train.json", summary)
    return summary


def _summary(out_dir: Path, meta: Mapping[str, Any], *, skipped: bool, seconds: float | None = None) -> dict[str, Any]:
    history = meta.get("history") or [{}]
    params = meta.get("params") or {}
    return {
        "run": str(out_dir),
        "method": method_label(meta["variant"]),
        "dataset": params.get("dataset"),
        "shots": params.get("shots"),
        "seed": params.get("seed"),
        "classes": params.get("classes", "all"),
        "model": meta["model"],
        "weights": meta["weights"],
        "variant": meta["variant"],
        "epochs": meta["epoch"],
        "final_loss": history[-1].get("loss"),
        "final_train_acc": history[-1].get("train_acc"),
        "final_val_acc": history[-1].get("val_acc"),
        "train_seconds": seconds,
        "skipped": skipped,
    }


TRAIN_PARAM_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")
