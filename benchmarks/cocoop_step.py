"""Benchmark: a CoCoOp training step as the reference runs it against coopipe's step on cached features.

reference-style = per-image Python loop, batch 1: a freshly augmented 224px image (random resized crop + flip of a
random picture) through the frozen image encoder, the Meta-Net, the K x 77-token text pass of that image's prompts
through open_clip's transformer, cross-entropy, backward, SGD step (as ``trainers/cocoop.py``);
coopipe = cached features, the training step as ``coopipe train`` runs it (:func:`coopipe.cocoop_text.cocoop_backward`:
the batched packed path over chunks of ``--image-chunk`` images (at most ``CHUNK_ROWS`` text rows), each chunk's loss back-propagated as soon as its
logits exist, so memory holds one chunk and nothing is recomputed), SGD step, at each ``--batches`` size. Both for every K in ``--classes``. Reported: seconds per training image (median of
``--repeats`` steps after one warm-up), the ratio reference / coopipe, the peak resident memory each step adds
over the loaded model (each configuration runs in a spawned child so peaks do not mix), and inference images/s of
``cocoop_predict`` on cached test features. Last line: one JSON object.

``--load N`` times every configuration twice in its child: quiet, then again with N busy processes (pure
spinning Python loops, started just before and stopped just after that timing) beside it, and reports each
side's loaded time and slowdown (loaded / quiet). The reference-style side runs with libgomp's default waits, as
the reference runs; coopipe with its own (:mod:`coopipe.threads`); ``--plain-waits`` adds a coopipe side with
libgomp's default waits too, to show what the thread policy changes; ``--share-cores`` a coopipe side with the
opt-in cap by the cores other processes leave free (``COOPIPE_SHARE_CORES=1``, :func:`coopipe.threads.free_cores`).

    python benchmarks/cocoop_step.py [--model RN50] [--classes 10 100] [--batches 1 32] [--repeats 3] [--threads 2]
                                     [--load 1] [--plain-waits] [--share-cores]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LIBGOMP_DEFAULT_WAITS = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default spin count, set explicitly

import coopipe  # noqa: F401  # first: its thread policy (coopipe.threads) must be set before libgomp starts
import numpy as np
import torch
import torch.nn.functional as F
from coopipe.cocoop import CoCoOpLearner
from coopipe.cocoop_text import cocoop_predict
from coopipe.hardware import probe
from coopipe import threads
from coopipe.models import LoadedClip, load_clip
from coopipe.text_encoder import PromptTextEncoder
from coopipe.train_config import TrainConfig
from coopipe.views import ViewSpec, augmented_view, normalize_batch
from PIL import Image


def _names(k: int) -> list[str]:
    words = ["forest", "river", "sea or lake", "annual crop", "highway", "pasture", "residential", "industrial"]
    return [f"{words[i % len(words)]} {i}" for i in range(k)]  # uneven lengths, distinct


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu() -> str:
    """The CPU's flags line (coopipe.hardware.probe) plus its family and model: the flags alone do not tell a Zen 4
    from a Zen 5 (docs/performance.md section 8)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("cpu family", "model") and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    family = f" cpu family {fields['cpu family']} model {fields['model']}" if len(fields) == 2 else ""
    return probe().describe() + family


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak read later is this step's, not the model load's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then includes loading, which only overstates coopipe and the reference
        pass


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _busy(n: int) -> Iterator[None]:
    """N processes that only spin (a Python loop each), as other jobs sharing the CPU; stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0.0)  # let them start and take their share of the cores
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _time(step: Callable[[], None], repeats: int, *, warm_up: bool = True) -> float:
    if warm_up:
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _reference_step(clip: LoadedClip, k: int, rng: np.random.Generator) -> Callable[[], None]:
    model = clip.model
    learner = CoCoOpLearner(clip, _names(k), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    spec, gen = ViewSpec(n_aug=1), torch.Generator().manual_seed(0)

    def augment(img: Image.Image) -> torch.Tensor:  # random resized crop + flip + normalise, as the reference
        return normalize_batch(augmented_view(img, clip.preprocess, spec, gen).unsqueeze(0), clip.preprocess)[0]

    picture = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    eos = learner.tokenized_prompts.argmax(dim=-1)  # (K,)
    label = torch.tensor([0])

    def step() -> None:
        with torch.no_grad():
            image = model.encode_image(augment(picture).unsqueeze(0))  # (1, D), frozen
        image = image / image.norm(dim=-1, keepdim=True)
        shift = learner.meta_net(image)  # (1, width)
        logits = []
        for feat, h in zip(image, shift):  # the reference's per-image loop
            ctx = (learner.ctx + h).unsqueeze(0).expand(k, -1, -1)  # (K, M, width)
            x = torch.cat([learner.token_prefix, ctx, learner.token_suffix], dim=1)  # (K, 77, width)
            x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
            text = model.ln_final(x)[torch.arange(k), eos] @ model.text_projection  # (K, D)
            text = text / text.norm(dim=-1, keepdim=True)
            logits.append(model.logit_scale.exp() * feat @ text.t())
        loss = F.cross_entropy(torch.stack(logits), label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _coopipe_step(clip: LoadedClip, k: int, batch: int, image_chunk: int) -> Callable[[], None]:
    learner = CoCoOpLearner(clip, _names(k), generator=torch.Generator().manual_seed(0))
    encoder = PromptTextEncoder(clip)  # TrainConfig's text-path defaults
    opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    feats = torch.randn(batch, clip.embed_dim)
    labels = torch.randint(0, k, (batch,))

    def step() -> None:
        opt.zero_grad()
        learner.loss_backward(encoder, feats, labels, clip.model.logit_scale, image_chunk=image_chunk)
        opt.step()

    return step


def _measure(args: argparse.Namespace, kind: str, k: int, batch: int, out: Any) -> None:
    """Run in a fresh (spawned) child: time one configuration, report seconds per image and the peak RSS it adds.

    Spawned, not forked: a child forked after the parent's OpenMP pool has run can hang on its first parallel
    region (seen here with torch's CPU build)."""
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, "none")
    clip.model.requires_grad_(False)
    _reset_peak()
    base = _rss_mb()
    if kind == "reference":
        step = _reference_step(clip, k, np.random.default_rng(0))
    else:
        step = _coopipe_step(clip, k, batch, args.image_chunk)
    seconds = _time(step, args.repeats)
    row = {"kind": kind, "K": k, "batch": batch, "s_per_image": seconds / batch, "peak_mb": round(_peak_mb() - base, 1),
           "torch_threads": torch.get_num_threads(), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    if args.load:
        with _busy(args.load):
            loaded = _time(step, args.repeats, warm_up=False)
        row.update(loaded_s_per_image=loaded / batch, slowdown=round(loaded / seconds, 2))
    out.put(row)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while a child is spawned (it inherits them before it imports torch)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _inference(clip: LoadedClip, k: int, n: int, image_chunk: int) -> float:
    learner = CoCoOpLearner(clip, _names(k), generator=torch.Generator().manual_seed(0))
    encoder = PromptTextEncoder(clip, class_chunk=max(k // 2, 1))
    feats = torch.randn(n, clip.embed_dim)
    cocoop_predict(encoder, learner, feats[:image_chunk], clip.model.logit_scale, image_chunk=image_chunk)  # warm-up
    t0 = time.perf_counter()
    cocoop_predict(encoder, learner, feats, clip.model.logit_scale, batch_size=n, image_chunk=image_chunk)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-chunk", type=int, default=TrainConfig.image_chunk,
                        help="images per chunk (default: training's; capped at coopipe.cocoop_text.CHUNK_ROWS rows)")
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--load", type=int, default=0, help="busy processes beside a second, loaded timing of each side")
    parser.add_argument("--plain-waits", action="store_true",
                        help="also time coopipe with libgomp's default waits (GOMP_SPINCOUNT=300000)")
    parser.add_argument("--share-cores", action="store_true",
                        help="also time coopipe with the opt-in free-core cap (COOPIPE_SHARE_CORES=1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, "none")
    clip.model.requires_grad_(False)
    ctx = mp.get_context("spawn")
    print(_cpu(), f"threads={args.threads} load={args.load} torch={torch.__version__}", flush=True)
    sides = [("reference", 1)] + [("coopipe", b) for b in args.batches]
    sides += [("coopipe-plain", b) for b in args.batches] if args.plain_waits else []
    sides += [("coopipe-shared", b) for b in args.batches] if args.share_cores else []
    rows = []
    for k in args.classes:
        for kind, batch in sides:
            queue = ctx.Queue()
            child = ctx.Process(target=_measure, args=(args, kind, k, batch, queue))
            with _environ(LIBGOMP_DEFAULT_WAITS if kind in ("reference", "coopipe-plain")
                          else {threads.SHARE_VARIABLE: "1"} if kind == "coopipe-shared" else {}):
                child.start()
            row = queue.get()
            child.join()
            rows.append(row)
            loaded = (f", loaded {row['loaded_s_per_image'] * 1000:9.1f} ms/image ({row['slowdown']:.2f}x)"
                      if args.load else "")
            print(f"K={k:4d} {kind:13s} batch {batch:3d}: {row['s_per_image'] * 1000:9.1f} ms/image{loaded}, "
                  f"peak +{row['peak_mb']:.0f} MB", flush=True)
    summary: dict[str, Any] = {"model": args.model, "threads": args.threads, "cpu": os.cpu_count(),
                               "cpu_facts": _cpu(), "load": args.load, "rows": rows}
    for k in args.classes:
        ref = next(r for r in rows if r["K"] == k and r["kind"] == "reference")
        if args.load:
            summary[f"slowdown_K{k}_reference"] = ref["slowdown"]
        for r in rows:
            if r["K"] != k or r["kind"] == "reference":
                continue
            side = f"K{k}_b{r['batch']}" + {"coopipe-plain": "_plain", "coopipe-shared": "_shared"}.get(r["kind"], "")
            summary[f"speedup_{side}"] = round(ref["s_per_image"] / r["s_per_image"], 2)
            if r["kind"] == "coopipe":
                summary[f"mem_ratio_{side}"] = round(r["peak_mb"] / max(ref["peak_mb"], 1e-9), 3)
            if args.load:
                summary[f"slowdown_{side}"] = r["slowdown"]
                summary[f"loaded_speedup_{side}"] = round(ref["loaded_s_per_image"] / r["loaded_s_per_image"], 2)
        with torch.no_grad():
            summary[f"inference_img_per_s_K{k}"] = round(_inference(clip, k, args.test_images, args.image_chunk), 2)
        print(f"K={k}: inference {summary[f'inference_img_per_s_K{k}']} images/s", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
