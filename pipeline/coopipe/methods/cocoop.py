"""CoCoOp (Zhou et al., CVPR 2022): CoOp's unified context plus a Meta-Net that shifts it by each image's feature.

Options: M (``n_ctx``) or init words (``ctx_init``). Paper setting (``KaiyangZhou/CoOp:
configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``): M = 4 from "a photo of a", 10 epochs at every number
of shots, batch 1, CoOp's SGD and schedule. The prompt depends on the image, so there is no single classifier to
export and runs cannot share a text pass. The learner is :class:`coopipe.cocoop.CoCoOpLearner`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from coopipe.cocoop import CoCoOpLearner
from coopipe.methods.context import ContextMethod
from coopipe.methods.registry import epochs_for
from coopipe.models import LoadedClip

__all__ = ["COCOOP_EPOCHS", "CoCoOp", "CoCoOpOptions"]

COCOOP_EPOCHS = 10  # at every number of shots


@dataclasses.dataclass(frozen=True)
class CoCoOpOptions:
    n_ctx: int | None = 4
    ctx_init: str | None = "a photo of a"


class CoCoOp(ContextMethod):
    name = "cocoop"
    title = "CoCoOp"
    paper = "CoCoOp (Zhou et al., Conditional Prompt Learning for Vision-Language Models, CVPR 2022)"
    head_tensors = "context and Meta-Net"
    inference = (
        "Image-conditional prompt (CoCoOp): there is no fixed class matrix. For each image, the Meta-Net (two linear "
        "layers with a ReLU, tensors meta_net.* in prompt.safetensors) maps the normalised image feature to one vector "
        "that is added to every learned context vector (ctx); the prompts '[SOS] ctx(x) <class name>. [EOS]' of all K "
        "classes then go through the text tower of the recorded model and weights (token embeddings, transformer, "
        "final layer norm, pooling at [EOS], text projection); logits = exp(logit_scale) * cos(image, class text). "
        "coopipe predict computes it (and model.onnx, when exported with --onnx); elsewhere, rebuild it with open_clip "
        "from the recorded model."
    )
    options = CoCoOpOptions
    image_conditional = True
    batch_size = 1

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return COCOOP_EPOCHS

    def transferable(self, options: CoCoOpOptions) -> bool:
        return True  # one unified context and a Meta-Net: any class names

    def build_learner(self, options: CoCoOpOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> CoCoOpLearner:
        return CoCoOpLearner(clip, classnames, n_ctx=options.n_ctx or 4, ctx_init=options.ctx_init,
                             generator=generator)
