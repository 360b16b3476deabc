"""Dataset and method names and their order in the paper's tables and figures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coopipe.errors import ParamsError
from coopipe.method import MethodSpec

AVERAGE = "average"

# CoOp's benchmark order (the paper's tables and Figure 3), then the ImageNet variants.
DATASET_LABELS: dict[str, str] = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenetv2": "ImageNetV2",
    "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A",
    "imagenet_r": "ImageNet-R",
    AVERAGE: "Average",
}
_METHOD_NAMES = {
    "zeroshot": "Zero-shot CLIP",
    "zeroshot_ensemble": "Zero-shot CLIP (ensemble)",
    "linear_probe": "Linear probe CLIP",
    "ridge": "Ridge probe",
    "coop": "CoOp",
}
_PROMPT_NAMES = {"coop": "CoOp", "cocoop": "CoCoOp", "rank": "Rank prompts (OrdinalCLIP)"}
_METHOD_ORDER = ("zeroshot", "zeroshot_ensemble", "linear_probe", "ridge", "coop", "cocoop", "rank")


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def dataset_order(name: str) -> tuple[int, str]:
    names = list(DATASET_LABELS)
    return (names.index(name), name) if name in DATASET_LABELS else (len(names) - 1, name)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the paper's order; a prompt variant (``coop_csc_middle``, ``coop_init-...``) right after its
    method's plain label, variants by name; unknown labels last."""
    if method in _METHOD_ORDER:
        return (_METHOD_ORDER.index(method), "")
    try:
        base = MethodSpec.parse(method).method
    except ParamsError:
        return (len(_METHOD_ORDER), method)
    return (_METHOD_ORDER.index(base), method) if base in _METHOD_ORDER else (len(_METHOD_ORDER), method)


def method_label(method: str, model: str = "", *, with_model: bool = False) -> str:
    """Readable method name: ``coop_csc_middle`` -> ``CoOp (CSC, middle)``; ``coop_m8`` -> ``CoOp (M=8)``;
    ``cocoop`` -> ``CoCoOp``; ``rank`` -> ``Rank prompts (OrdinalCLIP)``. Labels are read by the method seam."""
    name = _METHOD_NAMES.get(method)
    if name is None:
        try:
            spec = MethodSpec.parse(method)
        except ParamsError:
            spec = None
        if spec is not None:
            base, default = _PROMPT_NAMES[spec.method], MethodSpec.default(spec.method)
            parts = []
            if spec.csc:
                parts.append("CSC")
            if spec.class_token_position != "end":
                parts.append(spec.class_token_position)
            if spec.ctx_init and spec.ctx_init != default.ctx_init:
                parts.append(f'init "{spec.ctx_init}"')
            elif not spec.ctx_init and (spec.n_ctx != default.n_ctx or default.ctx_init):
                parts.append(f"M={spec.n_ctx}")
            if spec.method == "rank" and spec.n_base_ranks != default.n_base_ranks:
                parts.append(f"{spec.n_base_ranks} base ranks")
            name = f"{base} ({', '.join(parts)})" if parts else base
    name = name or method
    return f"{name} [{model}]" if with_model and model else name


def several_models(items: Iterable[Any]) -> bool:
    """True when the items (cells, rows) come from more than one model: labels then name the model."""
    return len({getattr(i, "model", "") for i in items}) > 1
