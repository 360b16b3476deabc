"""One ONNX graph of an exported prompt: a preprocessed image batch -> class probabilities, without PyTorch.

Input ``x``: float32 (B, 3, S, S), preprocessed as the export record says (resize the shorter side, centre crop,
scale to [0, 1], normalise by mean/std); output ``probs``: float32 (B, K), classes in the record's order; the
batch axis is dynamic. The image tower runs at fp32 and its raw features are rounded to the dtype the training
features were stored in (float16 by default: the head was fitted on rounded features, and ``coopipe predict``
rounds the same way).

- Fixed-matrix prompts (CoOp, rank prompts): ``softmax(exp(logit_scale) * normalize(f) @ text_features.T)``.
- CoCoOp: each image shifts the prompt, so there is no fixed matrix and the graph holds the text path too: the
  Meta-Net maps the normalised feature to one shift added to every context vector, the K prompts
  ``[SOS] ctx(x) <class> . [EOS]`` of each image go through the frozen text transformer (open_clip's own blocks,
  the causal mask, cut after the longest [EOS] as coopipe's ``cut`` path), pooled at [EOS], projected and
  normalised; B x K prompt rows per batch, so its cost grows with the number of classes.

The export uses the same legacy exporter settings as the cached tower export (:mod:`coopipe.engines`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.atomic import atomic_write
from coopipe.engines import OPSET
from coopipe.errors import ParamsError
from coopipe.cocoop import CoCoOpLearner
from coopipe.head import Head
from coopipe.learners import restore_learner
from coopipe.models import LoadedClip
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

__all__ = ["CoCoOpGraph", "ProbabilityGraph", "export_onnx"]

_ROUNDING = {"float16": torch.float16, "float32": None}


class ProbabilityGraph(nn.Module):
    """Image tower + fixed head + softmax (see the module docstring)."""

    text_features: torch.Tensor  # (K, D) normalised
    scale: torch.Tensor  # exp(logit_scale)

    def __init__(self, visual: nn.Module, text_features: torch.Tensor, logit_scale: float, dtype: str) -> None:
        super().__init__()
        if dtype not in _ROUNDING:
            raise ParamsError(f"feature dtype {dtype!r} has no ONNX rounding; expected one of {tuple(_ROUNDING)}")
        self.visual = visual
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))  # (K, D)
        self.register_buffer("scale", torch.tensor(logit_scale, dtype=torch.float32).exp())
        self.rounding = _ROUNDING[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.visual(x).float()  # (B, D) raw image features
        if self.rounding is not None:
            feats = feats.to(self.rounding).float()  # as the training stores hold them
        logits = self.scale * F.normalize(feats, dim=-1) @ self.text_features.t()  # (B, K)
        return logits.softmax(dim=-1)


class CoCoOpGraph(nn.Module):
    """Image tower + Meta-Net + the K conditional prompts through the text tower + softmax (module docstring)."""

    ctx: torch.Tensor  # (M, width) learned context
    sos: torch.Tensor  # (1, 1, 1, width) [SOS] embedding
    suffix: torch.Tensor  # (K, T - 1 - M, width) class name, '.', [EOS] and padding up to the longest [EOS]
    eos: torch.Tensor  # (K,) [EOS] position of each class
    positions: torch.Tensor  # (T, width) positional embeddings
    mask: torch.Tensor  # (T, T) causal mask
    scale: torch.Tensor  # exp(logit_scale)

    def __init__(self, clip: LoadedClip, learner: CoCoOpLearner, logit_scale: float, dtype: str) -> None:
        super().__init__()
        if dtype not in _ROUNDING:
            raise ParamsError(f"feature dtype {dtype!r} has no ONNX rounding; expected one of {tuple(_ROUNDING)}")
        self.tower = resolve_text_tower(clip.model)
        self.visual = clip.model.visual
        self.meta_net = learner.meta_net
        length = int(learner.eos_index.max()) + 1  # nothing after the longest [EOS] is ever pooled
        with torch.no_grad():
            full = learner.prompt_embeddings(length=length).float()  # (K, T, width)
        n_ctx = int(learner.ctx.shape[0])
        self.register_buffer("ctx", learner.ctx.detach().float())
        self.register_buffer("sos", full[:1, :1].unsqueeze(0))
        self.register_buffer("suffix", full[:, 1 + n_ctx :])
        self.register_buffer("eos", learner.eos_index.detach().clone())
        self.register_buffer("positions", self.tower.positional_embedding[:length].detach().float())
        self.register_buffer("mask", self.tower.attn_mask[:length, :length].detach().float())
        self.register_buffer("scale", torch.tensor(logit_scale, dtype=torch.float32).exp())
        self.rounding = _ROUNDING[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.visual(x).float()  # (B, D)
        if self.rounding is not None:
            feats = feats.to(self.rounding).float()
        image = F.normalize(feats, dim=-1)  # (B, D)
        ctx = self.ctx.unsqueeze(0) + self.meta_net(image).unsqueeze(1)  # (B, M, width)
        batch, (n_cls, n_suffix, width) = ctx.shape[0], self.suffix.shape
        prompts = torch.cat([
            self.sos.expand(batch, n_cls, 1, width),
            ctx.unsqueeze(1).expand(batch, n_cls, ctx.shape[1], width),
            self.suffix.unsqueeze(0).expand(batch, n_cls, n_suffix, width),
        ], dim=2)  # (B, K, T, width)
        rows = prompts.reshape(batch * n_cls, -1, width) + self.positions  # (B K, T, width)
        out = self.tower.transformer(rows, attn_mask=self.mask).reshape(batch, n_cls, -1, width)
        index = self.eos.view(1, n_cls, 1, 1).expand(batch, n_cls, 1, width)
        pooled = out.gather(2, index).squeeze(2)  # (B, K, width) at each class's [EOS]
        text = F.normalize(self.tower.project(self.tower.ln_final(pooled)), dim=-1)  # (B, K, D)
        logits = self.scale * (image.unsqueeze(1) * text).sum(dim=-1)  # (B, K)
        return logits.softmax(dim=-1)


def _graph(clip: LoadedClip, head: Head) -> nn.Module:
    if head.classifier is not None:
        clf = head.classifier
        return ProbabilityGraph(clip.model.visual, clf.text_features, clf.logit_scale, head.dtype)
    assert head.prompt is not None
    learner = restore_learner(head.prompt.spec, clip, head.classnames, head.prompt.tensors)
    if not isinstance(learner, CoCoOpLearner):
        raise ParamsError(f"{head.path}: no ONNX graph for image-conditional prompts other than CoCoOp's")
    return CoCoOpGraph(clip, learner, float(clip.model.logit_scale.detach()), head.dtype)


def export_onnx(clip: LoadedClip, head: Head, path: Path) -> Path:
    """Write the probability graph of ``head`` on ``clip`` (on the CPU, fp32) to ``path`` (atomically)."""
    clip.model.to("cpu").float().eval()
    graph = _graph(clip, head).eval()
    size = clip.preprocess.image_size
    example = torch.zeros(2, 3, size, size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # MHA's inference fast path has no ONNX export (ViT towers)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            atomic_write(path, lambda tmp: torch.onnx.export(
                graph, (example,), str(tmp), input_names=["x"], output_names=["probs"],
                dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            ))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    logger.info("wrote %s: %s image tower + %d-class head -> probabilities", path, clip.name, len(head.classnames))
    return path
