"""DVC stage `encode`: every image the later stages read goes through the frozen image encoder once.

Reads params.yaml (data, model, encode, fewshot), checks data and weights before any work, and calls
:func:`coopipe.jobs.encode.run_encode`. Run by DVC as ``python stages/encode.py --params params.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from params import DataParams, load_params

from coopipe.errors import ParamsError, WeightsError
from coopipe.jobs.encode import preflight, run_encode
from coopipe.logs import run_stage

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
        run_encode(
            dataset=p.data.dataset, data_root=p.data.root, cache_dir=p.paths.cache, model=p.model.name,
            pretrained=p.model.pretrained, shots=p.fewshot.shots, seeds=p.fewshot.seeds,
            dataset_options=p.data.options, **p.encode_kwargs(),
        )
    except WeightsError as exc:  # e.g. HF_HUB_OFFLINE=1 and the weights are not in the hub cache
        raise with_offline_hint(exc, p.data.root) from exc


if __name__ == "__main__":
    run_stage(main)
