"""Classify new images with a trained run, or with a folder written by ``coopipe export``: the learned prompt's head
on the image features.

Why this way: a run folder (and its export) already holds everything inference needs beyond the image tower: for
CoOp and rank prompts ``classifier.safetensors``, the K x D class text features of the learned prompt and CLIP's
logit scale, so the text encoder never runs; for CoCoOp the context and Meta-Net, whose text pass runs once per
image as in ``coopipe eval``. Both kinds of folder are read into one :class:`~coopipe.head.Head`, so a run and its
export predict the same. Images go through the same code as the centre view of ``coopipe encode`` (``load_rgb``
-> ``make_views`` with no augmented view -> ``encode_batch``), with the run's model and weights (checked against
the record), at the precision and storage dtype of the features the run was trained on, so a prediction equals
what ``coopipe eval`` computes from a store of the same images. Or the features come from a cache store
(``store=``) and no image tower runs.

Probabilities are the softmax of CLIP's logits, ``exp(logit_scale) * cos(image, class text)``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from coopipe.atomic import atomic_write
from coopipe.checkpoint import load_checkpoint
from coopipe.datasets.common import list_images
from coopipe.datasets.manifest import read_manifest_paths

# the decoding of `coopipe encode` itself (package-internal helpers), so that a predicted image is decoded, cropped
# and encoded exactly as a store row is
from coopipe.encode import (
    BAD_IMAGE_POLICIES,
    EncodeJob,
    EncodeOptions,
    _collate,
    _ViewDataset,
    worker_init,
    encode_batch,
)
from coopipe.engines import build_tower
from coopipe.hardware import check_device
from coopipe.errors import (
    CheckpointError,
    DatasetError,
    MissingFileError,
    StoreError,
)
from coopipe.export import is_export, load_export
from coopipe.head import Head, head_of_run
from coopipe.models import LoadedClip
from coopipe.store import open_store
from coopipe.views import ViewSpec

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_SUFFIXES", "Prediction", "load_head", "predict", "resolve_inputs", "write_predictions"]

MANIFEST_SUFFIXES = frozenset({".csv", ".tsv", ".json", ".jsonl"})
_CENTRE = ViewSpec()  # the test-time view: resize the short side + centre crop, no augmentation


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    labels: tuple[str, ...]
    probs: tuple[float, ...]
    indices: tuple[int, ...]  # class indices into the run's class list

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "top": [{"label": l, "prob": p, "index": i} for l, p, i in zip(self.labels, self.probs, self.indices)],
        }


# ---------------------------------------------------------------- inputs
def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files from files, folders (recursively, sorted) and manifests (``path`` column), in the order given."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = [item / rel for rel in list_images(item)]
            if not found:
                logger.warning("no image files under %s", item)
            paths.extend(found)
        elif item.is_file() and item.suffix.lower() in MANIFEST_SUFFIXES:
            paths.extend(read_manifest_paths(item))
        elif item.exists():  # a FIFO or device is refused by the decoder, before it is opened
            paths.append(item)
        else:
            raise MissingFileError(f"{item} does not exist; pass image files, folders of images or a CSV/JSON manifest")
    if not paths:
        shown = ", ".join(str(i) for i in list(inputs)[:3]) or "(nothing)"
        raise DatasetError(f"no images to predict in {shown}; pass image files, folders of images or a manifest")
    return paths


# ---------------------------------------------------------------- features
def encode_images(
    clip: LoadedClip,
    paths: Sequence[Path],
    options: EncodeOptions,
    *,
    progress: bool = True,
) -> tuple[list[int], np.ndarray]:
    """(indices of the readable images, their raw centre-view features (n, D) float32 rounded to ``options.dtype``).

    An unreadable image raises :class:`BadImageError` naming it (``on_bad_image='fail'``) or is left out with a
    warning (``'skip'``).
    """
    # the run's precision as recorded (no second warning about it); the engine as `coopipe encode` resolves it here
    precision = options.precision if options.precision != "auto" else options.resolved(clip).precision
    tower = build_tower(clip, options.engine, precision, options.device)
    workers = options.num_workers
    job = EncodeJob(  # absolute paths under the root "/": the encoder's row decoding, centre view only
        image_root="/", paths=tuple(str(Path(p).absolute()) for p in paths), positions=tuple(range(len(paths))),
        preprocess=clip.preprocess, views=_CENTRE, model=clip.name, pretrained=clip.weights.value, options=options,
    )
    loader = DataLoader(
        _ViewDataset(job),
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    kept: list[int] = []
    parts: list[np.ndarray] = []
    show = progress and len(paths) > options.batch_size
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not show, dynamic_ncols=True) as bar:
        for decoded in loader:
            decoded.unreadable(options.on_bad_image)  # logged, or raised under on_bad_image='fail'
            if decoded.views is not None:  # (b, 3, S, S) uint8
                parts.append(encode_batch(tower, decoded.views, clip.preprocess))
                kept.extend(decoded.good)
            bar.update(len(decoded.rows))
    feats = np.concatenate(parts) if parts else np.zeros((0, clip.embed_dim), dtype=np.float32)
    # a store holds float16 by default: round the same way, so that predictions equal eval's on that store
    return kept, feats.astype(options.dtype).astype(np.float32)


def _store_features(path: str | os.PathLike[str], head: Head) -> tuple[list[str], np.ndarray]:
    """(image paths, centre-view features) of every valid row of a cache store of the head's model and weights."""
    store = open_store(path)
    prov = store.provenance
    if (prov.get("model"), prov.get("weights")) != (head.model, head.weights):
        raise CheckpointError(
            f"store {store.path} holds features of {prov.get('model')} ({prov.get('weights')}), but {head.path} "
            f"was trained with {head.model} ({head.weights}); pass a store encoded with its model and weights"
        )
    rows = np.flatnonzero(store.valid())
    if rows.size < store.n_rows:
        logger.warning("store %s: leaving out %d image(s) skipped at encode time", store.path, store.n_rows - rows.size)
    if rows.size == 0:
        raise StoreError(f"store {store.path} has no readable rows; re-encode it")
    return [str(p) for p in store.paths()[rows]], store.read(rows, view=0)


