"""Image views for the feature cache: the centre crop used at test time, and seeded augmented training views.

The reference CoOp training re-encodes a fresh random-resized-crop + flip of each image every step. The cache
keeps that regularisation by storing ``n_aug`` such views per training image (training draws one per epoch),
next to the deterministic centre view (view 0). Every augmented view is drawn from its own generator seeded
by ``(seed, image index, view)``, so a view does not depend on batch order, worker count or which machine
encodes it: the in-process and distributed encoders produce identical stores.

Two augmentations: ``coop`` (the default) is CoOp's ``random_resized_crop`` + ``random_flip`` (scale 0.08-1, as
CLIP's references train); ``ordinalclip`` is OrdinalCLIP's training transform (xk-huang/OrdinalCLIP,
``ordinalclip/runner/utils.py`` ``get_transforms`` with ``configs/default.yaml``'s ``transforms_cfg``:
``Resize((256, 256))``, ``RandomCrop(224)``, ``RandomHorizontalFlip()``): the image squashed to a square 256/224
times the model's input size, a uniformly placed crop of the input size, a flip half the time. (OrdinalCLIP then
normalises with ImageNet's mean and std for its VGG-16; the views here are normalised as the CLIP model needs.)
The augmentation is part of the store's provenance, so stores of different augmentations are never reused for
each other.

Views are produced as uint8 tensors (cheap to pass between worker processes); :func:`normalize_batch` turns a
batch into the float input of the image encoder, in the same arithmetic as torchvision's ToTensor + Normalize.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from coopipe.errors import ParamsError
from coopipe.models import PreprocessConfig

AUGMENTATIONS = ("coop", "ordinalclip")  # CoOp's random resized crop; OrdinalCLIP's resize + random crop
ORDINALCLIP_RESIZE = 256 / 224  # OrdinalCLIP resizes to 256 x 256 before its 224 crop

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class ViewSpec:
    """Which views a store holds: view 0 is always the centre crop; views 1..n_aug are augmented."""

    n_aug: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0
    augment: str = "coop"  # one of AUGMENTATIONS

    def __post_init__(self) -> None:
        # Checked here, before any store exists: a bad value must not leave a half-created store behind.
        if self.augment not in AUGMENTATIONS:
            raise ParamsError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r} (--augment)")
        if type(self.n_aug) is not int or self.n_aug < 0:
            raise ParamsError(f"views (augmented views per image) must be an integer >= 0, got {self.n_aug!r}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ParamsError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {lo},{hi}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ParamsError(f"crop ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    @property
    def n_views(self) -> int:
        return 1 + self.n_aug

    @property
    def label(self) -> str:
        return "center" if self.n_aug == 0 else f"center+aug{self.n_aug}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("augment")  # named by "augmentation": CoOp's record stays what it was, so its stores stay reusable
        data["scale"], data["ratio"] = list(self.scale), list(self.ratio)
        data["center"] = "resize-shortest+center-crop"
        data["augmentation"] = "random-resized-crop+hflip" if self.flip else "random-resized-crop"
        if self.augment == "ordinalclip":  # crop scale and ratio play no part
            data["augmentation"] = "resize-square-256/224+random-crop" + ("+hflip" if self.flip else "")
            data.pop("scale"), data.pop("ratio")
        if self.n_aug == 0:  # augmentation settings are irrelevant without augmented views
            for key in ("scale", "ratio", "flip", "seed", "augmentation"):
                data.pop(key, None)
        return data


def _resample(cfg: PreprocessConfig) -> Image.Resampling:
    return _INTERPOLATION.get(cfg.interpolation, Image.Resampling.BICUBIC)


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def center_view(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize the short side to ``image_size`` and centre-crop: open_clip's test transform, as uint8 (3, S, S)."""
    size = cfg.image_size
    width, height = img.size
    scale = size / min(width, height)
    # torchvision's Resize(int) computes the long side with int() truncation; match it exactly.
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if (new_w, new_h) != (width, height) or scale != 1:
        img = img.resize((new_w, new_h), _resample(cfg))
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return _to_uint8_chw(img.crop((left, top, left + size, top + size)))


def view_generator(seed: int, image_index: int, view: int) -> torch.Generator:
    """A generator private to one (image, view): the view is the same wherever and whenever it is encoded."""
    digest = hashlib.blake2b(f"{seed}:{image_index}:{view}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _random_resized_crop_box(
    width: int, height: int, spec: ViewSpec, gen: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``gen`` instead of the global RNG."""
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(spec.scale[0], spec.scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height  # fallback to a central crop, as torchvision does
    if in_ratio < min(spec.ratio):
        w, h = width, int(round(width / min(spec.ratio)))
    elif in_ratio > max(spec.ratio):
        h, w = height, int(round(height * max(spec.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_random_crop(img: Image.Image, cfg: PreprocessConfig, gen: torch.Generator) -> Image.Image:
    """OrdinalCLIP's Resize((R, R)) then RandomCrop(size), R = 256/224 of the input size; the crop's place drawn as
    torchvision's RandomCrop.get_params draws it (top, then left), from ``gen``."""
    size = cfg.image_size
    square = int(round(size * ORDINALCLIP_RESIZE))
    img = img.resize((square, square), _resample(cfg))
    top = int(torch.randint(0, square - size + 1, size=(1,), generator=gen))
    left = int(torch.randint(0, square - size + 1, size=(1,), generator=gen))
    return img.crop((left, top, left + size, top + size))


def augmented_view(img: Image.Image, cfg: PreprocessConfig, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (+ horizontal flip) to ``image_size``, as in CoOp's reference training transform; or
    OrdinalCLIP's resize + random crop (+ flip) with ``spec.augment == "ordinalclip"``."""
    size = cfg.image_size
    if spec.augment == "ordinalclip":
        out = _resize_random_crop(img, cfg, gen)
    else:
        top, left, h, w = _random_resized_crop_box(img.width, img.height, spec, gen)
        out = img.resize((size, size), _resample(cfg), box=(left, top, left + w, top + h))
    if spec.flip and float(torch.rand(1, generator=gen)) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_uint8_chw(out)


def make_views(img: Image.Image, image_index: int, cfg: PreprocessConfig, spec: ViewSpec) -> torch.Tensor:
    """All views of one image, stacked: (n_views, 3, S, S) uint8, view 0 the centre crop."""
    views = [center_view(img, cfg)]
    for v in range(1, spec.n_views):
        views.append(augmented_view(img, cfg, spec, view_generator(spec.seed, image_index, v)))
    return torch.stack(views)


def normalize_batch(batch: torch.Tensor, cfg: PreprocessConfig, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float, same arithmetic as ToTensor() followed by Normalize(mean, std)."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    x = batch.to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).to(dtype)
