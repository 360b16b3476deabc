"""Models by folder or Hub name: a tiny CLIP saved with open_clip's ``save_for_hf`` from random weights goes through
encode, train, eval, export and predict as ``local-dir:PATH``; its provenance records the weight file's hash, and
changing the weights changes the store key (and the old run refuses the new weights). Offline, an ``hf-hub:`` name
that is not in the local Hub cache fails in seconds with one line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from coopipe.cli import app
from coopipe.compat import import_open_clip
from coopipe.errors import CheckpointError, WeightsError
from coopipe.models import load_clip, sha256_file
from coopipe.predict import predict
from coopipe.store import find_stores, provenance_key

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("red", "green", "blue")
TINY = {  # a CLIP small enough to save, encode and train in seconds; CLIP's tokenizer and text layout
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny(folder: Path, seed: int) -> Path:
    """``TINY`` with random weights drawn from ``seed``, written by open_clip's own ``save_for_hf``."""
    open_clip = import_open_clip()
    from open_clip.push_to_hf_hub import save_for_hf

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY)
    model.visual.image_mean, model.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    # CLIP's BPE tokenizer is rebuilt by open_clip from the config (no hf_tokenizer_name): nothing to save for it
    save_for_hf(model, SimpleNamespace(save_pretrained=lambda dest: None), TINY, str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder: 3 classes x 6 synthetic images (tinted noise)."""
    root = tmp_path_factory.mktemp("colours") / "colours"
    g = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = g.integers(0, 120, (48, 56, 3))
            pixels[..., c] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{name}{i}.png")
    return root


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_local_dir_model_end_to_end(images, tmp_path):
    folder = save_tiny(tmp_path / "tiny-clip", seed=0)
    weights_file = folder / "open_clip_model.safetensors"
    name = f"local-dir:{folder}"
    cache, run, out = tmp_path / "cache", tmp_path / "run", tmp_path / "export"
    encode = ["encode", "--dataset", "imagefolder", "--data-root", str(images), "--cache", str(cache), "--model", name,
              "--views", "1", "--shots", "2", "--seeds", "1", "--no-progress", "--workers", "0", "--batch-size", "16"]
    assert _ok(["models", name]).startswith(f"{name}: yes")
    _ok(encode)  # --pretrained left at its default: a folder name brings its own weights
    stores = find_stores(cache, "imagefolder-colours", "train")
    assert len(stores) == 1
    prov = stores[0].provenance
    assert prov["model"] == name and prov["weights"] == f"local-dir:open_clip_model.safetensors@sha256:{sha256_file(weights_file)}"
    assert prov["preprocess"]["image_size"] == 64

    _ok(["train", "--features", str(cache), "--dataset", "imagefolder-colours", "--shots", "2", "--seed", "1",
         "--out", str(run), "--epochs", "2", "--n-ctx", "4", "--no-progress"])
    _ok(["eval", str(run), "--features", str(cache)])
    assert json.loads((run / "metrics.json").read_text())["n"] > 0
    _ok(["export", str(run), str(out)])
    record = json.loads((out / "export.json").read_text())
    assert record["model"]["name"] == name and record["model"]["pretrained"] == "bundled"
    files = sorted(images.rglob("*.png"))[::4]
    assert predict(out, files, topk=2) == predict(run, files, topk=2)

    # other weights in the same folder: another identity, so another store (never a reuse of the old features) ...
    save_tiny(folder, seed=1)
    clip = load_clip(name, "bundled")
    assert clip.weights_id != prov["weights"]
    _ok(encode)
    keys = {provenance_key(s.provenance) for s in find_stores(cache, "imagefolder-colours", "train")}
    assert len(keys) == 2
    # ... and the run trained on the old weights refuses them
    with pytest.raises(CheckpointError, match="trained with"):
        predict(run, files, clip=clip)


def test_hub_name_not_cached_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsError, match="not in the local Hub cache"):
        load_clip("hf-hub:coopipe-tests/no-such-model", "bundled")
    assert time.monotonic() - start < 10
    res = CliRunner().invoke(app, ["encode", "--dataset", "imagefolder", "--data-root", str(tmp_path),
                                   "--model", "hf-hub:coopipe-tests/no-such-model", "--cache", str(tmp_path / "c")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "hf-hub:coopipe-tests/no-such-model" in res.output


def test_hub_name_from_the_local_hub_cache(monkeypatch, tmp_path):
    """A Hub repo laid out in a Hub cache as huggingface_hub writes it (refs/main -> snapshots/<revision>/)
    loads offline; its identity is the repo at that revision, its weights those of the saved folder."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--coopipe-tests--tiny-clip"
    save_tiny(repo / "snapshots" / revision, seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = load_clip("hf-hub:coopipe-tests/tiny-clip", "bundled")
    assert clip.weights_id == f"hf-hub:coopipe-tests/tiny-clip@{revision}"
    local = load_clip(f"local-dir:{repo / 'snapshots' / revision}", "bundled")
    assert all(torch.equal(a, b) for a, b in zip(clip.model.state_dict().values(), local.model.state_dict().values()))
    assert clip.preprocess == local.preprocess and clip.preprocess.image_size == 64
