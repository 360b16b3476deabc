"""Dataset and method names and their order in the paper's tables and figures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec, method_names

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


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def dataset_order(name: str) -> tuple[int, str]:
    names = list(DATASET_LABELS)
    return (names.index(name), name) if name in DATASET_LABELS else (len(names) - 1, name)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the registered methods in registration order (the baselines first, then the paper's); a variant
    (``coop_csc_middle``, ``coop_init-...``, ``zeroshot_ensemble``) right after its method's plain label, variants by
    name; unknown labels last."""
    order = method_names()
    if method in order:
        return (order.index(method), "")
    try:
        base = MethodSpec.parse(method).method
    except ParamsError:
        return (len(order), method)
    return (order.index(base), method)


def method_label(method: str, model: str = "", *, with_model: bool = False) -> str:
    """Readable method name: ``coop_csc_middle`` -> ``CoOp (CSC, middle)``; ``coop_m8`` -> ``CoOp (M=8)``;
    ``cocoop`` -> ``CoCoOp``; ``rank`` -> ``Rank prompts (OrdinalCLIP)``: the registered method's title and
    the words for its departures from the paper's setting."""
    try:
        name = MethodSpec.parse(method).readable()
    except ParamsError:
        name = method
    return f"{name} [{model}]" if with_model and model else name


def several_models(items: Iterable[Any]) -> bool:
    """True when the items (cells, rows) come from more than one model: labels then name the model."""
    return len({getattr(i, "model", "") for i in items}) > 1
