"""A re-run whose stores are complete finds them without building the model, and only then.

The guard: ``load_clip`` in the encode job is replaced by one that raises, so a test passes only if the re-run
really found every store from the cache (with the provenance the normal path computes, checksums verified), and
fails over to building the model whenever anything differs or is damaged.
"""

from __future__ import annotations

import pytest
import torch
from coopipe.encode import EncodeOptions
from coopipe.jobs import encode as encode_job
from coopipe.jobs.encode import run_encode
from coopipe.models import is_conv_model, load_clip
from coopipe.store import open_store
from coopipe.store_reuse import cached_identity
from PIL import Image


class ModelBuilt(Exception):
    """Raised where the encode job would build the model."""


def _refuse_model(*args: object, **kwargs: object) -> None:
    raise ModelBuilt


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "folder"
    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _kw(folder, cache, **options) -> dict:
    opts = dict(precision="fp32", engine="eager", batch_size=4, chunk_rows=2, num_workers=0, progress=False)
    return dict(dataset="imagefolder", data_root=folder, splits=("train", "test"), cache_dir=cache, model="RN50",
                pretrained="none", views=2, shots=(1, 2), seeds=(1,), options=EncodeOptions(**{**opts, **options}))


def test_model_kind_from_config_matches_the_built_model(rn50) -> None:
    assert is_conv_model("RN50") and rn50.identity.conv_tower
    vit = load_clip("ViT-B-32", "none")
    assert not is_conv_model("ViT-B-32") and not vit.identity.conv_tower


def test_noop_rerun_builds_no_model_and_anything_else_does(folder, tmp_path, rn50, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first = run_encode(**_kw(folder, cache))
    assert not any(r.reused for r in first)
    folder_of_stores = first[0].path.parent
    assert cached_identity(folder_of_stores, "RN50", "none") == rn50.identity

    monkeypatch.setattr(encode_job, "load_clip", _refuse_model)
    again = run_encode(**_kw(folder, cache))
    assert all(r.reused for r in again) and [r.path for r in again] == [r.path for r in first]

    with pytest.raises(ModelBuilt):  # another precision is another store: it must be encoded
        run_encode(**_kw(folder, cache, precision="bf16"))
    with pytest.raises(ModelBuilt):  # other views: another store
        run_encode(**{**_kw(folder, cache), "views": 3})
    assert cached_identity(folder_of_stores, "ViT-B-32", "none") is None

    train = next(r.path for r in first if r.path.name.startswith("train_"))
    chunk = next(p for p in (train / "features" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # damaged: a reuse verifies checksums, so it must repair
    with pytest.raises(ModelBuilt):
        run_encode(**_kw(folder, cache))
    monkeypatch.undo()
    repaired = run_encode(**_kw(folder, cache))
    assert [r.path for r in repaired] == [r.path for r in first]
    open_store(train, checksums=True)  # intact again


def test_a_store_is_keyed_by_its_rows_not_by_the_shots_that_asked(folder, tmp_path, monkeypatch) -> None:
    """Few-shot draws are nested (the 1-shot draw is a prefix of the 2-shot one), so shots ``[2]`` and ``[1, 2]``
    select the same rows (as ``[1, 16]`` and ``[1, 2, 4, 8, 16]`` do): the second request encodes nothing."""
    cache = tmp_path / "cache"
    first = run_encode(**{**_kw(folder, cache), "shots": (2,)})
    assert not any(r.reused for r in first)
    monkeypatch.setattr(encode_job, "load_clip", _refuse_model)  # encoding anything would need the model
    again = run_encode(**{**_kw(folder, cache), "shots": (1, 2)})
    assert all(r.reused and r.encoded_rows == 0 for r in again)
    assert [r.path for r in again] == [r.path for r in first]
    train = open_store(next(r.path for r in first if r.path.name.startswith("train_")))
    assert set(train.provenance["rows"]) == {"count", "sha256"}  # the rows, and nothing about how they were asked
