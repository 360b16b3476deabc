"""OpenAI's original CLIP code (package ``clip-anytorch``, ``clip/model.py``) as the independent reference.

Random weights in OpenAI's layout, built by OpenAI's own ``clip.model.CLIP`` with the real architectures' hyper-
parameters, then scaled (see :func:`_scale_like_trained`) so that the activation the model is built with shows.
The weights pass through ``clip.model.build_model``, which rounds them to float16 as OpenAI's released weights
are; both sides then run the same fp16-representable values in float32.

Used by the differential tests (``tests/test_clip_reference.py``) and the offline-tag test, which writes the same
weights into a private Hugging Face cache where open_clip's ``openai`` tag looks for them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from coopipe.compat import import_open_clip

import_open_clip()  # makes torchvision importable (coopipe/compat.py) before clip imports it
import clip  # noqa: E402  - the original CLIP package (clip-anytorch)
from clip import model as clip_model  # noqa: E402

# clip.model.CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
#                 vocab_size, transformer_width, transformer_heads, transformer_layers), from OpenAI's released files
ARCHITECTURES: dict[str, tuple[Any, ...]] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B-32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}
# Where open_clip 3.x looks for each model's `openai` weights (open_clip/pretrained.py, `hf_hub` of the tag)
HUB_IDS = {"RN50": "timm/resnet50_clip.openai", "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
           "ViT-B-16": "timm/vit_base_patch16_clip_224.openai"}
HUB_FILE = "open_clip_pytorch_model.bin"
MLP_GAIN = 3.0  # c_fc outputs of std ~2 (about 0.7 at CLIP's init): where GELU and QuickGELU part, as in trained CLIP
PROJ_GAIN = 4.0  # residual branches that matter against the embeddings, so depth and the activation show


def _scale_like_trained(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make a freshly initialised CLIP behave less like an identity map.

    CLIP's init gives MLP pre-activations of std ~0.7 (where GELU and QuickGELU differ by < 0.01) and small residual
    branches; the ResNet's last batch-norm of every block starts at zero (its branches add nothing) and the running
    statistics are the identity. Scaled, the towers' outputs depend on every layer and on the activation.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.c_fc.weight"):
                param.mul_(MLP_GAIN)
            elif name.endswith(("mlp.c_proj.weight", "attn.out_proj.weight")):
                param.mul_(PROJ_GAIN)
            elif name.endswith("bn3.weight"):
                param.uniform_(0.2, 0.6, generator=generator)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.1, generator=generator)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5, generator=generator)


def reference_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """OpenAI's CLIP for ``name`` (float32, eval) from ``clip.model.build_model``, and its state dict in OpenAI's
    layout (what a checkpoint file holds; open_clip's CLIP uses the same parameter names)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        source = clip_model.CLIP(*ARCHITECTURES[name])
    _scale_like_trained(source, torch.Generator().manual_seed(seed + 1))
    model = clip_model.build_model(source.state_dict()).float().eval()  # float16 rounding, as OpenAI's files
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, state


def save_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A plain state-dict file (``torch.save``), as ``--pretrained FILE`` takes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_hub_cache(hf_home: Path, name: str, checkpoint: Path) -> Path:
    """Put the ``checkpoint`` file where open_clip's ``openai`` tag of ``name`` finds it offline (``HF_HOME=hf_home``,
    ``HF_HUB_OFFLINE=1``): the hub cache's ``models--<org>--<repo>/snapshots/<commit>/<file>`` plus ``refs/main``.
    The same bytes, linked where the file system allows (a second ``torch.save`` of RN50 costs about half a second)."""
    org, repo = HUB_IDS[name].split("/")
    folder = hf_home / "hub" / f"models--{org}--{repo}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    target = folder / "snapshots" / commit / HUB_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(checkpoint, target)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(checkpoint, target)
    return target


def original_preprocess(image_size: int) -> Any:
    """OpenAI's own preprocessing (``clip.clip._transform``): resize (bicubic), centre crop, RGB, normalise."""
    return clip.clip._transform(image_size)


def text_features(model: Any, embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Text features of prompt token embeddings (n, L, width) whose [EOT] is at ``eot`` (n,), through OpenAI's own
    modules as CoOp's ``TextEncoder`` runs them (KaiyangZhou/CoOp, trainers/coop.py): positional embedding, the
    transformer (sequence first, with its causal mask), ``ln_final``, the [EOT] row, the text projection."""
    x = embeddings + model.positional_embedding
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def tokenize(texts: list[str]) -> torch.Tensor:
    """OpenAI's tokenizer (``clip.tokenize``): (n, 77) ids."""
    return clip.tokenize(texts)
