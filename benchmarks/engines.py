"""Benchmark: engines for the frozen image tower on CPU, against eager PyTorch at the same precision.

Engines: ``eager`` and ``ort`` are the pipeline's own towers (``coopipe.engines.build_tower``: channels_last eager
PyTorch, and ONNX Runtime on the cached ONNX export, exported afresh here into a temporary folder so the setup
time includes the export; only if the ``onnxruntime`` and ``onnx`` packages import); ``compile`` (torch.compile,
inductor, with freezing) is measured only. Each
engine's throughput is measured interleaved with eager's in one process (the machine is shared: ratios, not
absolute rates, are what transfers), and its features are compared with eager fp32 per image (min cosine, max
abs diff). The adoption bar: >= 1.3x eager and cosine >= 0.9999 for every image.

    python benchmarks/engines.py --model RN50 --engines eager,compile,ort --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coopipe.engines import Tower, build_tower  # noqa: E402
from coopipe.hardware import probe  # noqa: E402
from coopipe.models import load_clip  # noqa: E402

Runner = Callable[[torch.Tensor], np.ndarray]


def tower_runner(tower: Tower) -> Runner:
    """The pipeline's own tower (coopipe.engines.build_tower: eager or ONNX Runtime), returning numpy."""
    return lambda x: tower(x).numpy()


def compile_runner(visual: torch.nn.Module) -> Runner:
    """torch.compile (inductor, freezing): measured only, not a pipeline engine (docs/performance.md section 3)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # fold the frozen weights into the graph (constant folding, weight prepacking)
    compiled = torch.compile(visual, backend="inductor")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return compiled(x.contiguous(memory_format=torch.channels_last)).float().numpy()

    return run


def timed(run: Runner, x: torch.Tensor) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = run(x)
    return len(x) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--engines", default="eager,compile,ort")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    facts = probe("cpu")
    print(facts.describe(), f"threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    clip = load_clip(args.model, "none")
    size = clip.preprocess.image_size
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    eager = tower_runner(build_tower(clip, "eager", "fp32", "cpu"))  # channels_last, as the encoder runs it
    _, reference = timed(eager, x)  # also the warm-up
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in [e for e in args.engines.split(",") if e != "eager"]:
            start = time.perf_counter()
            try:
                run = (compile_runner(clip.model.visual) if engine == "compile"
                       else tower_runner(build_tower(clip, "onnxruntime", "fp32", "cpu", export_dir=tmp)))
                _, out = timed(run, x)  # first call: compilation / session warm-up
            except Exception as exc:  # noqa: BLE001 - an engine that cannot run here is a result too
                print(f"{engine}: unavailable ({type(exc).__name__}: {exc})".splitlines()[0], flush=True)
                results.append({"engine": engine, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            setup = time.perf_counter() - start
            eng_rates, eager_rates = [], []
            for _ in range(args.repeats):  # interleaved: both see the same background load
                eager_rates.append(timed(eager, x)[0])
                rate, out = timed(run, x)
                eng_rates.append(rate)
            ref, got = torch.from_numpy(reference), torch.from_numpy(np.asarray(out, dtype=np.float32))
            cosine = torch.nn.functional.cosine_similarity(ref, got, dim=1)
            row = {
                "engine": engine,
                "model": args.model,
                "speedup": round(statistics.median(eng_rates) / statistics.median(eager_rates), 3),
                "engine_img_per_s": round(statistics.median(eng_rates), 2),
                "eager_img_per_s": round(statistics.median(eager_rates), 2),
                "min_cosine": round(float(cosine.min()), 7),
                "max_abs_diff": float((ref - got).abs().max()),
                "setup_s": round(setup, 1),
            }
            row["adopt"] = row["speedup"] >= 1.3 and row["min_cosine"] >= 0.9999
            print(row, flush=True)
            results.append(row)
    print(json.dumps({"cpu": facts.describe(), "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()
