"""DVC stage `encode`: every image the later stages read goes through the frozen image encoder once.

Reads params.yaml (data, model, encode, fewshot), checks data and weights before any work, and calls
:func:`coopipe.jobs.encode.run_encode`. Run by DVC as ``python stages/encode.py --params params.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from params import load_params

from coopipe.jobs.encode import preflight, run_encode
from coopipe.logs import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    preflight(p.data.dataset, p.data.root, p.model.name, p.model.pretrained)
    run_encode(
        dataset=p.data.dataset, data_root=p.data.root, cache_dir=p.paths.cache, model=p.model.name,
        pretrained=p.model.pretrained, shots=p.fewshot.shots, seeds=p.fewshot.seeds, **p.encode_kwargs(),
    )


if __name__ == "__main__":
    run_stage(main)
