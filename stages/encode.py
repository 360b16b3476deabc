"""DVC stage `encode`: every image the later stages read goes through the frozen image encoder once.

Reads params.yaml (data, model, encode, fewshot), checks data and weights before any work, and calls
:func:`coopipe.jobs.encode.run_encode`. Run by DVC as ``python stages/encode.py --params params.yaml``.

Then it writes ``<cache>/<dataset>/stores.<split>.json``: the names of the complete stores of that split, model and
weights, which are the stores a later stage can read (a store's name ends with the hash of its inputs). The later
stages depend on these small files, not on the cache folder: a store that another command writes for another
model or dataset changes nothing, so `dvc repro` reruns a stage only when what it reads changed. The stage runs on
every `dvc repro` (``always_changed``: a re-run whose stores are complete loads no model and takes seconds), so a
store added since (say, one with more views, which training would prefer) shows up in the listing.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from params import DataParams, load_params

from coopipe.atomic import write_json
from coopipe.encode import EncodeResult
from coopipe.errors import ParamsError, WeightsError
from coopipe.jobs.encode import preflight, run_encode
from coopipe.logs import run_stage
from coopipe.store import dataset_folder, find_stores, open_store

# The one command that runs this same pipeline offline: random weights on the sample shipped in data/sample
# (few shots and epochs so that it ends in minutes on a 2-core CPU; see README "Offline machines").
OFFLINE_SETTINGS = (
    "model.pretrained=none",
    "fewshot.shots=[1,16]",
    "fewshot.seeds=[1]",
    "train.max_epoch=10",
    "encode.views=4",
)


def offline_command(data_root: str) -> str:
    """``bash scripts/repro.sh -S ...``: the pipeline with random weights (and the bundled sample as data)."""
    settings = list(OFFLINE_SETTINGS)
    if data_root != DataParams.root:
        settings.append(f"data.root={DataParams.root}")
    return "bash scripts/repro.sh " + " ".join(f"-S '{s}'" for s in settings)


def with_offline_hint(exc: Exception, data_root: str) -> ParamsError:
    """``exc`` followed by the one command that runs the pipeline offline."""
    return ParamsError(
        f"{exc}\n  to run this pipeline offline now (random weights on the bundled EuroSAT sample, a few "
        f"minutes; accuracies only check that it runs):\n    {offline_command(data_root)}"
    )


def check_inputs(dataset: str, data_root: str, model: str, pretrained: str,
                 dataset_options: Mapping[str, Any] | None = None) -> None:
    """:func:`preflight`, whose error also gives the one command that runs the pipeline offline."""
    try:
        preflight(dataset, data_root, model, pretrained, dataset_options)
    except ParamsError as exc:
        raise with_offline_hint(exc, data_root) from exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    check_inputs(p.data.dataset, p.data.root, p.model.name, p.model.pretrained, p.data.options)
    try:
        results = run_encode(
            dataset=p.data.dataset, data_root=p.data.root, cache_dir=p.paths.cache, model=p.model.name,
            pretrained=p.model.pretrained, shots=p.fewshot.shots, seeds=p.fewshot.seeds,
            dataset_options=p.data.options, **p.encode_kwargs(),
        )
    except WeightsError as exc:  # e.g. HF_HUB_OFFLINE=1 and the weights are not in the hub cache
        raise with_offline_hint(exc, p.data.root) from exc
    write_store_listings(p.paths.cache, results)


def write_store_listings(cache_dir: str | Path, results: Sequence[EncodeResult]) -> None:
    """``stores.<split>.json`` per split: the complete stores of the encoded dataset, model and weights."""
    prov = open_store(results[0].path).provenance
    dataset, model, weights = prov["dataset"], prov["model"], prov["weights"]
    for split in ("train", "val", "test"):
        names = [s.path.name for s in find_stores(cache_dir, dataset, split, model=model, weights=weights)]
        write_json(dataset_folder(cache_dir, dataset) / f"stores.{split}.json",
                   {"dataset": dataset, "split": split, "model": model, "weights": weights, "stores": sorted(names)})


if __name__ == "__main__":
    run_stage(main)
