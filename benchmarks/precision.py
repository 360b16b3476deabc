"""Benchmark: bf16 autocast against fp32 (both channels_last) for the bare image tower on this CPU.

This is the measurement behind coopipe.hardware's precision rule: run it on a quiet machine of a new kind before
changing the rule. fp32 and bf16 batches are interleaved and the best time of each is kept (the best run is
the one least disturbed by other processes). Last line: one JSON object.

    python benchmarks/precision.py --models RN50,ViT-B-32 --batch-size 16 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from coopipe.hardware import choose_precision, probe  # noqa: E402
from coopipe.models import load_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="RN50,ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    facts = probe("cpu")
    print(facts.describe(), f"threads={torch.get_num_threads()}; auto -> {choose_precision(facts).precision}", flush=True)
    rows = []
    for name in args.models.split(","):
        clip = load_clip(name, "none")
        visual = clip.model.visual.to(memory_format=torch.channels_last)
        size = clip.preprocess.image_size
        x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)

        def seconds(precision: str) -> float:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            with torch.inference_mode(), ctx:
                start = time.perf_counter()
                visual(x)
                return time.perf_counter() - start

        seconds("fp32"), seconds("bf16")  # warm-up: oneDNN primitive creation
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(args.repeats):
            for precision in best:
                best[precision] = min(best[precision], seconds(precision))
        row = {
            "model": name,
            "fp32_img_per_s": round(args.batch_size / best["fp32"], 2),
            "bf16_img_per_s": round(args.batch_size / best["bf16"], 2),
            "bf16_over_fp32": round(best["fp32"] / best["bf16"], 3),
        }
        print(row, flush=True)
        rows.append(row)
    print(json.dumps({"cpu": facts.describe(), "batch_size": args.batch_size, "results": rows}))


if __name__ == "__main__":
    main()
