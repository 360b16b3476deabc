"""Pick the fast precision for the hardware at hand, and say which one was picked and why.

Why a module of its own: the right precision depends on the machine, not on the method. bf16 autocast is a large
win where the hardware computes in bf16 natively and a large loss where it is emulated (measured: RN50 on a
2-core Xeon with AVX-512 but neither AVX512-BF16 nor AMX ran at 12.9 img/s in fp32 and 3.3-4.5 img/s in bf16).

The rule (``choose_precision``; it takes the probed facts as arguments so every case is testable on any machine):

- CUDA with bf16 support (compute capability >= 8.0): ``bf16``;
- older CUDA: ``fp16``;
- CPU with AMX tiles: ``bf16`` (oneDNN runs bf16 convolutions and matmuls on AMX);
- CPU with AVX512-BF16 but no AMX: ``bf16`` for a convolutional tower (ResNet), ``fp32`` for a transformer
  (ViT; and the text tower). Measured on a 2-core AMD EPYC of that kind (docs/performance.md): bf16 autocast ran
  RN50 up to 2.5x faster than fp32 (oneDNN's AVX512-BF16 convolutions) but ViT-B-32 at 0.66-0.69x (its
  matmuls do not gain), and fp32 is exact, so the transformer stays in fp32;
- any other CPU (bf16 emulated): ``fp32`` (with channels_last);
- any other device: ``fp32``.

``resolve_precision`` turns a requested precision (``auto`` or explicit) into the one used; the resolved value,
never ``auto``, is what a store's provenance records, so two machines that resolve differently write different
stores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coopipe.errors import ParamsError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32", "fp16")
_XEON_BF16_MEASURED = "measured: RN50 fp32 12.9 img/s vs bf16 3.3-4.5 img/s on a Xeon without AVX512-BF16/AMX"


@dataclass(frozen=True)
class HardwareFacts:
    """What the precision rule looks at; ``probe`` fills it in, tests build it by hand."""

    device_type: str  # "cpu", "cuda", ...
    cpu_capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    amx: bool = False  # AMX tiles usable (torch.cpu._is_amx_tile_supported())
    avx512_bf16: bool = False  # AVX512-BF16 instructions (cpuinfo flag avx512_bf16)
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported() on the chosen GPU
    device_name: str = ""  # CPU model or GPU name, for logs

    def describe(self) -> str:
        """One line for logs and benchmark output."""
        if self.device_type == "cuda":
            return f"cuda {self.device_name} (bf16 {'yes' if self.cuda_bf16 else 'no'})"
        return (
            f"cpu {self.device_name or '?'} capability={self.cpu_capability} "
            f"amx={'yes' if self.amx else 'no'} avx512_bf16={'yes' if self.avx512_bf16 else 'no'}"
        )


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to run in and the reason, for the log line."""

    precision: str  # bf16 | fp16 | fp32
    reason: str


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    name = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if name and flags:
            break
    return name, flags


def _torch_cpu_flag(name: str) -> bool:
    """A private torch.cpu probe (``_is_amx_tile_supported`` ...), False where this torch lacks it."""
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def check_device(device: str | torch.device) -> None:
    """Refuse a device this machine does not have, naming it (a missing GPU surfaced as an error about the
    weights, deep inside model loading)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParamsError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                          f"use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParamsError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def probe(device: str | torch.device = "cpu") -> HardwareFacts:
    """The facts about ``device`` that the precision rule needs."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return HardwareFacts(
            device_type="cuda",
            cuda_bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
            device_name=torch.cuda.get_device_name(index),
        )
    if dev.type != "cpu":
        return HardwareFacts(device_type=dev.type)
    name, flags = _cpuinfo()
    return HardwareFacts(
        device_type="cpu",
        cpu_capability=str(torch.backends.cpu.get_cpu_capability()),
        amx=_torch_cpu_flag("_is_amx_tile_supported"),
        avx512_bf16="avx512_bf16" in flags or _torch_cpu_flag("_is_avx512_bf16_supported"),
        device_name=name,
    )


def choose_precision(facts: HardwareFacts, *, conv_tower: bool = False) -> PrecisionChoice:
    """The fast precision for ``facts`` (the rule in the module docstring); ``conv_tower``: a ResNet tower."""
    if facts.device_type == "cuda":
        if facts.cuda_bf16:
            return PrecisionChoice("bf16", "CUDA GPU with native bf16")
        return PrecisionChoice("fp16", "CUDA GPU without native bf16: fp16 autocast")
    if facts.device_type != "cpu":
        return PrecisionChoice("fp32", f"{facts.device_type} device: fp32")
    if facts.amx:
        return PrecisionChoice("bf16", "CPU with AMX: native bf16")
    if facts.avx512_bf16 and conv_tower:
        return PrecisionChoice("bf16", "CPU with AVX512-BF16 (no AMX) and a convolutional tower: bf16 convolutions are native")
    if facts.avx512_bf16:
        return PrecisionChoice("fp32", "CPU with AVX512-BF16 but no AMX and a transformer: bf16 measured slower than fp32")
    return PrecisionChoice("fp32", "CPU without native bf16 (no AMX, no AVX512-BF16): fp32 + channels_last")


def measure_bf16_ratio(size: int = 384, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a ``size``-square matmul on the CPU (> 1: bf16 faster); tens of milliseconds."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    best(a, b), best(a16, b16)  # warm-up (oneDNN primitive creation)
    return best(a, b) / max(best(a16, b16), 1e-9)


def resolve_precision(
    requested: str, device: str | torch.device = "cpu", *, facts: HardwareFacts | None = None, conv_tower: bool = False
) -> str:
    """``auto`` -> the rule's choice for ``device``; an explicit precision is kept (with a warning where it is slow).

    Logs the resolved choice and why. ``facts`` overrides the probe (tests).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    facts = facts if facts is not None else probe(device)
    choice = choose_precision(facts, conv_tower=conv_tower)
    if requested == "auto":
        logger.info("precision auto -> %s (%s; %s)", choice.precision, choice.reason, facts.describe())
        return choice.precision
    # no warning where bf16 is what auto picks for this tower (e.g. a conv tower on AVX512-BF16): a resolved
    # precision passed on explicitly (a worker, a benchmark) is not a user asking for the slow path
    if facts.device_type == "cpu" and requested == "bf16" and not facts.amx and choice.precision != "bf16":
        ratio = measure_bf16_ratio()
        kind = "emulates bf16" if not facts.avx512_bf16 else "has AVX512-BF16 but no AMX"
        logger.warning(
            "precision bf16 on a CPU that %s: a bf16 matmul ran at %.2fx the fp32 speed here just now (%s); "
            "use precision auto or fp32 for speed and exact features",
            kind, ratio, _XEON_BF16_MEASURED,
        )
    elif facts.device_type == "cpu" and requested == "fp16":
        logger.warning("precision fp16 on a CPU: fp16 autocast is emulated on most CPUs; use auto or fp32")
    elif facts.device_type == "cuda" and requested == "bf16" and not facts.cuda_bf16:
        logger.warning("precision bf16 on a GPU without native bf16 (%s): use auto (fp16) for speed", facts.device_name)
    logger.info("precision %s (explicit; auto would pick %s: %s)", requested, choice.precision, choice.reason)
    return requested



__all__ = [
    "HardwareFacts",
    "PRECISIONS",
    "PrecisionChoice",
    "choose_precision",
    "measure_bf16_ratio",
    "probe",
    "resolve_precision",
]
