"""Benchmark: encode pipeline throughput against the bare image encoder, side by side in one run.

pipeline = decode (worker process) + preprocess + model + zarr write, through ``encode_split``;
bare     = the same model, precision and batch size on pre-decoded, pre-cropped uint8 tensors in memory.
The ratio pipeline/bare says how close the pipeline keeps the model to being the only cost (target >= 0.95).
The precision and the engine default to ``auto`` (resolved for this machine by coopipe.hardware and
coopipe.engines, printed with the CPU flags); the bare side runs the same ``build_tower`` as the pipeline.
Each side runs ``--repeats`` times alternately; the median is reported. Last line: one JSON object.

    python benchmarks/encode.py --images 512 [--model RN50] [--precision auto] [--engine auto] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from coopipe.datasets import load_dataset  # noqa: E402
from coopipe.encode import EncodeOptions, encode_batch, encode_split, is_conv_tower  # noqa: E402
from coopipe.engines import build_tower  # noqa: E402
from coopipe.hardware import choose_precision, probe  # noqa: E402
from coopipe.imageio import load_rgb  # noqa: E402
from coopipe.models import load_clip  # noqa: E402
from coopipe.views import center_view  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DATA))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--precision", default=EncodeOptions.precision)
    parser.add_argument("--engine", default=EncodeOptions.engine)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    dataset = load_dataset("eurosat", args.data_root)
    test = dataset.split("test")
    step = max(1, len(test) // args.images)
    positions = list(range(0, len(test), step))[: args.images]
    clip = load_clip(args.model, "none")
    facts = probe("cpu")
    opts = EncodeOptions(precision=args.precision, engine=args.engine, batch_size=args.batch_size,
                         num_workers=args.workers, progress=False)
    resolved = opts.resolved(clip)
    print(f"{facts.describe()}", flush=True)
    print(f"precision {args.precision} -> {resolved.precision} ({choose_precision(facts, conv_tower=is_conv_tower(clip)).reason})", flush=True)
    tower = build_tower(clip, args.engine, resolved.precision, resolved.device)  # as encode_split builds it
    opts = replace(resolved, engine=tower.engine)  # what actually runs (an auto fallback included)
    print(f"engine {args.engine} -> {tower.engine}", flush=True)

    decoded = torch.stack([center_view(load_rgb(dataset.image_root / test.paths[p]), clip.preprocess) for p in positions])
    encode_batch(tower, decoded[: args.batch_size], clip.preprocess)  # warm-up (allocator, oneDNN kernels)

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, len(decoded), args.batch_size):
            encode_batch(tower, decoded[i : i + args.batch_size], clip.preprocess)
        return len(decoded) / (time.perf_counter() - start)

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            encode_split(dataset, "test", cache_dir=cache, positions=positions, options=opts, clip=clip)
            return len(positions) / (time.perf_counter() - start)

    pipe_runs, bare_runs = [], []
    for _ in range(args.repeats):
        pipe_runs.append(pipeline())
        bare_runs.append(bare())
        print(f"pipeline {pipe_runs[-1]:.1f} img/s   bare {bare_runs[-1]:.1f} img/s", flush=True)
    pipe, bare_rate = statistics.median(pipe_runs), statistics.median(bare_runs)
    print(json.dumps({
        "ratio": round(pipe / bare_rate, 3),
        "pipeline_img_per_s": round(pipe, 2),
        "bare_img_per_s": round(bare_rate, 2),
        "images": len(positions),
        "model": args.model,
        "precision": opts.precision,
        "precision_requested": args.precision,
        "engine": opts.engine,
        "engine_requested": args.engine,
        "cpu": facts.describe(),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
