"""One ONNX graph of a fixed-matrix classifier: a preprocessed image batch -> class probabilities, without PyTorch.

The graph is ``softmax(exp(logit_scale) * normalize(round(visual(x))) @ text_features.T)``: the image tower at
fp32, its raw features rounded to the dtype the training features were stored in (float16 by default: the head
was fitted on rounded features, and ``coopipe predict`` rounds the same way), the L2 normalisation and the
(K, D) head. Input ``x``: float32 (B, 3, S, S), preprocessed as the export record says (resize the shorter side,
centre crop, scale to [0, 1], normalise by mean/std); output ``probs``: float32 (B, K), classes in the record's
order. The batch axis is dynamic.

CoCoOp cannot be one fixed graph of this kind: each image shifts the prompt, so each image needs a pass of the
text tower over all K classes (77-token causal transformer, packed per class); it is refused with that reason.
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
from coopipe.head import Head
from coopipe.models import LoadedClip

logger = logging.getLogger(__name__)

__all__ = ["ProbabilityGraph", "export_onnx"]

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


def export_onnx(clip: LoadedClip, head: Head, path: Path) -> Path:
    """Write the probability graph of ``head`` on ``clip``'s image tower to ``path`` (atomically)."""
    if head.classifier is None:
        raise ParamsError(
            f"{head.path} is an image-conditional prompt (CoCoOp): each image changes the prompt, so no fixed image "
            f"tower + class matrix graph exists; export without --onnx and use `coopipe predict` on the folder"
        )
    clf = head.classifier
    visual = clip.model.visual.to("cpu").float().eval()
    graph = ProbabilityGraph(visual, clf.text_features, clf.logit_scale, head.dtype).eval()
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
