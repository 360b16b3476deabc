"""The part of a trained prompt that turns raw image features into class logits, whether it comes from a run folder
or from an exported folder.

Why one type: ``coopipe predict`` must give the same answer for a run and for its export, so both are read into a
:class:`Head` and the same code computes the logits. A prompt that does not depend on the image (CoOp, rank
prompts) is one fixed (K, D) matrix of normalised class text features (:class:`~coopipe.classifier.Classifier`);
an image-conditional prompt (CoCoOp) is its learned tensors (context and Meta-Net), which need CLIP's text tower
for every image, so its logits need the loaded model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coopipe.checkpoint import Checkpoint
from coopipe.classifier import Classifier
from coopipe.encode import EncodeOptions
from coopipe.errors import CheckpointError, StoreError
from coopipe.evaluate import check_finite_logits, classifier_logits
from coopipe.learners import predict_logits, restore_learner
from coopipe.lookup import checkpoint_pretrained
from coopipe.methods import MethodSpec
from coopipe.models import LoadedClip, load_clip
from coopipe.store import open_store
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = ["TEXT_PATH_OPTIONS", "Head", "ImagePrompt", "head_of_checkpoint", "head_of_run", "run_encoding", "text_path_options"]

# the text-path options of a training config that change how a prompt's text features are computed
TEXT_PATH_OPTIONS = ("cut", "share_prefix", "class_chunk", "checkpoint_chunks", "autocast_bf16")


def run_encoding(ckpt: Checkpoint) -> tuple[str, str]:
    """(precision, dtype) of the features the run was trained on (its recorded train store), so that new images
    are encoded as its stores were; ``coopipe encode``'s defaults when that store is gone."""
    defaults = EncodeOptions()
    ref = (ckpt.meta.get("stores") or {}).get("train") or {}
    path = ref.get("path") if isinstance(ref, dict) else None
    if path and Path(path).is_dir():
        try:
            prov = open_store(path).provenance
            return str(prov.get("precision", defaults.precision)), str(prov.get("dtype", defaults.dtype))
        except StoreError as exc:
            logger.warning("cannot read the run's train store %s (%s); using encode defaults", path, exc)
    logger.info("run %s: its train store is not available; encoding at %s, %s", ckpt.path, defaults.precision,
                defaults.dtype)
    return defaults.precision, defaults.dtype


def text_path_options(ckpt: Checkpoint) -> dict[str, Any]:
    """The text-path options ``ckpt`` was trained with (what its text encoder is built with)."""
    config = ckpt.config
    return {name: getattr(config, name) for name in TEXT_PATH_OPTIONS}


@dataclass(frozen=True)
class ImagePrompt:
    """An image-conditional prompt: its method, its learned tensors by name and the text-path options."""

    spec: MethodSpec
    tensors: dict[str, torch.Tensor] = field(repr=False)
    text_options: dict[str, Any]


@dataclass(frozen=True)
class Head:
    """A trained prompt's classes and the map from raw image features to their logits.

    ``pretrained`` is how the weights can be loaded again (a tag, ``none``, a file, or None when unknown);
    ``precision`` and ``dtype`` are how the features it was trained on were encoded and stored, so that new images
    are encoded the same way. Exactly one of ``classifier`` and ``prompt`` is set.
    """

    path: Path
    model: str
    weights: str
    pretrained: str | None
    classnames: list[str]
    precision: str
    dtype: str
    classifier: Classifier | None = None
    prompt: ImagePrompt | None = None

    @property
    def image_conditional(self) -> bool:
        return self.prompt is not None

    def check_clip(self, clip: LoadedClip) -> None:
        """Raise unless ``clip`` is the model and weights the prompt was trained with."""
        if (clip.name, clip.weights_id) != (self.model, self.weights):
            raise CheckpointError(
                f"{self.path} was trained with {self.model} ({self.weights}), not {clip.name} ({clip.weights_id}); "
                f"load its model and weights"
            )

    def load_model(self, pretrained: str | None = None, device: str = "cpu") -> LoadedClip:
        """The model and weights the prompt was trained with (``pretrained``: where from, if not as recorded)."""
        where = pretrained or self.pretrained
        if where is None:
            raise CheckpointError(
                f"{self.path} was trained with weights from a local file ({self.weights}) that it cannot locate; "
                f"pass the file with --pretrained PATH"
            )
        clip = load_clip(self.model, where, device=device)
        self.check_clip(clip)
        return clip

    def logits(self, features: np.ndarray | torch.Tensor, clip: LoadedClip | None = None) -> torch.Tensor:
        """Logits (N, K) CPU float32 of raw image features (N, D); an image-conditional prompt needs ``clip``."""
        if self.classifier is not None:
            clf = self.classifier
            logits = classifier_logits(clf.text_features, features, clf.logit_scale)
            check_finite_logits(logits, clf.logit_scale, f"the classifier of {self.path}")
            return logits
        assert self.prompt is not None
        if clip is None:
            raise ValueError(f"{self.path}: an image-conditional prompt needs the loaded model for its text tower")
        self.check_clip(clip)
        learner = restore_learner(self.prompt.spec, clip, self.classnames, self.prompt.tensors)
        encoder = PromptTextEncoder(clip, **self.prompt.text_options)
        logits = predict_logits(learner, encoder, torch.as_tensor(features), clip.model.logit_scale.detach())
        if not bool(torch.isfinite(logits).all()):
            raise CheckpointError(f"the prompt of {self.path} gives non-finite logits (its training diverged); "
                                  f"re-train with a lower --lr")
        return logits


def head_of_checkpoint(ckpt: Checkpoint, *, pretrained: str | None, precision: str, dtype: str) -> Head:
    """The head of a run: its exported classifier (checked against the run), or its image-conditional prompt."""
    common: dict[str, Any] = {"path": ckpt.path, "model": ckpt.model, "weights": ckpt.weights,
                              "pretrained": pretrained, "classnames": ckpt.classnames, "precision": precision,
                              "dtype": dtype}
    spec = ckpt.method
    if not spec.image_conditional:
        return Head(classifier=ckpt.classifier(), **common)
    if not ckpt.complete:
        logger.warning("run %s is not finished (epoch %d): predicting with its last checkpoint", ckpt.path, ckpt.epoch)
    return Head(prompt=ImagePrompt(spec, ckpt.learner_tensors, text_path_options(ckpt)), **common)


def head_of_run(ckpt: Checkpoint, pretrained: str | None = None) -> Head:
    """:func:`head_of_checkpoint` with the run's own encoding and how its weights load again (``pretrained`` if
    given; None when the run's local weights file moved: :meth:`Head.load_model` then asks for it)."""
    hint = pretrained
    if hint is None:
        try:
            hint = checkpoint_pretrained(ckpt)
        except CheckpointError:
            hint = None
    precision, dtype = run_encoding(ckpt)
    return head_of_checkpoint(ckpt, pretrained=hint, precision=precision, dtype=dtype)
