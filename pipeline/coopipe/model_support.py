"""Which open_clip models the exact prompt text path supports, and which activation their text towers run.

Why decided from the model config: a user should learn that a model cannot work before anything is downloaded or
encoded, and every command must refuse it with the same reason. CoOp's text path (``coopipe.text_encoder``) is
exact only for open_clip's own causal text transformer pooled at the [EOS] token, fed by CLIP's BPE tokenizer
(the prompt is laid out as ``[SOS] [V]1..[V]M <class> . [EOS]`` in that tokenizer's ids). The config says when a
model departs from that, in these keys of its ``text_cfg`` (open_clip's ``TextTransformer`` reads them):

- ``hf_model_name``: a Hugging Face text model (RoBERTa, mT5, ...), not open_clip's transformer;
- ``embed_cls``: a class token appended after the text (CoCa), so [EOS] is not the pooled position;
- ``no_causal_mask``: bidirectional attention, so a prompt position sees the class name after it;
- ``pool_type`` other than ``argmax``/``eos`` (SigLIP's ``last``): pooled elsewhere than [EOS];
- ``hf_tokenizer_name``: another tokenizer (no [SOS], other ids), so the prompt layout does not apply.

:func:`text_path_support` applies these rules; ``tests/test_model_support.py`` checks them against building the
small models and running the packed text path on them.

The activation: OpenAI's CLIP was trained with QuickGELU, most open_clip tags with GELU; open_clip records it
as ``quick_gelu`` in a model config (the ``-quickgelu`` names) or in a tag's pretrained config.
:func:`tag_activation` reads it from there, :func:`coopipe.models.activation_of` from a built model's modules (what an export
records: what actually ran).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


from coopipe.compat import import_open_clip

logger = logging.getLogger(__name__)

__all__ = ["ModelEntry", "TextSupport", "config_activation", "list_supported", "tag_activation", "text_path_support",
           "unsupported_reason"]

QUICK_GELU = "QuickGELU"
GELU = "GELU"
_EOS_POOLS = (None, "argmax", "eos")


@dataclass(frozen=True)
class TextSupport:
    """Whether the exact text path supports a model, and why not."""

    supported: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One architecture of ``coopipe models``: its support and its pretrained tags with their activation."""

    name: str
    support: TextSupport
    tags: tuple[tuple[str, str], ...]  # (tag, activation)
    activation: str  # of the architecture itself (random weights, a local file)


def text_path_support(config: Mapping[str, Any] | None) -> TextSupport:
    """The support of a model from its open_clip config (``get_model_config``; None: no config found)."""
    if not config:
        return TextSupport(False, "no open_clip model config")
    text = dict(config.get("text_cfg") or {})
    if text.get("hf_model_name"):
        return TextSupport(False, f"Hugging Face text model {text['hf_model_name']}, not open_clip's causal text "
                                  f"transformer")
    if text.get("embed_cls"):
        return TextSupport(False, "the text tower appends a class token after the text (CoCa), so it does not pool "
                                  "at [EOS]")
    if text.get("no_causal_mask"):
        return TextSupport(False, "bidirectional text tower (no causal mask): prompt positions would see the class "
                                  "name after them")
    if text.get("pool_type") not in _EOS_POOLS:
        return TextSupport(False, f"the text tower pools at {text['pool_type']!r}, not at [EOS]")
    if text.get("hf_tokenizer_name"):
        return TextSupport(False, f"tokenizer {text['hf_tokenizer_name']}, not CLIP's BPE: the prompt layout "
                                  f"[SOS] context class [EOS] needs CLIP's tokens")
    return TextSupport(True)


def unsupported_reason(model_name: str, config: Mapping[str, Any] | None) -> str | None:
    """The one-line refusal every command gives for ``model_name``, or None when it is supported."""
    support = text_path_support(config)
    if support.supported:
        return None
    return (f"model {model_name} is not supported by the exact prompt text path: {support.reason}; pick a model "
            f"marked 'yes' in `coopipe models` (e.g. RN50, ViT-B-32, ViT-B-16)")


def config_activation(config: Mapping[str, Any] | None) -> str:
    return QUICK_GELU if (config or {}).get("quick_gelu") else GELU


def tag_activation(model_name: str, tag: str) -> str:
    """The activation ``model_name`` with pretrained ``tag`` was trained with: QuickGELU when the model config or
    the tag's pretrained config says ``quick_gelu``, else GELU."""
    open_clip = import_open_clip()
    config = open_clip.get_model_config(model_name)
    pretrained = open_clip.get_pretrained_cfg(model_name, tag) or {}
    return QUICK_GELU if pretrained.get("quick_gelu") else config_activation(config)


def list_supported() -> list[ModelEntry]:
    """Every open_clip architecture with its support and pretrained tags, in open_clip's order."""
    open_clip = import_open_clip()
    entries = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        tags = tuple((tag, tag_activation(name, tag)) for tag in open_clip.list_pretrained_tags_by_model(name))
        entries.append(ModelEntry(name, text_path_support(config), tags, config_activation(config)))
    return entries
