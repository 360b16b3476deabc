"""DVC stage `evaluate`: a trained run, zero-shot CLIP or the linear probe on the cached test features.

Reads params.yaml (paths, data, model) and calls :mod:`coopipe.jobs.evaluate`.
Run by DVC as ``python stages/evaluate.py {coop|zeroshot|linear_probe} ...``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from params import load_params

from coopipe.jobs.evaluate import run_eval, run_fit, run_zeroshot
from coopipe.logs import run_stage
from coopipe.methods import MethodSpec


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["coop", "zeroshot", "linear_probe"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--run", help="run folder (coop)")
    parser.add_argument("--out", help="output folder (zeroshot, linear_probe)")
    parser.add_argument("--shots", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--classes", choices=["all", "base", "new"], help="class subset (base-to-new protocol)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    common = {"cache_dir": p.paths.cache, "dataset": p.data.dataset}
    model = {"model": p.model.name, "pretrained": p.model.pretrained, "device": p.encode_options.device}
    if args.what == "coop":
        run_eval(args.run, classes=args.classes, **common)
    elif args.what == "zeroshot":
        run_zeroshot(out_dir=args.out, classes=args.classes or "all", **common, **model)
    else:
        run_fit(MethodSpec("linear_probe"), shots=args.shots, seed=args.seed, out_dir=args.out, **common, **model)


if __name__ == "__main__":
    run_stage(main)
