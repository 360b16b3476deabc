"""DVC stage `interpret`: the nearest vocabulary words of a learned context (FAISS), as JSON and TSV.

Reads params.yaml (paths, interpret) and calls :func:`coopipe.jobs.interpret.run_interpret`.
Run by DVC as ``python stages/interpret.py --checkpoint RUN --json OUT.json --tsv OUT.tsv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from params import load_params

from coopipe.interpret.render import format_table
from coopipe.jobs.interpret import run_interpret
from coopipe.logs import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by the train stage")
    parser.add_argument("--json", required=True, help="JSON output (DVC out)")
    parser.add_argument("--tsv", required=True, help="TSV output (DVC out)")
    parser.add_argument("--test-store", default=None, help="test store (default: found under paths.cache)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    ip = p.interpret
    result = run_interpret(
        checkpoint=args.checkpoint, cache_dir=p.paths.cache, topk=ip.topk, metric=ip.metric, device=ip.device,
        test_store=args.test_store, json_out=args.json, tsv_out=args.tsv,
    )
    print(format_table(result))


if __name__ == "__main__":
    run_stage(main)