# ---------------------------------------------------------------- prediction
def load_head(source: str | os.PathLike[str]) -> Head:
    """The head of a run folder (its exported classifier, or CoCoOp's prompt) or of an exported folder."""
    return load_export(source) if is_export(source) else head_of_run(load_checkpoint(source))


def top_k(logits: torch.Tensor, classnames: Sequence[str], paths: Sequence[str], k: int) -> list[Prediction]:
    """Softmax of CLIP's logits (N, K) over the classes -> the ``k`` most probable classes of each image."""
    probs = torch.softmax(logits, dim=-1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=-1)  # (N, k), sorted
    return [
        Prediction(path=str(path), labels=tuple(classnames[j] for j in idx), probs=tuple(float(v) for v in val),
                   indices=tuple(int(j) for j in idx))
        for path, val, idx in zip(paths, values.tolist(), indices.tolist())
    ]


def predict(
    run: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    topk: int = 5,
    store: str | os.PathLike[str] | None = None,
    batch_size: int = EncodeOptions.batch_size,
    num_workers: int = 0,
    precision: str | None = None,
    device: str = "cpu",
    on_bad_image: str = "fail",
    pretrained: str | None = None,
    progress: bool = False,
    clip: LoadedClip | None = None,
) -> list[Prediction]:
    """Top-``topk`` classes of each input image under the learned prompt of ``run`` (a run folder, or a folder
    written by ``coopipe export``: both give the same predictions).

    ``inputs``: image files, folders (searched recursively, sorted) or CSV/JSON manifests with a ``path`` column.
    ``store``: read the features of a cache store instead (then no model is loaded, except CoCoOp's text tower).
    ``precision``: encoder precision (default: that of the run's train store, as eval compares against).
    ``pretrained``: where to load the weights when the run's weights came from a local file that moved.
    ``clip``: an already loaded model.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    check_device(device)
    head = load_head(run)  # a run's classifier is bound to it by hash, an export's files to its record
    if clip is not None:
        head.check_clip(clip)
    if store is not None:
        if inputs:
            raise ValueError("give either images or a store, not both")
        paths, feats = _store_features(store, head)
        if head.image_conditional:  # the text tower runs for every image
            clip = clip or head.load_model(pretrained, device)
        return top_k(head.logits(feats, clip), head.classnames, paths, topk)
    files = resolve_inputs(inputs)
    options = EncodeOptions(batch_size=batch_size, num_workers=num_workers, precision=precision or head.precision,
                            dtype=head.dtype, on_bad_image=on_bad_image, device=device, progress=progress)
    clip = clip or head.load_model(pretrained, device)
    kept, feats = encode_images(clip, files, options, progress=progress)
    if len(kept) < len(files):
        logger.warning("%d of %d image(s) were unreadable and skipped", len(files) - len(kept), len(files))
    return top_k(head.logits(feats, clip), head.classnames, [str(files[i]) for i in kept], topk)


# ---------------------------------------------------------------- output
def _rows(predictions: Sequence[Prediction], k: int) -> Iterator[list[Any]]:
    for p in predictions:
        row: list[Any] = [p.path]
        for label, prob in zip(p.labels, p.probs):
            row += [label, f"{prob:.6f}"]
        yield row + [""] * (1 + 2 * k - len(row))


def write_predictions(
    predictions: Sequence[Prediction], path: str | os.PathLike[str], *, run: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``.csv`` (``path,label_1,prob_1,...``) or ``.json`` (run + one object per image) atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"--out {path}: write .csv or .json")
    k = max((len(p.labels) for p in predictions), default=1)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if suffix == ".csv":
                writer = csv.writer(fh)
                writer.writerow(["path"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("label", "prob")])
                writer.writerows(_rows(predictions, k))
            else:
                data = {"run": str(run) if run is not None else None, "predictions": [p.to_dict() for p in predictions]}
                json.dump(data, fh, indent=1)
                fh.write("\n")

    atomic_write(path, write)  # a failed write (full disk, a folder in the way) leaves no temporary file
    return path
