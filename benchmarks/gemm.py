"""Benchmark: the text path's frozen-weight GEMMs on PyTorch's default (MKL on the CPU) against oneDNN.

Two parts, each side by side in one run, interleaved ``--repeats`` times (median):
(a) the products a CLIP text block does (width 512: in-projection 512 -> 1536, MLP 512 -> 2048 -> 512), forward
    ``x @ W.T`` and the backward ``grad @ W``, at row counts of a K = 10 CoOp pass (72), a 3-run stack (216), a
    CoCoOp chunk (1,024, 4,272): GFLOP/s of each library;
(b) one CoOp training step (RN50 text tower, random weights, 16-shot EuroSAT shapes: K = 10, M = 16, batch 32;
    forward, backward, SGD) through ``PromptTextEncoder(gemm="blas")`` and ``gemm="auto"`` (oneDNN), alone and as
    3 runs stacked in one text pass.
Prints the CPU, the thread count and the ratios; the last line is one JSON object.

    python benchmarks/gemm.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from coopipe.frozen_gemm import FrozenGemm
from coopipe.models import load_clip
from coopipe.prompt import PromptLearner
from coopipe.stacked_text import stacked_text_features
from coopipe.text_encoder import PromptTextEncoder, coop_logits

EUROSAT = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
           "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
SHAPES = ((512, 1536), (512, 2048), (2048, 512))  # (in, out) of the block's linear layers
ROWS = (72, 216, 1024, 4272)


def _seconds(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _products(repeats: int) -> dict[str, float]:
    """GFLOP/s of forward and backward products, per row count, for each library (summed over the shapes)."""
    out: dict[str, float] = {}
    blas, onednn = FrozenGemm("blas"), FrozenGemm("onednn")
    for rows in ROWS:
        times: dict[str, list[float]] = {"blas": [], "onednn": []}
        flops = sum(2 * 2 * rows * i * o for i, o in SHAPES)  # forward + input gradient
        for _ in range(repeats):
            for name, gemm in (("blas", blas), ("onednn", onednn)):
                total = 0.0
                for i, o in SHAPES:
                    x = torch.randn(rows, i, requires_grad=True)
                    weight, bias, up = torch.randn(o, i), torch.randn(o), torch.randn(rows, o)

                    def step() -> None:
                        torch.autograd.grad(gemm.linear(x, weight, bias), x, up)  # noqa: B023

                    total += _seconds(step, 10)
                times[name].append(total)
        for name in times:
            out[f"gflops_{name}_rows{rows}"] = round(flops / statistics.median(times[name]) / 1e9, 1)
        out[f"onednn_vs_blas_rows{rows}"] = round(statistics.median(times["blas"]) / statistics.median(times["onednn"]), 2)
        print(f"rows {rows:5d}: blas {out[f'gflops_blas_rows{rows}']:6.1f} GFLOP/s, onednn "
              f"{out[f'gflops_onednn_rows{rows}']:6.1f} GFLOP/s: {out[f'onednn_vs_blas_rows{rows}']:.2f}x", flush=True)
    return out


def _coop_steps(repeats: int) -> dict[str, float]:
    """Seconds per CoOp step (1 run, and 3 runs stacked) through each GEMM library."""
    clip = load_clip("RN50", "none")
    clip.model.requires_grad_(False)
    feats = torch.randn(32, clip.embed_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    scale = clip.model.logit_scale.detach()
    out: dict[str, float] = {}
    for runs in (1, 3):
        learners = [PromptLearner(clip, EUROSAT, n_ctx=16, generator=torch.Generator().manual_seed(s))
                    for s in range(runs)]
        optimizers = [torch.optim.SGD([l.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4) for l in learners]
        encoders = {name: PromptTextEncoder(clip, gemm=name) for name in ("blas", "auto")}
        times: dict[str, list[float]] = {name: [] for name in encoders}
        for _ in range(repeats):
            for name, encoder in encoders.items():
                def step() -> None:
                    texts = stacked_text_features(encoder, learners) if runs > 1 else [encoder(learners[0])]  # noqa: B023
                    loss = sum(F.cross_entropy(coop_logits(feats, t, scale), labels) for t in texts)
                    for opt in optimizers:  # noqa: B023
                        opt.zero_grad()
                    loss.backward()  # type: ignore[union-attr]
                    for opt in optimizers:  # noqa: B023
                        opt.step()

                times[name].append(_seconds(step, 10))
        blas, auto = statistics.median(times["blas"]), statistics.median(times["auto"])
        out[f"coop_step_ms_blas_runs{runs}"] = round(blas * 1000, 1)
        out[f"coop_step_ms_onednn_runs{runs}"] = round(auto * 1000, 1)
        out[f"coop_step_onednn_vs_blas_runs{runs}"] = round(blas / auto, 2)
        print(f"CoOp step, {runs} run(s) in one text pass: blas {blas * 1000:.1f} ms, onednn {auto * 1000:.1f} ms "
              f"({blas / auto:.2f}x); per run-step {auto * 1000 / runs:.1f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    print(f"CPU: {_cpu()}, {args.threads} thread(s), AMX {amx}, torch {torch.__version__}", flush=True)
    summary: dict[str, object] = {"cpu": _cpu(), "threads": args.threads, "amx": amx}
    summary.update(_products(args.repeats))
    summary.update(_coop_steps(args.repeats))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
