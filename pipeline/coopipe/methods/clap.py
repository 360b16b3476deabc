"""CLAP (Silva-Rodriguez et al., CVPR 2024): a zero-shot-initialised linear probe (ZS-LP) with a class-wise penalty
that keeps each class prototype near its zero-shot text feature, weighted by the class's zero-shot performance.

The model (``jusiro/CLAP: trainers/adapters.py``, ``AdapterMethod`` with ``INIT ZS`` and ``CONSTRAINT l2``, the
README's and ``experiments/experiment_CLAP.txt``'s CLAP setting):

- prototypes w_k (K, D) start at the zero-shot text features t_k: the text tower's raw, unnormalised output for
  the dataset's template (``_get_base_text_features``; one template outside ImageNet);
- logits are CLIP's: exp(logit_scale) x cos(f, w_k) (``forward_lp``: image features and prototypes normalised);
- loss = cross-entropy + mean_k lambda_k ||w_k - t_k||^2 (``zero_shot_constraint``, ``l2``);
- the multipliers lambda_k (``init_lagrangian_multipliers``) are class k's zero-shot performance on the support
  set: the mean, over class k's training images and their augmented views, of zero-shot CLIP's softmax
  probability of class k. The ``l2`` constraint keeps them fixed (the ``adaptative`` outer updates of the
  augmented Lagrangian, ``outer_step``, belong to another setting);
- SGD lr 0.1, momentum 0.9 (Dassl's default), weight decay 0, batch 256, 300 epochs, cosine decay after one
  warm-up epoch at 1e-5 (``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``).

CLAP is validation-free: nothing it fits or chooses reads the validation split (the run's per-epoch validation
accuracy is reported, never used), and the run keeps its last epoch. Departure, forced by the shared cache: the
reference draws its batches from 20 augmented copies of every image (``epochs_aumentation``), one epoch being as
many batches of 256 as the few-shot set fills; here an epoch is every image once, with one cached view, and the
multipliers average over the cached augmented views (the centre view when the store has none). The prototypes
are one per training class: it cannot score classes it did not train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.baselines import clean_classname
from coopipe.learners import ClassifierLearner, FitData, Learner, StepInputs
from coopipe.methods.registry import Method, NoOptions, epochs_for
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder
from coopipe.text_tower import resolve_text_tower

__all__ = ["CLAP", "CLAP_BATCH", "CLAP_EPOCHS", "CLAP_LR", "CLAPLearner", "zero_shot_multipliers"]

CLAP_EPOCHS = 300
CLAP_BATCH = 256
CLAP_LR = 0.1


class CLAPLearner(ClassifierLearner, nn.Module):
    """Trainable ``prototypes`` (K, D); the zero-shot ``anchors`` (K, D) and ``multipliers`` (K,) are buffers set by
    :meth:`CLAP.prepare` (a deterministic function of the run's data, so not checkpointed)."""

    anchors: torch.Tensor
    multipliers: torch.Tensor

    def __init__(self, classnames: Sequence[str], embed_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        k = len(classnames)
        self.prototypes = nn.Parameter(torch.zeros(k, embed_dim, device=device))
        self.register_buffer("anchors", torch.zeros(k, embed_dim, device=device), persistent=False)
        self.register_buffer("multipliers", torch.zeros(k, device=device), persistent=False)
        self.classnames, self.n_cls = list(classnames), k

    def class_text_features(self, encoder: PromptTextEncoder | None) -> torch.Tensor:
        """The normalised prototypes (K, D): the classifier a run exports."""
        return F.normalize(self.prototypes, dim=-1)

    def penalty(self) -> torch.Tensor:
        """mean_k lambda_k ||w_k - t_k||^2."""
        return (self.multipliers * (self.prototypes - self.anchors).pow(2).sum(-1)).mean()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels) + self.penalty()

    def config(self) -> dict[str, Any]:
        return {"method": "clap", "classnames": self.classnames}


def zero_shot_multipliers(feats: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """lambda (K,): per class, the mean zero-shot softmax probability of the true class over its samples.

    ``feats`` (N, V, D) raw features (every view a sample), ``labels`` (N,), ``anchors`` (K, D) raw text features,
    ``logit_scale`` CLIP's log scale."""
    n, v, d = feats.shape
    f = F.normalize(feats.reshape(n * v, d), dim=-1)
    y = labels.repeat_interleave(v)
    probs = torch.softmax(logit_scale.exp() * f @ F.normalize(anchors, dim=-1).t(), dim=-1)  # (N V, K)
    one_hot = F.one_hot(y, anchors.shape[0]).to(probs.dtype)
    return (probs * one_hot).sum(0) / one_hot.sum(0).clamp(min=1)


class CLAP(Method):
    name = "clap"
    title = "CLAP"
    paper = ("CLAP (Silva-Rodriguez et al., A Closer Look at the Few-Shot Adaptation of Large Vision-Language "
             "Models, CVPR 2024)")
    learned = "linear probe"
    options = NoOptions
    batch_size = CLAP_BATCH

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return CLAP_EPOCHS

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), "lr": CLAP_LR, "weight_decay": 0.0}

    def transferable(self, options: NoOptions) -> bool:
        return False

    def transfer_refusal(self, options: NoOptions) -> str:
        return "CLAP's prototypes are one per training class"

    def prepare(self, learner: Learner, data: FitData) -> None:
        """Zero-shot text features (the anchors and the prototypes' start) and the multipliers, from the training
        split only (CLAP is validation-free: ``data.val_feats`` is never read)."""
        assert isinstance(learner, CLAPLearner)
        device = learner.prototypes.device
        prompts = [data.template.format(clean_classname(c)) for c in data.classnames]
        tokens = torch.as_tensor(data.clip.tokenizer(prompts), dtype=torch.long).to(device)  # (K, L)
        with torch.no_grad():
            anchors = data.clip.model.encode_text(tokens).to(device, torch.float32)  # (K, D) raw, not normalised
            feats = data.train_feats.to(device, torch.float32)
            views = feats[:, 1:] if feats.shape[1] > 1 else feats  # the augmented views, as the reference's
            multipliers = zero_shot_multipliers(views, data.train_labels.to(device), anchors,
                                                data.logit_scale.to(device))
            learner.anchors.copy_(anchors)
            learner.multipliers.copy_(multipliers)
            learner.prototypes.copy_(anchors)

    def build_learner(self, options: NoOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> CLAPLearner:
        return CLAPLearner(classnames, clip.embed_dim, device=resolve_text_tower(clip.model).device)
