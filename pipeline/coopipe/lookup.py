"""Every lookup a job needs from the cache, in one place: the model and weights of cached features, the
few-shot index of (dataset, shots, seed), the stores that hold a draw, and what a checkpoint was trained on.

Why one module: the command line, the DVC stages and the sweep all ask these questions; answered in several
places they drift (a stage once re-drew few-shot indices with its own literal ``min(shots, 4)``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from coopipe.checkpoint import Checkpoint
from coopipe.datasets import is_age_dataset
from coopipe.datasets.fewshot import FewShotIndex, draw_index
from coopipe.errors import CheckpointError, StoreError
from coopipe.models import BUNDLED, SCHEMES, LoadedClip, check_model_name, load_clip, tag_of_identity
from coopipe.store import FeatureStore, find_stores

logger = logging.getLogger(__name__)

FEWSHOT_DIR = "fewshot"


def pretrained_for(weights_id: str, hint: str | None = None) -> str:
    """The ``pretrained`` argument that reproduces ``weights_id`` (a tag, ``none``, the weights that come with an
    ``hf-hub:``/``local-dir:`` name, or the given file)."""
    kind, _, _ = weights_id.partition(":")
    if hint:
        return hint
    if kind in SCHEMES:
        return BUNDLED
    tag = tag_of_identity(weights_id)
    if tag is not None:
        return tag
    if kind == "random-init":
        return "none"
    raise StoreError(
        f"the cached features were encoded with weights from a local file ({weights_id}); pass that file with --pretrained PATH"
    )


def infer_model(cache_dir: str | os.PathLike[str], dataset: str, split: str = "train") -> tuple[str, str]:
    """(model, weights identity) of the stores for ``dataset``/``split``; an error if there are none or several."""
    pairs = sorted({(s.provenance["model"], s.provenance["weights"]) for s in find_stores(cache_dir, dataset, split)})
    if not pairs:
        raise StoreError(
            f"no {split} features for dataset {dataset} under {cache_dir}; run `coopipe encode --dataset {dataset} ...` first"
        )
    if len(pairs) > 1:
        listed = ", ".join(f"{m} ({w})" for m, w in pairs)
        raise StoreError(f"{cache_dir} holds {dataset} features of several models: {listed}; pick one with --model/--pretrained")
    return pairs[0]


def run_name(shots: int, seed: int) -> str:
    return f"shots{shots}_seed{seed}"


# ---------------------------------------------------------------- few-shot draws
def fewshot_index_path(cache_dir: str | os.PathLike[str], dataset: str, shots: int, seed: int) -> Path:
    """Where the draw of (dataset, shots, seed) is recorded: ``<cache>/<dataset>/fewshot/<dataset>-shotsK-seedS.json``."""
    return Path(cache_dir) / dataset / FEWSHOT_DIR / f"{dataset}-shots{shots}-seed{seed}.json"


def fewshot_index(cache_dir: Path, dataset: str, shots: int, seed: int, train_store: FeatureStore | None) -> FewShotIndex:
    """The recorded draw for (shots, seed); drawn from a full train store (and saved) when none is recorded."""
    path = fewshot_index_path(cache_dir, dataset, shots, seed)
    if path.is_file():
        return FewShotIndex.load(path)
    larger = _larger_draw(cache_dir, dataset, shots, seed)
    if larger is not None:  # the draws are nested: fewer shots of a recorded draw need no images and no encoding
        index = larger.nested(shots)
        index.save(path)
        logger.info("derived the %d-shot draw of %s (seed %d) from its %d-shot draw", shots, dataset, seed, larger.shots)
        return index
    if train_store is None or train_store.provenance.get("rows", "all") != "all":
        raise StoreError(
            f"no few-shot index {path} and no full train store to draw it from; encode with "
            f"`coopipe encode --dataset {dataset} --shots {shots} --seeds {seed} ...`"
        )
    index = _draw_from_stores(cache_dir, dataset, shots, seed, train_store)
    index.save(path)
    return index


def _draw_from_stores(cache_dir: Path, dataset: str, shots: int, seed: int, train_store: FeatureStore) -> FewShotIndex:
    """The draw of (shots, seed) from a full train store (and a full val store if cached): the same index as
    drawing from the dataset (CoOp's rule, or the age rule for age datasets: sparse ages keep all their images)."""
    prov = train_store.provenance
    val_stores = [s for s in find_stores(cache_dir, dataset, "val", model=prov["model"], weights=prov["weights"])
                  if s.provenance.get("rows") == "all"]
    val = val_stores[0] if val_stores else None
    hashes = {name: s.provenance["file_list_sha256"] for name, s in (("train", train_store), ("val", val))
              if s is not None and "file_list_sha256" in s.provenance}
    return draw_index(
        dataset, train_store.labels(), val.labels() if val is not None else None, len(train_store.classnames()),
        shots, seed, strict=not is_age_dataset(dataset), split_hashes=hashes, train_positions=train_store.index(),
        val_positions=val.index() if val is not None else None, classnames=train_store.classnames(),
        source=str(train_store.path),
    )


def _larger_draw(cache_dir: str | os.PathLike[str], dataset: str, shots: int, seed: int) -> FewShotIndex | None:
    """The smallest recorded draw of (dataset, seed) with more than ``shots`` shots and a recorded draw order."""
    folder = Path(cache_dir) / dataset / FEWSHOT_DIR
    candidates = []
    for file in folder.glob(f"{dataset}-shots*-seed{seed}.json"):
        index = FewShotIndex.load(file)
        if index.dataset == dataset and index.seed == seed and index.shots > shots and index.train_order is not None:
            candidates.append(index)
    return min(candidates, key=lambda ix: ix.shots, default=None)


def fewshot_index_for(cache_dir: Path, dataset: str, shots: int, seed: int, clip: LoadedClip) -> FewShotIndex:
    """:func:`fewshot_index`, drawing (when no index is recorded) from a full train store of ``clip``'s features."""
    full = [s for s in find_stores(cache_dir, dataset, "train", model=clip.name, weights=clip.weights_id)
            if s.provenance.get("rows", "all") == "all"]
    return fewshot_index(cache_dir, dataset, shots, seed, full[0] if full else None)



# ---------------------------------------------------------------- models
def resolve_model(cache_dir: Path, dataset: str, model: str | None, pretrained: str | None, device: str,
                  split: str = "train") -> LoadedClip:
    """The model whose ``split`` features are cached for ``dataset`` (inferred when not given), loaded (zero-shot
    reads only the test split: it must not ask for train features); a model given by name is checked first (known,
    supported by the text path), before any store is looked up."""
    if model is not None:
        check_model_name(model)
    if model is None:
        model, weights = infer_model(cache_dir, dataset, split)
        pretrained = pretrained_for(weights, pretrained)
    elif pretrained is None:
        stores = [s for s in find_stores(cache_dir, dataset, split, model=model)]
        if not stores:
            raise StoreError(f"no {model} {split} features for {dataset} under {cache_dir}; run `coopipe encode` first")
        pretrained = pretrained_for(stores[0].provenance["weights"])
    return load_clip(model, pretrained, device=device)



# ---------------------------------------------------------------- checkpoints
def checkpoint_pretrained(ckpt: Checkpoint) -> str:
    """The ``pretrained`` argument that loads the weights ``ckpt`` was trained with (from its weights identity).

    ``open_clip:<model>/<tag>[+quickgelu]`` -> the tag; ``random-init:...`` -> ``none``; ``sha256:...`` (a local file) -> the
    file recorded in the checkpoint's run record, if it still exists. The identity is checked after loading.
    """
    if not ckpt.weights.startswith("sha256:"):
        return pretrained_for(ckpt.weights)  # an open_clip tag, or none for random init
    candidate = ckpt.run.pretrained
    if candidate and Path(candidate).expanduser().is_file():
        return candidate
    raise CheckpointError(
        f"checkpoint {ckpt.path} was trained with weights from a local file ({ckpt.weights}) that it cannot locate; "
        f"pass the file's path (coopipe interpret --pretrained PATH)"
    )
