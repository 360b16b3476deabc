"""Shared pieces of the benchmarks: one CoOp training step, reference-style or coopipe's, and a step timer.

Why shared: `train_step.py` compares the two steps side by side and `protocol.py` extrapolates the reference's
cost of a whole seed from the same reference-style step; one definition keeps both measuring the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from coopipe.imageio import load_rgb
from coopipe.models import LoadedClip
from coopipe.prompt import PromptLearner
from coopipe.text_encoder import PromptTextEncoder, coop_logits
from coopipe.views import ViewSpec, augmented_view, normalize_batch

FeatureSource = Callable[[], torch.Tensor]


def reference_image_features(clip: LoadedClip, paths: Sequence[Path], *, decode_each_step: bool = True,
                             seed: int = 0) -> FeatureSource:
    """The reference's data path for one batch: (decode from disk,) a fresh random resized crop + flip of each
    image, then the frozen image encoder in fp32 eager, no grad. CoOp's trainer does this every step.

    ``decode_each_step``: read and decode the JPEGs inside every step, as the reference's data loader does
    (False: decode once up front, so only augmentation and the encoder are timed).
    """
    spec = ViewSpec(n_aug=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    decoded = None if decode_each_step else [load_rgb(p) for p in paths]

    def features() -> torch.Tensor:
        images = [load_rgb(p) for p in paths] if decoded is None else decoded
        views = torch.stack([augmented_view(img, clip.preprocess, spec, gen) for img in images])
        with torch.no_grad():
            return clip.model.encode_image(normalize_batch(views, clip.preprocess))

    return features


def coop_step(clip: LoadedClip, classnames: Sequence[str], image_features: FeatureSource, *, reference: bool,
              batch: int = 32, seed: int = 0) -> Callable[[], float]:
    """One CoOp step at the paper's optimiser (SGD lr 0.002, momentum 0.9, wd 5e-4, M = 16): returns the loss.

    ``reference``: the plain 77-token text pass over every class (the reference's text path); otherwise
    coopipe's (prompts cut to the longest, the shared prefix computed once). Above 100 classes the text pass
    runs in class chunks of 100 (the same work, bounded memory); the reference side recomputes each chunk's
    activations in backward (the graph of 1000 x 77-token sequences does not fit in 24 GB).
    """
    k = len(classnames)
    labels = torch.randint(0, k, (batch,), generator=torch.Generator().manual_seed(seed))
    learner = PromptLearner(clip, classnames, n_ctx=16, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    logit_scale = clip.model.logit_scale.detach()
    chunk = 100 if k > 100 else None
    if reference:
        encoder = PromptTextEncoder(clip, cut=False, share_prefix=False, class_chunk=chunk, checkpoint_chunks=k > 100)
    else:
        encoder = PromptTextEncoder(clip, cut=True, share_prefix=True, class_chunk=chunk)

    def step() -> float:
        feats = image_features()
        text = encoder(learner)
        loss = F.cross_entropy(coop_logits(feats, text, logit_scale), labels[: feats.shape[0]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def seconds_per_step(step: Callable[[], float], steps: int, *, warmup: int = 1) -> float:
    """Mean wall seconds of ``steps`` calls after ``warmup`` untimed ones (allocator, oneDNN primitives)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps
