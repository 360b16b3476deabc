"""OrdinalCLIP's augmentation as a view option (``--augment ordinalclip``): the views are its training transform
(xk-huang/OrdinalCLIP ``ordinalclip/runner/utils.py`` ``get_transforms``: Resize((256, 256)), RandomCrop(224),
RandomHorizontalFlip), computed here independently with torchvision; it is part of a store's provenance (CoOp's
record unchanged, so existing stores stay reusable); the departures list it where it differs from the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coopipe.config import EncodeConfig
from coopipe.departures import training_departures
from coopipe.errors import ParamsError
from coopipe.models import PreprocessConfig
from coopipe.store import provenance_key
from coopipe.train_config import TrainConfig
from coopipe.views import ViewSpec, augmented_view, make_views, view_generator

CFG = PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * height)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(320, 240), (200, 300), (256, 256)])
def test_ordinalclip_views_are_its_resize_random_crop_and_flip(size):
    from coopipe.compat import import_open_clip

    import_open_clip()  # makes torchvision importable here (coopipe/compat.py says why)
    import torchvision.transforms.functional as TF

    img, spec = _image(*size), ViewSpec(n_aug=3, augment="ordinalclip")
    flipped = 0
    for view in range(1, 4):
        got = augmented_view(img, CFG, spec, view_generator(0, 7, view))
        gen = view_generator(0, 7, view)  # the same draws, in torchvision's RandomCrop order: top, then left
        square = TF.resize(img, [256, 256], interpolation=TF.InterpolationMode.BICUBIC)
        top = int(torch.randint(0, 256 - 224 + 1, size=(1,), generator=gen))
        left = int(torch.randint(0, 256 - 224 + 1, size=(1,), generator=gen))
        want = TF.crop(square, top, left, 224, 224)
        if float(torch.rand(1, generator=gen)) < 0.5:
            want, flipped = TF.hflip(want), flipped + 1
        assert torch.equal(got, torch.from_numpy(np.asarray(want).copy()).permute(2, 0, 1)), view
    views = make_views(img, 7, CFG, spec)
    assert views.shape == (4, 3, 224, 224)


def test_the_augmentation_keys_the_store_and_coops_record_is_unchanged():
    coop = ViewSpec(n_aug=2).to_dict()
    assert coop == {"n_aug": 2, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "seed": 0,
                    "center": "resize-shortest+center-crop", "augmentation": "random-resized-crop+hflip"}
    ordinal = ViewSpec(n_aug=2, augment="ordinalclip").to_dict()
    assert ordinal["augmentation"] == "resize-square-256/224+random-crop+hflip" and "scale" not in ordinal
    base = {"dataset": "toy", "split": "train", "model": "RN50", "weights": "w"}
    assert provenance_key({**base, "views": coop}) != provenance_key({**base, "views": ordinal})
    assert ViewSpec(augment="ordinalclip").to_dict() == ViewSpec().to_dict()  # no augmented views: the same store
    with pytest.raises(ParamsError, match="augment must be one of coop, ordinalclip"):
        ViewSpec(n_aug=1, augment="imagenet")
    assert EncodeConfig.augment == "coop"


def test_departures_list_the_augmentation_where_it_is_not_the_papers():
    coop_views, ordinal_views = ViewSpec(n_aug=16).to_dict(), ViewSpec(n_aug=16, augment="ordinalclip").to_dict()
    rank = TrainConfig.for_method("rank", 16, "utkface").to_dict()
    age_coop = training_departures(rank, rank, coop_views, shots=16, age=True)
    assert "augmentation: random resized crop (OrdinalCLIP: resize 256, random crop 224, flip)" in age_coop
    age_ordinal = training_departures(rank, rank, ordinal_views, shots=16, age=True)
    assert not any(d.startswith("augmentation") for d in age_ordinal)
    coop = TrainConfig.for_method("coop", 16).to_dict()
    assert not any(d.startswith("augmentation") for d in training_departures(coop, coop, coop_views, shots=16))
    found = training_departures(coop, coop, ordinal_views, shots=16)
    assert ("augmentation: OrdinalCLIP's resize 256 and random crop 224 (paper: random resized crop, scale 0.08-1)"
            in found)


def test_training_refuses_to_choose_between_stores_of_two_augmentations(rn50, tmp_path):
    from conftest import make_store

    from coopipe.errors import StoreError
    from coopipe.features import select_store

    labels = np.repeat(np.arange(2), 2)
    feats = np.ones((4, 3, rn50.embed_dim), dtype=np.float32)
    for cache, spec in ((tmp_path / "coop", ViewSpec(n_aug=2)), (tmp_path, ViewSpec(n_aug=2, augment="ordinalclip"))):
        make_store(cache, model=rn50.name, weights=rn50.weights_id, classnames=["a", "b"], feats=feats,
                   labels=labels, split="train", views=spec.to_dict())
        store = select_store(cache, "toy", "train", model=rn50.name, weights=rn50.weights_id, need_views=True)
        assert store.provenance["views"]["augmentation"] == spec.to_dict()["augmentation"]  # one kind: chosen
    make_store(tmp_path, model=rn50.name, weights=rn50.weights_id, classnames=["a", "b"], feats=feats,
               labels=labels, split="train", views=ViewSpec(n_aug=2).to_dict())  # both kinds in one cache
    with pytest.raises(StoreError, match="views of 2 augmentations.*keep one augmentation per cache"):
        select_store(tmp_path, "toy", "train", model=rn50.name, weights=rn50.weights_id, need_views=True)
    assert select_store(tmp_path, "toy", "train", model=rn50.name, weights=rn50.weights_id)  # evaluation: view 0
