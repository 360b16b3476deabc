"""Benchmark: every registered trained method's training cost on the feature cache, side by side in one run, against
its reference-style cost, at 16 shots on EuroSAT (K = 10) and at K = 100 classes (synthetic features).

For each method (the registry's, in registration order: a method added as a module is benchmarked with no list to
update; ``--methods`` picks some; training-free methods, whose paper epochs are 0, have no training step):

- **coopipe**: the production loop (:func:`coopipe.train.train_prompt`, the loop `coopipe train` runs) on the
  cached features for ``--epochs`` epochs: seconds per training image = the epochs' time over the images they saw
  (:mod:`coopipe.cost`), plus the method's one-off setup (learner, ``prepare``); the paper-length run it implies
  (setup + per-image time x images x paper epochs) and its ratio to CoOp's;
- **reference-style**: what the method's reference does per training image.
  Methods whose reference re-encodes augmented images every step (``--reencode``; default: the Dassl-based
  trainers CoOp, CoCoOp, KgCoOp, ProGrad and CLIP-Adapter; TaskRes, whose ``trainers/taskres.py``
  ``CustomCLIP.forward`` runs the image encoder on every training batch; and Tip-Adapter-F, whose ``main.py``
  ``run_tip_adapter_F`` encodes every batch of its augmented ``train_loader_F``): a fresh random resized crop + flip
  of each image through the frozen image encoder (fp32, eager, no grad; :func:`_common.reference_image_features`,
  measured once on EuroSAT images and added per image) plus the method's step with the reference's plain 77-token
  text path (no prompt cut, no shared prefix). The others (features cached by their reference: LP++, and CLAP,
  whose ``trainers/adapters.py`` extracts 20 augmented epochs of features once and trains on them through
  ``forward_features``): the method's own step in a plain PyTorch loop over the same features (:func:`plain_loop`: one
  ``class_text_features`` + loss + backward + step per batch, written as the references write their loops).

The 16-shot EuroSAT features come from the cache (``--cache``; encode with ``coopipe encode --dataset eurosat
--data-root ../shared/data --pretrained none --views 16 --shots 16 --seeds 1``), else synthetic features of the same
shape, said on the first line. Timings share the CPU with whatever else runs: say so beside any figure.
Prints the CPU, one line per method and K with the ratio reference / coopipe, and one JSON object as the last line.

    python benchmarks/methods.py [--methods coop,kgcoop] [--ks 10,100] [--epochs 1] [--steps 5] [--shots 16]
                                 [--k100-shots 16] [--cache cache] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import coopipe  # noqa: E402,F401  # first: its thread policy must be set before libgomp starts
import torch  # noqa: E402

from _common import reference_image_features, seconds_per_step  # noqa: E402
from cocoop_step import _cpu, _names  # noqa: E402
from coopipe.baselines import dataset_template  # noqa: E402
from coopipe.learners import FitData, StepInputs, is_image_conditional  # noqa: E402
from coopipe.methods import MethodSpec  # noqa: E402
from coopipe.models import LoadedClip, load_clip  # noqa: E402
from coopipe.sweep.plan import registered_methods  # noqa: E402
from coopipe.text_encoder import coop_logits  # noqa: E402
from coopipe.train import train_prompt  # noqa: E402
from coopipe.train_config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REENCODE = "coop,cocoop,kgcoop,prograd,clipadapter,taskres,tipadapterf"  # references that encode images every step
TEMPLATE = dataset_template("eurosat")  # its hand-crafted prompt, for methods with zero-shot text features


@dataclasses.dataclass(frozen=True)
class Features:
    """A few-shot training split as the loop reads it: raw features (N, V, D), labels (N,), class names."""

    feats: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    source: str


def synthetic(clip: LoadedClip, k: int, shots: int, views: int = 17, seed: int = 0) -> Features:
    """Class-clustered random features of CLIP's width (the cost does not depend on their values)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, clip.embed_dim, generator=gen)
    labels = torch.arange(k).repeat_interleave(shots)
    feats = centres[labels].unsqueeze(1) + 0.5 * torch.randn(len(labels), views, clip.embed_dim, generator=gen)
    return Features(feats, labels, _names(k), f"synthetic K={k}, {shots} shots, {views} views")


