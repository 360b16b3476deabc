"""Matrix products with the frozen text tower's weights, on the GEMM library that is fastest for them.

Why: training a prompt is almost all GEMMs against the text tower's frozen weights (80% of a CoOp or CoCoOp step
on the CPU), at small row counts (a K = 10 CoOp pass is ~70 rows). PyTorch sends fp32 ``F.linear`` on the CPU to
MKL's sgemm; oneDNN (also bundled with PyTorch) ran the same products 1.1-1.6x faster on the 2-core AMD EPYC
these figures come from (``benchmarks/gemm.py``; the gap was widest when neighbours loaded the machine).

The weights are frozen, so the backward pass needs only the input gradient, ``grad @ W``: that is another oneDNN
product, against a transposed copy of ``W`` made once and kept (keyed by storage, shape and version counter, so
a weight changed in place, e.g. by ``load_state_dict``, is transposed again). The results equal ``F.linear``'s
up to fp32 rounding (``tests/test_frozen_gemm.py`` checks the products, and the text encoder's features and
context gradients against the plain path).

oneDNN is used only where it applies: fp32 tensors on the CPU, outside autocast, with frozen weights and PyTorch's
oneDNN linear available. Everything else (float64 exactness tests, bf16 autocast, CUDA, a weight that requires a
gradient) runs ``F.linear`` exactly as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopipe.errors import ParamsError

logger = logging.getLogger(__name__)

__all__ = ["GEMM_BACKENDS", "FrozenGemm", "onednn_available"]

GEMM_BACKENDS = ("auto", "onednn", "blas")
_MAX_CACHED = 512  # transposed weights kept; a CLIP text tower has ~50 distinct (sliced) weights


def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN and its fused linear op (``torch.ops.mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias through oneDNN -> (..., out)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (n, in)
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")  # (n, out)
    return out.view(*x.shape[:-1], weight.shape[0])


class _FrozenLinear(torch.autograd.Function):
    """``F.linear`` with a frozen weight through oneDNN; backward returns the input gradient only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(transposed)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (transposed,) = ctx.saved_tensors  # (in, out)
        return _onednn(grad, transposed, None), None, None, None


class FrozenGemm:
    """Runs the linear layers of the frozen text blocks on the chosen GEMM library.

    ``backend``: ``"auto"`` (oneDNN where it applies, see the module docstring), ``"onednn"`` (the same, but an
    error if this PyTorch has no oneDNN linear) or ``"blas"`` (always ``F.linear``: PyTorch's default).
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in GEMM_BACKENDS:
            raise ParamsError(f"unknown GEMM backend {backend!r}; choose one of {', '.join(GEMM_BACKENDS)}")
        available = onednn_available()
        if backend == "onednn" and not available:
            raise ParamsError(
                "GEMM backend 'onednn' asked for, but this PyTorch build has no oneDNN linear "
                "(torch.backends.mkldnn); use 'auto' or 'blas'"
            )
        self.backend = backend
        self.use_onednn = backend != "blas" and available
        self._transposed: dict[tuple[object, ...], torch.Tensor] = {}

    def describe(self, device: torch.device, autocast: bool = False) -> str:
        """What the products run on, for the training log."""
        if autocast:
            return "bf16 autocast (F.linear)"
        return "oneDNN (fp32)" if self.use_onednn and device.type == "cpu" else "PyTorch's default (F.linear)"

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``x @ weight.T`` runs on oneDNN: fp32 on the CPU, no autocast, a frozen weight."""
        return (
            self.use_onednn
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not weight.requires_grad
            and not torch.is_autocast_enabled("cpu")
        )

    def _transpose(self, weight: torch.Tensor) -> torch.Tensor:
        """A contiguous (in, out) copy of ``weight``, made once per storage, view and in-place version."""
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight._version)
        cached = self._transposed.get(key)
        if cached is None:
            if len(self._transposed) >= _MAX_CACHED:
                self._transposed.clear()
            cached = self._transposed[key] = weight.detach().t().contiguous()
        return cached

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` on the chosen library."""
        if not self.applies(x, weight) or (bias is not None and bias.requires_grad):
            return F.linear(x, weight, bias)
        return _FrozenLinear.apply(x, weight.detach(), None if bias is None else bias.detach(), self._transpose(weight))  # type: ignore[no-any-return]

    def layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply ``module``: an ``nn.Linear`` through :meth:`linear`, anything else as itself."""
        if isinstance(module, nn.Linear):
            return self.linear(x, module.weight, module.bias)
        return module(x)  # type: ignore[no-any-return]

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """open_clip's block MLP (``c_fc``, activation, optional norm, ``c_proj``), its linear layers via :meth:`layer`."""
        if not isinstance(mlp, nn.Sequential):
            return mlp(x)  # type: ignore[no-any-return]
        for module in mlp:
            x = self.layer(module, x)
        return x
