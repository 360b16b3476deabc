"""The text path's frozen-weight GEMMs on oneDNN (coopipe/frozen_gemm.py) equal the plain computation.

The oneDNN products must give ``F.linear``'s results and input gradients to fp32 rounding; the whole text path
(CoOp's shared prefix and CoCoOp's batched prompts, float32, full depth) must equal open_clip's plain 77-token path
for logits and for the gradients of the context and the Meta-Net; and every case oneDNN does not cover (float64,
autocast, a weight that learns) must run ``F.linear`` itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coopipe.cocoop_text import cocoop_logits
from coopipe.errors import ParamsError
from coopipe.frozen_gemm import FrozenGemm, onednn_available
from coopipe.methods import MethodSpec
from coopipe.prompt import PromptLearner
from coopipe.text_encoder import PromptTextEncoder, coop_logits

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["dog", "golden retriever", "st. bernard with a very long name", "cat"]  # uneven token lengths


def _on_onednn(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == "_FrozenLinearBackward"


def test_this_pytorch_has_the_onednn_linear() -> None:
    # CI's CPU torch is built with oneDNN: the fast path must be exercised there, not silently skipped
    assert onednn_available()
    assert FrozenGemm("auto").use_onednn and FrozenGemm("onednn").use_onednn and not FrozenGemm("blas").use_onednn
    with pytest.raises(ParamsError, match="unknown GEMM backend"):
        FrozenGemm("mkl")


@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (1, 48)])
def test_products_and_input_gradients_equal_f_linear(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 96, generator=g)
    gemm = FrozenGemm("auto")
    for b in (bias, None):
        y = gemm.linear(x, weight, b)
        assert _on_onednn(y)
        (grad,) = torch.autograd.grad((y * upstream).sum(), x)
        ref = F.linear(x, weight, b)
        (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), x)
        assert y.shape == ref.shape
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_a_weight_changed_in_place_is_transposed_again() -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 16, generator=g)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    gemm = FrozenGemm("auto")
    torch.autograd.grad(gemm.linear(x, weight).sum(), x)  # caches the transpose
    with torch.no_grad():
        weight.mul_(-3.0)  # e.g. load_state_dict into the same tensor
    (grad,) = torch.autograd.grad(gemm.linear(x, weight).sum(), x)
    (ref,) = torch.autograd.grad(F.linear(x, weight).sum(), x)
    assert torch.allclose(grad, ref, rtol=1e-5, atol=1e-5)


def test_other_cases_run_f_linear() -> None:
    gemm = FrozenGemm("auto")
    x32 = torch.randn(4, 8, requires_grad=True)
    assert not _on_onednn(gemm.linear(x32.double(), torch.randn(6, 8, dtype=torch.float64)))  # float64
    assert not _on_onednn(gemm.linear(x32, torch.randn(6, 8, requires_grad=True)))  # a learning weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _on_onednn(gemm.linear(x32, torch.randn(6, 8)))  # bf16 autocast keeps its casts
    assert not _on_onednn(FrozenGemm("blas").linear(x32, torch.randn(6, 8)))


def test_coop_text_path_on_onednn_equals_open_clips_plain_path(rn50) -> None:
    learner = PromptLearner(rn50, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(0))
    images = torch.randn(5, rn50.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 1])
    results = []
    for encoder in (PromptTextEncoder(rn50, cut=False, share_prefix=False), PromptTextEncoder(rn50, gemm="onednn")):
        logits = coop_logits(images, encoder(learner), rn50.model.logit_scale)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), learner.ctx)
        results.append((logits.detach(), grad))
    (ref_logits, ref_grad), (logits, grad) = results
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-3)  # logits are scaled by 100: 1e-5 relative
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-5 * ref_grad.abs().max())


def test_cocoop_text_path_on_onednn_equals_open_clips_plain_path(rn50) -> None:
    spec = MethodSpec.of("cocoop", n_ctx=2)
    learner = spec.build_learner(rn50, NAMES, generator=torch.Generator().manual_seed(0))
    images = torch.randn(3, rn50.embed_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([2, 0, 3])
    params = [learner.ctx, *learner.meta_net.parameters()]
    results = []
    for encoder in (PromptTextEncoder(rn50, cut=False, share_prefix=False), PromptTextEncoder(rn50, gemm="onednn")):
        logits = cocoop_logits(encoder, learner, images, rn50.model.logit_scale, image_chunk=2)
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
        results.append((logits.detach(), grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-3)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref, rtol=0, atol=1e-5 * ref.abs().max())
