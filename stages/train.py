"""DVC stage `train`: learn one prompt for the params' dataset x (shots, seed) from the cached features.

Reads params.yaml (paths, data, model, train) and calls :func:`coopipe.jobs.train.run_train`.
Run by DVC as ``python stages/train.py --shots K --seed S --out RUN``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from params import load_params

from coopipe.jobs.train import run_train
from coopipe.logs import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shots", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", default="all", choices=["all", "base", "new"], help="base-to-new protocol")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    overrides = p.train_overrides()
    run_train(cache_dir=p.paths.cache, dataset=p.data.dataset, shots=args.shots, seed=args.seed, out_dir=args.out,
              model=p.model.name, pretrained=p.model.pretrained, overrides=overrides, device=p.encode_options.device,
              params_record={"model": {"name": p.model.name, "pretrained": p.model.pretrained}, "train": overrides},
              classes=args.classes)


if __name__ == "__main__":
    run_stage(main)
