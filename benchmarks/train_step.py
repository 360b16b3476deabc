"""Benchmark: one CoOp training step, reference-style against coopipe, side by side in one run.

(a) reference-style step (what CoOp's trainer does every step): encode 32 freshly augmented images with the
    frozen image encoder (fp32, no grad), then the plain 77-token text pass over all K classes, backward to
    the context, SGD step. At K = 1000 the text pass runs in class chunks (the same work, bounded memory).
(b) coopipe's step: 32 cached image features from the EuroSAT store, the text pass cut to the longest prompt
    with the shared [SOS][V]1..[V]M prefix computed once, backward, SGD step.
Each (side, K) runs in its own subprocess so its peak RSS is its own. Then a 16-shot EuroSAT CoOp training
run (200 epochs, paper setting) from the warm cache is timed end to end (subprocess: `coopipe train`).
Needs the EuroSAT cache: `coopipe encode --dataset eurosat --data-root ../shared/data --pretrained none
--views 16 --shots 16 --seeds 1` (or the pipeline's encode stage). Last line: one JSON object.

    python benchmarks/train_step.py [--cache cache] [--ks 10,100,1000] [--skip-e2e]
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


def _classnames(k: int, eurosat_names: list[str]) -> list[str]:
    if k <= len(eurosat_names):
        return eurosat_names[:k]
    from coopipe.compat import import_open_clip

    import_open_clip()
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES[:k])


def _one_side(side: str, k: int, steps: int, cache: str) -> dict:
    """Run in a subprocess: time ``steps`` steps of one side after one warm-up step; report peak RSS."""
    import torch

    from _common import coop_step, reference_image_features, seconds_per_step
    from coopipe.models import load_clip
    from coopipe.store import find_stores

    clip = load_clip("RN50", "none")
    stores = find_stores(cache, "eurosat", "train", model="RN50", weights=clip.weights_id)
    if not stores:
        raise SystemExit(f"no EuroSAT train store under {cache}: run the encode command in this file's docstring")
    store = stores[0]  # the one with the most views
    names = _classnames(k, store.classnames())
    if side == "reference":
        # images decoded once up front: this step times augmentation + image encoder + text pass (protocol.py's
        # reference step decodes from disk every step, as the reference's data loader does)
        data_root = ROOT.parent / "shared" / "data" / "eurosat" / "2750"
        paths = [data_root / p for p in store.paths()[:32]]
        image_features = reference_image_features(clip, paths, decode_each_step=False)
    else:
        rows = list(range(min(32, store.n_rows)))
        cached = torch.from_numpy(store.read(rows, view=1 if store.n_views > 1 else 0))

        def image_features() -> torch.Tensor:
            return cached

    step = coop_step(clip, names, image_features, reference=side == "reference")
    # one reference step at K = 1000 takes minutes: no warm-up there
    seconds = seconds_per_step(step, steps, warmup=0 if side == "reference" and k >= 1000 else 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "k": k, "step_s": seconds, "peak_rss_mb": peak_mb, "steps": steps}


def _run_side(side: str, k: int, steps: int, cache: str) -> dict:
    code = (
        "import json,sys; sys.path.insert(0, %r); import train_step as b; "
        "print('RESULT', json.dumps(b._one_side(%r, %d, %d, %r)))" % (str(Path(__file__).parent), side, k, steps, cache)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} K={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _e2e(cache: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "coopipe.cli", "train", "--features", cache, "--dataset", "eurosat", "--shots", "16",
             "--seed", "1", "--out", out, "--no-progress"], capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"end-to-end training failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
        print(res.stdout.strip().splitlines()[-1], flush=True)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--ks", default="10,100,1000")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    steps = {10: (3, 20), 100: (2, 5), 1000: (1, 2)}
    figures: dict[str, float | int | None] = {}
    for k in [int(x) for x in args.ks.split(",")]:
        n_ref, n_ours = steps.get(k, (1, 3))
        ref = _run_side("reference", k, n_ref, args.cache)
        ours = _run_side("coopipe", k, n_ours, args.cache)
        ratio = ref["step_s"] / ours["step_s"]
        print(f"K={k:5d}  reference {ref['step_s']:.3f} s/step ({ref['peak_rss_mb']:.0f} MB peak)   "
              f"coopipe {ours['step_s']:.4f} s/step ({ours['peak_rss_mb']:.0f} MB peak)   ratio {ratio:.1f}x", flush=True)
        figures[f"ratio_k{k}"] = round(ratio, 2)
        figures[f"reference_step_s_k{k}"] = round(ref["step_s"], 4)
        figures[f"coopipe_step_s_k{k}"] = round(ours["step_s"], 4)
        figures[f"reference_peak_mb_k{k}"] = round(ref["peak_rss_mb"])
        figures[f"coopipe_peak_mb_k{k}"] = round(ours["peak_rss_mb"])
    figures["coop16_eurosat_s"] = None if args.skip_e2e else round(_e2e(args.cache), 1)
    if figures["coop16_eurosat_s"] is not None:
        print(f"16-shot EuroSAT CoOp, 200 epochs, warm cache: {figures['coop16_eurosat_s']:.1f} s end to end", flush=True)
    import torch

    figures["threads"] = torch.get_num_threads()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