def eurosat(clip: LoadedClip, cache: Path, shots: int) -> Features:
    """The cached 16-shot EuroSAT training split (seed 1), or synthetic features of its shape when absent."""
    from coopipe.errors import CoopipeError
    from coopipe.features import read_split, select_store
    from coopipe.lookup import fewshot_index_for

    try:
        index = fewshot_index_for(cache, "eurosat", shots, 1, clip)
        store = select_store(cache, "eurosat", "train", model=clip.name, weights=clip.weights_id,
                             positions=index.train_indices, need_views=True)
        split = read_split(store, index.train_indices)
        return Features(torch.as_tensor(split.features), torch.as_tensor(split.labels), list(split.classnames),
                        f"EuroSAT cache {store.path}")
    except CoopipeError as exc:
        print(f"no {shots}-shot EuroSAT cache under {cache} ({exc}): synthetic features of its shape", flush=True)
        data = synthetic(clip, 10, shots)
        return dataclasses.replace(data, source=f"synthetic in place of EuroSAT ({data.source})")


def coopipe_cost(clip: LoadedClip, spec: MethodSpec, data: Features, shots: int, epochs: int) -> dict[str, float]:
    """The production loop for ``epochs`` epochs: setup seconds and seconds per training image."""
    config = TrainConfig.for_method(spec, shots, "eurosat", max_epoch=epochs, warmup_epoch=0)
    result = train_prompt(data.feats, data.labels, clip, data.classnames, config, template=TEMPLATE, dataset="eurosat")
    seen = len(data.labels) * len(result.history)
    return {"setup_s": result.setup_seconds, "s_per_image": sum(r.seconds for r in result.history) / max(seen, 1)}


def plain_loop(clip: LoadedClip, spec: MethodSpec, data: Features, *, reference_text: bool,
               seed: int = 0) -> tuple[Callable[[], float], int]:
    """The method's training step in a plain PyTorch loop, as the references write theirs: a batch of features
    (a random cached view of each image), the learner's class text features (``reference_text``: the plain
    77-token text path), logits, the method's loss, backward, the method's optimiser. Returns (step, batch)."""
    config = TrainConfig.for_method(spec, 16, "eurosat", cut=not reference_text, share_prefix=not reference_text)
    gen = torch.Generator().manual_seed(seed)
    learner = spec.build_learner(clip, data.classnames, generator=torch.Generator().manual_seed(seed))
    scale = clip.model.logit_scale.detach()
    spec.definition.prepare(learner, FitData(data.feats, data.labels, None, None, tuple(data.classnames), TEMPLATE,
                                             clip, scale))
    encoder = config.text_encoder(clip)
    params = {name: p for name, p in learner.named_parameters() if p.requires_grad}
    optimizer = spec.definition.optimizer(params, config.optimization())
    batch = min(config.batch_size, len(data.labels))

    def step() -> float:
        idx = torch.randperm(len(data.labels), generator=gen)[:batch]
        views = torch.randint(0, data.feats.shape[1], (batch,), generator=gen)
        image, target = data.feats[idx, views], data.labels[idx]
        optimizer.zero_grad()
        backward = getattr(learner, "loss_backward", None) if is_image_conditional(learner) else None
        if backward is not None:  # back-propagates itself (CoCoOp)
            loss, _ = backward(encoder, image, target, scale, image_chunk=config.image_chunk)
        else:
            text = None if is_image_conditional(learner) else learner.class_text_features(encoder)
            logits = (learner.logits(encoder, image, scale) if text is None else coop_logits(image, text, scale))
            loss = learner.loss(logits.float(), target, StepInputs(image=image, text=text, logit_scale=scale))
            loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, batch


def encode_seconds_per_image(clip: LoadedClip, batches: int) -> float:
    """The reference's per-image data path: a fresh augmented crop of a decoded EuroSAT image through the frozen
    image encoder, fp32 eager, batches of 32 (CoOp's), after one untimed batch."""
    folder = ROOT.parent / "shared" / "data" / "eurosat" / "2750"
    paths = sorted(folder.glob("*/*.jpg"))[:: 97][:32]
    if not paths:
        raise SystemExit(f"no EuroSAT images under {folder}: the reference-style encoding needs real images")
    features = reference_image_features(clip, paths, decode_each_step=False)
    return seconds_per_step(features, batches) / len(paths)


