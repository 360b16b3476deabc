"""Benchmark: R CoOp runs (seeds) trained (a) as R one-thread processes side by side, (b) stacked in one process
with all threads (one text pass per step for the R runs), (c) one after another in one process with all threads.

Synthetic cached features (random (N, V, D) tensors of EuroSAT's 16-shot shapes: N = 160, V = 17, D = 1024, K = 10),
RN50 with random weights (``pretrained="none"``), the paper's config (batch 32, 200-epoch schedule) stopped after
``--epochs`` epochs (5 steps each), so no encoding is needed. Each mode runs in its own subprocess(es), so peak RSS
is its own; side by side, the R processes load the model, wait for each other, then train together (the wall time
is from the common start to the last end). Also checks that the stacked contexts equal the sequential ones.
Prints throughput ratios and peak RSS; the last line is one JSON object. ``--device cuda`` runs every mode there.

    python benchmarks/stacked.py [--runs 3] [--epochs 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
EUROSAT = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
           "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
N_IMAGES, N_VIEWS, DIM, BATCH = 160, 17, 1024, 32


def _work(mode: str, seeds: list[int], epochs: int, threads: int, device: str, sync: str, out: str) -> dict:
    """In a subprocess: train ``seeds`` (stacked, or one after another) and report times and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from coopipe.models import load_clip
    from coopipe.loop import StackedRun
    from coopipe.stacked import train_stacked
    from coopipe.train import train_prompt
    from coopipe.train_config import TrainConfig

    clip = load_clip("RN50", "none", device=device)
    runs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        feats = torch.randn(N_IMAGES, N_VIEWS, DIM, generator=g)
        labels = torch.arange(len(EUROSAT)).repeat_interleave(N_IMAGES // len(EUROSAT))
        runs.append(StackedRun(feats, labels, EUROSAT, TrainConfig(seed=seed, batch_size=BATCH), stop_after=epochs))
    Path(sync, f"ready-{os.getpid()}").touch()
    while len(list(Path(sync).glob("ready-*"))) < int(os.environ["STACK_BENCH_PROCS"]):
        time.sleep(0.005)
    start = time.time()
    if mode == "stacked":
        results = train_stacked(runs, clip, max_stack=len(runs))
    else:
        results = [train_prompt(r.train_feats, r.train_labels, clip, r.classnames, r.config, stop_after=epochs)
                   for r in runs]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.time()
    torch.save({seed: r.ctx for seed, r in zip(seeds, results)}, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {"start": start, "end": end, "peak_rss_mb": peak, "gpu_peak_mb": gpu}


def _mode(mode: str, groups: list[list[int]], epochs: int, threads: int, device: str) -> dict:
    """Run ``groups`` (one subprocess each, side by side) and gather their figures."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "STACK_BENCH_PROCS": str(len(groups)), "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": f"{ROOT / 'pipeline'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs = []
        for i, seeds in enumerate(groups):
            code = ("import json,sys; sys.path.insert(0, %r); import stacked as b; print('RESULT', json.dumps("
                    "b._work(%r, %r, %d, %d, %r, %r, %r)))" % (str(Path(__file__).parent), mode, seeds, epochs,
                                                               threads, device, tmp, f"{tmp}/ctx{i}.pt"))
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
        figures = []
        for proc in procs:
            stdout, stderr = proc.communicate()
            line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{mode} failed:\n{stderr[-3000:]}")
            figures.append(json.loads(line[len("RESULT "):]))
        import torch

        ctx = {}
        for i in range(len(groups)):
            ctx.update(torch.load(f"{tmp}/ctx{i}.pt"))
    wall = max(f["end"] for f in figures) - min(f["start"] for f in figures)
    return {"wall_s": wall, "peak_rss_mb": sum(f["peak_rss_mb"] for f in figures),
            "gpu_peak_mb": sum(f["gpu_peak_mb"] for f in figures), "ctx": ctx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    seeds = list(range(1, args.runs + 1))
    steps = args.runs * args.epochs * (N_IMAGES // BATCH)
    side = _mode("sequential", [[s] for s in seeds], args.epochs, 1, args.device)
    stacked = _mode("stacked", [seeds], args.epochs, args.threads, args.device)
    sequential = _mode("sequential", [seeds], args.epochs, args.threads, args.device)
    stacked_1t = _mode("stacked", [seeds], args.epochs, 1, args.device)  # the work saved per core, no threading
    sequential_1t = _mode("sequential", [seeds], args.epochs, 1, args.device)
    parts = [seeds[i::args.threads] for i in range(min(args.threads, len(seeds)))]  # as the sweep splits a group
    stacks = _mode("stacked", parts, args.epochs, 1, args.device)  # one one-thread stack per core, side by side
    diff = max(float((stacked["ctx"][s] - sequential["ctx"][s]).abs().max()) for s in seeds)
    figures: dict[str, object] = {"runs": args.runs, "steps_per_run": steps // args.runs, "device": args.device,
                                  "threads": args.threads, "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, m in (("side_by_side", side), ("stacked", stacked), ("sequential", sequential),
                    ("stacked_1thread", stacked_1t), ("sequential_1thread", sequential_1t),
                    ("stacks_side_by_side", stacks)):
        figures[f"{name}_s"] = round(m["wall_s"], 3)
        figures[f"{name}_steps_per_s"] = round(steps / m["wall_s"], 2)
        figures[f"{name}_peak_rss_mb"] = round(m["peak_rss_mb"])
        if args.device.startswith("cuda"):
            figures[f"{name}_gpu_peak_mb"] = round(m["gpu_peak_mb"])
        print(f"{name:19s} {m['wall_s']:7.2f} s  {steps / m['wall_s']:7.2f} steps/s  peak RSS {m['peak_rss_mb']:.0f} MB",
              flush=True)
    figures["stacked_vs_side_by_side"] = round(side["wall_s"] / stacked["wall_s"], 3)
    figures["stacked_vs_sequential"] = round(sequential["wall_s"] / stacked["wall_s"], 3)
    figures["stacks_side_by_side_vs_side_by_side"] = round(side["wall_s"] / stacks["wall_s"], 3)
    figures["stacked_1thread_vs_side_by_side"] = round(side["wall_s"] / stacked_1t["wall_s"], 3)
    figures["stacked_1thread_vs_sequential_1thread"] = round(sequential_1t["wall_s"] / stacked_1t["wall_s"], 3)
    figures["max_abs_ctx_diff_stacked_vs_sequential"] = diff
    print(f"one-thread stacks per core / side by side: {figures['stacks_side_by_side_vs_side_by_side']:.2f}x faster; "
          f"stacked / side by side: {figures['stacked_vs_side_by_side']:.2f}x faster; stacked / sequential: "
          f"{figures['stacked_vs_sequential']:.2f}x faster; stacked on 1 thread / side by side: "
          f"{figures['stacked_1thread_vs_side_by_side']:.2f}x; stacked / sequential on 1 thread: "
          f"{figures['stacked_1thread_vs_sequential_1thread']:.2f}x; stacked contexts = sequential ones to {diff:.1e}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
