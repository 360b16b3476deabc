"""LP++ (Huang et al., CVPR 2024): a linear probe whose class weights blend visual prototypes with the zero-shot text
features, fitted full-batch by block majorize-minimize steps whose step sizes are Lipschitz bounds of the data.

The model (``FereshteShakeri/FewShot-CLIP-Strong-Baseline: methods/linear_probe_p2.py``, ``LinearProbe_P2``): with
f the L2-normalised image feature and t_k the normalised zero-shot text feature of class k (``utils.py:
clip_classifier``, here with the dataset's hand-crafted template),

    logit_k(f) = w_k . f + b_k + alpha_k (f . t_k)

trained with the mean cross-entropy over the whole few-shot set at every iteration (full batch). Its settings,
each computed once from the training features F (N, D) (``calculate_lr_w``, ``calculate_lr_alpha``,
``calculate_init_alpha``, ``compute_centroids`` in ``methods/utils.py``):

- w_k starts at the SUM of class k's features (``compute_centroids``: the division by the count is commented
  out); b starts at ``nn.Linear``'s default draw, uniform in +-1/sqrt(D);
- alpha_k all start at 250 x the mean over classes of the mean own-class text similarity f . t_{y(f)};
- (w, b) move by SGD, momentum 0.9, step 4N / lambda_max(F^T F); alpha moves every 10th iteration by
  N / (4 max_k sum_n (f_n . t_k)^2) times its gradient, which the reference never zeroes: the step uses the
  gradient summed over every iteration so far (kept here as optimiser state, so that a resume equals an
  uninterrupted run);
- 300 iterations (``configs/base.yaml``: ``train_epoch: 300``), at every number of shots.

Departures, forced by the shared cache and protocol: the step sizes, prototypes and alpha's start come from each
image's centre view (the reference draws one augmented view per image once and trains on it), and training draws
one cached view per image per iteration (``--views``); the run keeps its last iterate, where the reference scores
the test set at the iteration of best validation accuracy. LP++ has no learning rate: the run's ``lr`` and schedule
do not move it (its history's ``lr`` column shows the unused schedule).

Its classifier w_k + alpha_k t_k with bias b_k is not CLIP's scaled cosine against K normalised class features,
so the learner is image-conditional in the seam's sense (no single normalised K x D classifier to export): it
computes its own logits, and evaluation and prediction rebuild it from the checkpoint, which holds the zero-shot
text features and step sizes as frozen tensors (no template is needed after training). Its weights are one per
training class: it cannot score classes it did not train on (no base-to-new or cross-dataset transfer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.baselines import zero_shot_classifier
from coopipe.errors import ParamsError
from coopipe.learners import FitData, Learner, StepInputs
from coopipe.methods.registry import Method, NoOptions, Optimization, epochs_for
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

__all__ = ["ALPHA_EVERY", "ALPHA_INIT_SCALE", "FULL_BATCH", "LPP", "LPPLearner", "LPPOptimizer", "LPP_ITERATIONS",
           "MOMENTUM", "lpp_setup"]

LPP_ITERATIONS = 300  # configs/base.yaml train_epoch
ALPHA_EVERY = 10  # alpha steps once every 10 iterations
ALPHA_INIT_SCALE = 250.0  # calculate_init_alpha
MOMENTUM = 0.9  # the SGD on (w, b)
FULL_BATCH = 1 << 30  # every training image in one batch (batch_slices clips it to N)


class LPPLearner(nn.Module):
    """LP++'s classifier: trainable ``weight`` (K, D), ``bias`` (K,), ``alpha`` (K,); frozen ``text`` (K, D)
    (normalised zero-shot text features) and ``step_sizes`` (2,) (the (w, b) step and alpha's step), set by
    :meth:`LPP.prepare` and stored with the checkpoint."""

    image_conditional = True

    def __init__(self, classnames: Sequence[str], embed_dim: int, *, generator: torch.Generator | None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        k = len(classnames)
        bound = 1.0 / math.sqrt(embed_dim)  # nn.Linear's default bias init
        bias = (torch.rand(k, generator=generator) * 2.0 - 1.0) * bound
        self.weight = nn.Parameter(torch.zeros(k, embed_dim, device=device))
        self.bias = nn.Parameter(bias.to(device))
        self.alpha = nn.Parameter(torch.zeros(k, device=device))
        self.text = nn.Parameter(torch.zeros(k, embed_dim, device=device), requires_grad=False)
        self.step_sizes = nn.Parameter(torch.zeros(2, device=device), requires_grad=False)
        self.classnames, self.n_cls = list(classnames), k

    def logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor, logit_scale: torch.Tensor,
               **_: Any) -> torch.Tensor:
        """Logits (B, K) of raw image features (B, D): w.f + b + alpha * (f.t), f normalised (no logit scale)."""
        f = F.normalize(image_features.to(self.weight.dtype), dim=-1)
        return f @ self.weight.t() + self.bias + self.alpha * (f @ self.text.t())

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def predict_logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor,
                       logit_scale: torch.Tensor, *, batch_size: int = 256, image_chunk: int | None = None,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits (M, K) CPU float32 of many images, ``batch_size`` at a time, without gradients."""
        feats = torch.as_tensor(image_features)
        out = []
        with torch.no_grad():
            for start in range(0, feats.shape[0], batch_size):
                batch = feats[start:start + batch_size].to(self.weight.device)
                out.append(self.logits(encoder, batch, logit_scale).float().cpu())
                if progress is not None:
                    progress(batch.shape[0])
        return torch.cat(out) if out else torch.zeros(0, self.n_cls)

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        raise ParamsError("LP++ has no normalised K x D classifier (its weights are unnormalised, with a bias): "
                          "score images through its learner")

    def config(self) -> dict[str, Any]:
        return {"method": "lpp", "classnames": self.classnames}


def lpp_setup(feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """LP++'s data-dependent start from normalised features ``feats`` (N, D), ``labels`` (N,) and normalised text
    features ``text`` (K, D): prototypes (K, D), alpha's start (scalar), the (w, b) step and alpha's step."""
    n, k = feats.shape[0], text.shape[0]
    f64, t64 = feats.double(), text.double()
    one_hot = F.one_hot(labels, k).double()  # (N, K)
    prototypes = one_hot.t() @ f64  # (K, D) class sums
    sims = f64 @ t64.t()  # (N, K)
    own = (one_hot * sims).sum(0) / one_hot.sum(0).clamp(min=1)  # (K,) mean own-class similarity
    present = one_hot.sum(0) > 0
    alpha0 = ALPHA_INIT_SCALE * own[present].mean()
    gram = f64 @ f64.t() if n < f64.shape[1] else f64.t() @ f64  # F F^T and F^T F share their largest eigenvalue
    step_w = 4.0 * n / torch.linalg.eigvalsh(gram).max()
    step_alpha = n / (4.0 * sims.pow(2).sum(0).max())
    return {"prototypes": prototypes, "alpha": alpha0, "step_w": step_w, "step_alpha": step_alpha}


class LPPOptimizer(torch.optim.Optimizer):
    """LP++'s block steps: SGD with momentum 0.9 on (w, b) at step ``step_w`` every iteration; alpha keeps the sum
    of its gradients over every iteration so far (a momentum-1 buffer, as the reference never zeroes alpha's
    gradient) and steps by ``step_alpha`` times that sum every ``ALPHA_EVERY``-th iteration.

    The steps are the optimiser's own (``step_size`` of each group): the ``lr`` the training loop writes into the
    groups every epoch is not read. State of every parameter: ``momentum_buffer`` and ``step`` (its iterations)."""

    def __init__(self, blocks: Iterable[nn.Parameter], alpha: nn.Parameter, *, step_w: float,
                 step_alpha: float) -> None:
        super().__init__([{"params": list(blocks), "step_size": step_w, "momentum": MOMENTUM, "every": 1},
                          {"params": [alpha], "step_size": step_alpha, "momentum": 1.0, "every": ALPHA_EVERY}], {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.detach().clone()
                    state["step"] = torch.zeros(())  # float, as Adam's (checkpoints hold float tensors)
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                state["step"] += 1
                if int(state["step"]) % group["every"] == 0:
                    p.add_(state["momentum_buffer"], alpha=-group["step_size"])


class LPP(Method):
    name = "lpp"
    title = "LP++"
    paper = "LP++ (Huang et al., LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP, CVPR 2024)"
    learned = "linear probe"
    head_tensors = "class weights, biases, blending weights alpha and the zero-shot text features"
    inference = (
        "Image-conditional head (LP++): its classifier is not CLIP's scaled cosine against K normalised class "
        "features. For the normalised image feature f, logit_k = weight_k . f + bias_k + alpha_k * (f . text_k), "
        "with weight (K, D), bias (K,), alpha (K,) and the zero-shot text features text (K, D) in "
        "prompt.safetensors (step_sizes are the training's, unused at inference). No text tower runs at inference."
    )
    options = NoOptions
    image_conditional = True
    batch_size = FULL_BATCH

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return LPP_ITERATIONS

    def transferable(self, options: NoOptions) -> bool:
        return False

    def transfer_refusal(self, options: NoOptions) -> str:
        return "LP++'s class weights are visual prototypes of its training classes"

    def prepare(self, learner: Learner, data: FitData) -> None:
        """Prototypes, alpha's start, the zero-shot text features and the step sizes from the training split."""
        assert isinstance(learner, LPPLearner)
        device = learner.weight.device
        feats = F.normalize(data.train_feats[:, 0].to(device, torch.float32), dim=-1)  # (N, D) centre views
        text = zero_shot_classifier(data.clip, data.classnames, data.template).to(device)  # (K, D)
        setup = lpp_setup(feats, data.train_labels.to(device), text)
        with torch.no_grad():
            learner.text.copy_(text)
            learner.weight.copy_(setup["prototypes"])
            learner.alpha.fill_(float(setup["alpha"]))
            learner.step_sizes.copy_(torch.stack([setup["step_w"], setup["step_alpha"]]))

    def learner_optimizer(self, learner: Learner, opt: Optimization) -> torch.optim.Optimizer:
        assert isinstance(learner, LPPLearner)
        step_w, step_alpha = (float(s) for s in learner.step_sizes)
        logger.info("LP++ steps: %.4g for (w, b), %.4g for alpha every %d iterations, from the training features "
                    "(the run's lr and schedule do not apply)", step_w, step_alpha, ALPHA_EVERY)
        return LPPOptimizer([learner.weight, learner.bias], learner.alpha, step_w=step_w, step_alpha=step_alpha)

    def build_learner(self, options: NoOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> LPPLearner:
        device = resolve_text_tower(clip.model).device
        return LPPLearner(classnames, clip.embed_dim, generator=generator, device=device)