def trained_methods(names: Sequence[str] | None) -> list[MethodSpec]:
    """The registered methods (or ``names``) that suit EuroSAT and train (paper epochs above 0)."""
    specs = [MethodSpec.parse(n) for n in names] if names else list(registered_methods("eurosat"))
    return [s for s in specs if s.paper_epochs(16, "eurosat") > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="method labels (default: every registered trained method)")
    parser.add_argument("--ks", default="10,100", help="10 = 16-shot EuroSAT; other K: synthetic features")
    parser.add_argument("--epochs", type=int, default=1, help="production-loop epochs timed per method and K")
    parser.add_argument("--steps", type=int, default=5, help="plain-loop steps timed (after one untimed)")
    parser.add_argument("--encode-batches", type=int, default=2, help="reference encoder batches of 32 timed")
    parser.add_argument("--shots", type=int, default=16, help="EuroSAT shots (the cache's few-shot draw, seed 1)")
    parser.add_argument("--k100-shots", type=int, default=16, help="shots per class of the synthetic K sets")
    parser.add_argument("--reencode", default=REENCODE, help="methods whose reference re-encodes images per step")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, "none")
    clip.model.requires_grad_(False)
    specs = trained_methods(args.methods.split(",") if args.methods else None)
    reencode = set(args.reencode.split(","))
    print(f"{_cpu()} threads={torch.get_num_threads()} torch={torch.__version__} model={args.model} (random weights)",
          flush=True)
    encode_s = encode_seconds_per_image(clip, args.encode_batches) if reencode & {s.method for s in specs} else None
    if encode_s is not None:
        print(f"reference image path: {encode_s * 1e3:.1f} ms/image (fresh crop + frozen encoder, fp32)", flush=True)
    rows: list[dict[str, Any]] = []
    for k in (int(x) for x in args.ks.split(",")):
        data = eurosat(clip, Path(args.cache), args.shots) if k == 10 else synthetic(clip, k, args.k100_shots)
        shots = args.shots if k == 10 else args.k100_shots
        print(f"K={k}: {data.source}, {len(data.labels)} training images", flush=True)
        for spec in specs:
            ours = coopipe_cost(clip, spec, data, shots, args.epochs)
            again = spec.method in reencode
            step, batch = plain_loop(clip, spec, data, reference_text=again)
            ref = seconds_per_step(step, args.steps) / batch + (encode_s if again else 0.0)
            paper = spec.paper_epochs(shots, "eurosat")
            row = {"method": spec.label(), "K": k, "images": len(data.labels), "reference": "re-encodes" if again
                   else "cached features", "coopipe_s_per_image": ours["s_per_image"], "setup_s": ours["setup_s"],
                   "reference_s_per_image": ref, "ratio": ref / ours["s_per_image"], "paper_epochs": paper,
                   "run_s": ours["setup_s"] + ours["s_per_image"] * len(data.labels) * paper}
            rows.append(row)
            print(f"K={k:4d} {spec.label():12s} coopipe {ours['s_per_image'] * 1e3:9.3f} ms/image "
                  f"(setup {ours['setup_s']:.2f} s)   reference-style ({row['reference']}) "
                  f"{ref * 1e3:9.3f} ms/image   ratio {row['ratio']:.1f}x   paper run {row['run_s']:.1f} s", flush=True)
    summary: dict[str, Any] = {"cpu": _cpu(), "threads": torch.get_num_threads(), "model": args.model,
                               "epochs": args.epochs, "steps": args.steps, "encode_s_per_image": encode_s, "rows": rows}
    for row in rows:
        coop = next((r for r in rows if r["K"] == row["K"] and r["method"] == "coop"), None)
        summary[f"ratio_{row['method']}_K{row['K']}"] = round(row["ratio"], 2)
        if coop is not None:
            summary[f"x_coop_{row['method']}_K{row['K']}"] = round(row["run_s"] / coop["run_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
