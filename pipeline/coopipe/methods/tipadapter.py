"""Tip-Adapter (Zhang et al., ECCV 2022), training-free: zero-shot CLIP plus an affinity-weighted cache of the few-shot
features.

For an image's normalised feature ``f`` (``gaopengcuhk/Tip-Adapter: main.py``, ``run_tip_adapter``)::

    logits = 100 * f W^T + alpha * exp(-beta * (1 - f K^T)) V

``W`` (K, D): the hand-crafted prompt's zero-shot class weights; ``K`` (N, D): the cache keys, one per training image:
its features averaged over augmented views, then normalised (``utils.py: build_cache_model`` averages the raw
features of ``augment_epoch`` = 10 random-crop passes; coopipe averages the store's cached augmented views 1..V-1, or
takes the centre view of a store without any); ``V`` (N, K): one-hot labels. The zero-shot logits are scaled by the
repository's fixed 100 (CLIP's ``exp(logit_scale)`` for OpenAI's weights) and the cache logits are not scaled, so
alpha keeps its meaning whatever the model's logit scale. The logits depend on the image non-linearly: the learner is
image-conditional and computes its own.

alpha and beta are searched on the few-shot validation split only (never the test split, which the repository's
``main.py`` reads for its Tip-Adapter-F epoch choice), over the repository's grid (``utils.py: search_hp``): beta in
``0.1 + i * (scale_beta - 0.1) / steps_beta`` for i < steps_beta, alpha likewise, the first best accuracy in that
order kept. Without a validation split the initial values stay (logged).

Paper setting: the run's dataset's published config (:data:`PUBLISHED`, ``gaopengcuhk/Tip-Adapter: configs/*.yaml``):
``init_alpha``, ``init_beta``, ``search_scale`` [beta, alpha] and ``search_step`` [200, 20] differ by dataset
(ImageNet and OxfordPets alpha 1.17 from beta 1, grid scales [7, 3]; EuroSAT 2, [12, 10]; DTD 2, [13, 13];
FGVCAircraft 5, [30, 30]). Each option left unset takes the dataset's value (the label ``tipadapter`` is the paper
setting on every dataset); a value given overrides it (``tipadapter_a2``). A dataset without a published config takes
ImageNet's, and its runs name that departure (:meth:`TipAdapter.departures`). The config the run used is recorded in
its variant (``setting``).

Everything Tip-Adapter fits is held in frozen parameters (zero-shot weights, keys, values, alpha, beta), so the
checkpoint reproduces it for evaluation and ``predict``. The cache values are one-hot labels of the training
classes: the method cannot score other classes (no base-to-new, no transfer).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.errors import ParamsError
from coopipe.learners import FitData, StepInputs
from coopipe.methods.feature_space import (
    FeatureMethod,
    batched_logits,
    fill_zero_shot,
    frozen_parameter,
    learner_device,
    positive_problems,
)
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = ["PUBLISHED", "TIP_LOGIT_SCALE", "TipAdapter", "TipAdapterLearner", "TipAdapterOptions", "TipAdapterSetting",
           "cache_keys", "published_setting", "resolve_setting", "search_alpha_beta", "search_grid"]

TIP_LOGIT_SCALE = 100.0  # the repository's zero-shot logit scale


@dataclasses.dataclass(frozen=True)
class TipAdapterOptions:
    """Each option None takes the run's dataset's published value (:func:`resolve_setting`); a number overrides it."""

    init_alpha: float | None = None
    init_beta: float | None = None
    alpha_scale: float | None = None  # search_scale[1]
    beta_scale: float | None = None  # search_scale[0]
    alpha_steps: int | None = None  # search_step[1]
    beta_steps: int | None = None  # search_step[0]


@dataclasses.dataclass(frozen=True)
class TipAdapterSetting:
    """A complete setting: the initial alpha and beta and the search grid (scales and steps)."""

    init_alpha: float
    init_beta: float
    alpha_scale: float
    beta_scale: float
    alpha_steps: int = 20
    beta_steps: int = 200


# The published configs (gaopengcuhk/Tip-Adapter: configs/*.yaml; search_step [200, 20] in each), by coopipe's
# dataset name: (file, setting). A dataset without one takes FALLBACK's.
PUBLISHED: dict[str, tuple[str, TipAdapterSetting]] = {
    "imagenet": ("configs/imagenet.yaml", TipAdapterSetting(1.17, 1.0, 3.0, 7.0)),
    "oxford_pets": ("configs/oxford_pets.yaml", TipAdapterSetting(1.17, 1.0, 3.0, 7.0)),
    "eurosat": ("configs/eurosat.yaml", TipAdapterSetting(2.0, 1.0, 10.0, 12.0)),
    "dtd": ("configs/dtd.yaml", TipAdapterSetting(2.0, 1.0, 13.0, 13.0)),
    "fgvc_aircraft": ("configs/fgvc.yaml", TipAdapterSetting(5.0, 1.0, 30.0, 30.0)),
}
FALLBACK = "imagenet"


def published_setting(dataset: str | None) -> tuple[str, TipAdapterSetting, bool]:
    """(config file, setting, whether ``dataset`` has it published) of ``dataset``; ImageNet's config when it has
    none."""
    name = (dataset or "").lower()
    found = PUBLISHED.get(name)
    return (*found, True) if found is not None else (*PUBLISHED[FALLBACK], False)


def resolve_setting(options: TipAdapterOptions, dataset: str | None) -> tuple[TipAdapterSetting, str]:
    """The setting of ``options`` on ``dataset`` (each unset option from the dataset's published config) and the
    config file it took values from ("" when every option was given)."""
    file, published, _ = published_setting(dataset)
    unset = {f.name for f in dataclasses.fields(options) if getattr(options, f.name) is None}
    given = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in unset}
    return dataclasses.replace(published, **given), file if unset else ""


def search_grid(scale: float, steps: int) -> list[float]:
    """The repository's grid: ``i * (scale - 0.1) / steps + 0.1`` for i in 0..steps-1."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def cache_keys(train_feats: torch.Tensor) -> torch.Tensor:
    """Keys (N, D) of training features (N, V, D): the mean of the augmented views 1..V-1 (the centre view when V is
    1), normalised, as the repository averages its augmented passes before normalising."""
    views = train_feats[:, 1:] if train_feats.shape[1] > 1 else train_feats
    return F.normalize(views.float().mean(dim=1), dim=-1)


def search_alpha_beta(
    zero_shot: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
    options: TipAdapterSetting,
) -> tuple[float, float, float]:
    """(beta, alpha, accuracy) of the best validation accuracy over the grid, the first best in the repository's
    order (beta outer, alpha inner; (0, 0) if none beats 0). ``zero_shot`` (M, K) = 100 f W^T, ``affinity``
    (M, N) = f K^T, ``values`` (N, K), ``labels`` (M,) of the validation split."""
    alphas = torch.tensor(search_grid(options.alpha_scale, options.alpha_steps), dtype=zero_shot.dtype,
                          device=zero_shot.device)  # (A,)
    best_correct, best_beta, best_alpha = 0, 0.0, 0.0
    for beta in search_grid(options.beta_scale, options.beta_steps):
        cache = torch.exp(-beta * (1.0 - affinity)) @ values  # (M, K)
        logits = zero_shot.unsqueeze(0) + alphas[:, None, None] * cache.unsqueeze(0)  # (A, M, K)
        correct = (logits.argmax(dim=-1) == labels.unsqueeze(0)).sum(dim=-1).tolist()  # (A,)
        for alpha, n in zip(alphas.tolist(), correct):
            if n > best_correct:
                best_correct, best_beta, best_alpha = n, beta, alpha
    return best_beta, best_alpha, best_correct / max(len(labels), 1)


class TipAdapterLearner(nn.Module):
    """Zero-shot ``head`` (K, D), cache ``keys`` (N, D) and ``values`` (N, K), scalars ``alpha`` and ``beta``; the
    keys learn only in Tip-Adapter-F. ``keys`` and ``values`` take their size from the training split
    (``data_shaped``: a checkpoint's shapes are loaded as saved)."""

    image_conditional = True
    data_shaped = ("keys", "values")

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], options: TipAdapterOptions, *, method: str,
                 learn_keys: bool) -> None:
        super().__init__()
        device, dim = learner_device(clip), int(clip.embed_dim)
        self.classnames, self.n_cls, self.options, self.method = list(classnames), len(classnames), options, method
        self.setting: TipAdapterSetting | None = None  # the options on the run's dataset (fill_cache)
        self.setting_file = ""  # the published config it took values from
        self.head = frozen_parameter(self.n_cls, dim, device=device)
        self.keys = nn.Parameter(torch.zeros(0, dim, device=device), requires_grad=learn_keys)
        self.values = frozen_parameter(0, self.n_cls, device=device)
        self.alpha = frozen_parameter(device=device)
        self.beta = frozen_parameter(device=device)

    def fill_cache(self, data: FitData) -> None:
        """The setting on the run's dataset, the zero-shot head, the cache of the training split and the initial
        alpha and beta."""
        self.setting, self.setting_file = resolve_setting(self.options, data.dataset)
        if self.setting_file and not published_setting(data.dataset)[2]:
            logger.warning("%s: %s has no published setting; using %s", self.method, data.dataset or "the dataset",
                           self.setting_file)
        fill_zero_shot(self.head, data.clip, data.classnames, data.template)
        with torch.no_grad():
            self.keys.data = cache_keys(data.train_feats).to(self.head.device)
            self.values.data = F.one_hot(data.train_labels.long(), self.n_cls).float().to(self.head.device)
            self.alpha.fill_(self.setting.init_alpha)
            self.beta.fill_(self.setting.init_beta)

    def parts(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero-shot logits 100 f W^T (B, K), affinity f K^T (B, N)) of raw features (B, D)."""
        f = F.normalize(image_features.to(self.head.dtype), dim=-1)
        return TIP_LOGIT_SCALE * f @ self.head.t(), f @ self.keys.t()

    def logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor, logit_scale: torch.Tensor,
               **_: Any) -> torch.Tensor:
        """Tip-Adapter's logits (B, K); CLIP's ``logit_scale`` is not used (the repository's fixed 100)."""
        zero_shot, affinity = self.parts(image_features)
        return zero_shot + self.alpha * (torch.exp(-self.beta * (1.0 - affinity)) @ self.values)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def predict_logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor,
                       logit_scale: torch.Tensor, *, batch_size: int = 256, image_chunk: int | None = None,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits (M, K) CPU float32 of many images, in batches, without gradients."""
        return batched_logits(lambda x: self.logits(encoder, x, logit_scale), image_features,
                              device=self.head.device, batch_size=batch_size, progress=progress)

    @torch.no_grad()
    def search(self, data: FitData) -> None:
        """Set alpha and beta by the grid search on the few-shot validation split (the initial ones without it)."""
        if data.val_feats is None or data.val_labels is None:
            logger.warning("%s: no few-shot validation split: alpha %g and beta %g stay at their initial values "
                           "(no search)", self.method, float(self.alpha), float(self.beta))
            return
        if self.setting is None:
            raise ValueError(f"{self.method}: search before fill_cache (the method's prepare)")
        zero_shot, affinity = self.parts(data.val_feats)
        beta, alpha, acc = search_alpha_beta(zero_shot, affinity, self.values, data.val_labels.to(zero_shot.device),
                                             self.setting)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        logger.info("%s: alpha %.4g, beta %.4g searched on %d validation images (val acc %.4f)", self.method, alpha,
                    beta, len(data.val_labels), acc)

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        raise ParamsError(f"{self.method}'s logits add a cache term that depends non-linearly on each image: there is "
                          f"no single (K, D) classifier; score images through the learner (logits, predict_logits)")

    def config(self) -> dict[str, Any]:
        setting = {"setting": self.setting_file} if self.setting_file else {}  # the config file the run took values from
        return {"method": self.method, **dataclasses.asdict(self.options), **setting, "classnames": self.classnames}


class TipAdapter(FeatureMethod):
    name = "tipadapter"
    title = "Tip-Adapter"
    paper = ("Tip-Adapter (Zhang et al., Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification, "
             "ECCV 2022)")
    learned = "cache model"
    head_tensors = "zero-shot head, cache keys and values, alpha and beta"
    inference = (
        "Image-conditional head (Tip-Adapter): there is no fixed class matrix. For the normalised image feature f, "
        "logits = 100 * f @ head^T + alpha * exp(-beta * (1 - f @ keys^T)) @ values, with the hand-crafted prompt's "
        "zero-shot class weights head (K, D), the cache keys (N, D: the training images' normalised features), "
        "their one-hot labels values (N, K) and the scalars alpha and beta, all in prompt.safetensors; CLIP's "
        "logit scale is not used. No text tower runs at inference."
    )
    options = TipAdapterOptions
    image_conditional = True
    trains = False
    batch_size = 256
    label_prefixes = {"init_alpha": "a", "init_beta": "b", "alpha_scale": "as", "beta_scale": "bs",
                      "alpha_steps": "an", "beta_steps": "bn"}
    integer_options = ("alpha_steps", "beta_steps")
    class_bound = ("the cache's values are one-hot labels of the training classes, so the cache cannot vote for "
                   "classes it has no images of")

    def check(self, options: TipAdapterOptions) -> list[str]:
        given = tuple(name for name in self.label_prefixes if getattr(options, name) is not None)
        return positive_problems(options, given, integers=self.integer_options)

    def departures(self, options: TipAdapterOptions, dataset: str | None) -> list[str]:
        file, _, published = published_setting(dataset)
        if published or not resolve_setting(options, dataset)[1]:
            return []
        return [f"{self.title}'s alpha, beta and search grid of ImageNet ({file}): {dataset or 'the dataset'} has no "
                f"published setting"]

    def prepare(self, learner: TipAdapterLearner, data: FitData) -> None:  # type: ignore[override]
        learner.fill_cache(data)

    def finish(self, learner: TipAdapterLearner, data: FitData) -> None:  # type: ignore[override]
        learner.search(data)

    def build_learner(self, options: TipAdapterOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> TipAdapterLearner:
        return TipAdapterLearner(clip, classnames, options, method=self.name, learn_keys=self.trains)
