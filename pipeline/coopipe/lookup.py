"""Helpers shared by the stage scripts: run directories, model lookup from the cache (atomic files: coopipe.atomic)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from coopipe.errors import StoreError
from coopipe.store import find_stores

FEWSHOT_DIR = "fewshot"


def pretrained_for(weights_id: str, hint: str | None = None) -> str:
    """The ``pretrained`` argument that reproduces ``weights_id`` (a tag, ``none``, or the given file)."""
    kind, _, rest = weights_id.partition(":")
    if hint:
        return hint
    if kind == "open_clip" and "/" in rest:
        return rest.split("/", 1)[1]
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


def method_label(variant: Mapping[str, Any]) -> str:
    """``coop`` for the paper's default variant (unified, end, M=16, random init); otherwise a descriptive label."""
    parts = ["coop"]
    if variant.get("csc"):
        parts.append("csc")
    if variant.get("class_token_position", "end") != "end":
        parts.append(str(variant["class_token_position"]))
    if variant.get("ctx_init"):
        parts.append("init-" + "-".join(str(variant["ctx_init"]).split()))
    elif int(variant.get("n_ctx", 16)) != 16:
        parts.append(f"m{variant['n_ctx']}")
    return "_".join(parts)
