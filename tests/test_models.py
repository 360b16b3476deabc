"""Model loading: the torchvision shim, random weights, a local checkpoint file, and failing fast offline."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from coopipe.errors import WeightsError
from coopipe.models import load_clip, resolve_weights, sha256_file


def test_open_clip_imports_with_the_shim_in_a_fresh_process():
    code = "from coopipe.compat import import_open_clip; oc = import_open_clip(); print(oc.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


def test_shim_does_not_fake_detection_kernels():
    from coopipe.compat import ensure_torchvision_ops, import_open_clip

    import_open_clip()
    if ensure_torchvision_ops() is None:
        pytest.skip("torchvision's C extension loaded here: the shim was not needed")
    import torchvision

    with pytest.raises(Exception):  # no kernel is registered: nms must not silently "work"
        torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


def test_random_weights_are_reproducible(rn50):
    again = load_clip("RN50", "none")
    assert rn50.weights_id == "random-init:seed=0"
    for a, b in zip(rn50.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_local_checkpoint_file_is_loaded_and_identified_by_sha256(tmp_path):
    source = load_clip("ViT-B-32", "none")
    with torch.no_grad():  # make the checkpoint differ from the random init, so loading it is observable
        source.model.text_projection.mul_(2.0)
    ckpt = tmp_path / "vitb32.pt"
    torch.save({"state_dict": source.model.state_dict()}, ckpt)
    loaded = load_clip("ViT-B-32", str(ckpt))
    assert loaded.weights.kind == "file"
    assert loaded.weights_id == f"sha256:{sha256_file(ckpt)}"
    assert torch.equal(loaded.model.text_projection, source.model.text_projection)
    assert not torch.equal(loaded.model.text_projection, load_clip("ViT-B-32", "none").model.text_projection)


def test_bad_weights_arguments_fail_clearly(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("RN50", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="no pretrained tag 'nosuchtag'.*openai"):
        resolve_weights("RN50", "nosuchtag")
    with pytest.raises(WeightsError, match="unknown open_clip model"):
        load_clip("NoSuchNet", "none")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not load weights"):
        load_clip("RN50", str(garbage))


def test_pretrained_tag_without_network_fails_fast(monkeypatch):
    """Offline, a download tag must fail in seconds with a message saying what to set (never hang)."""
    import coopipe.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if models._hub_reachable(timeout=3):
        pytest.skip("the model hub is reachable from this machine: the offline path cannot be observed")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="local checkpoint file.*pretrained: none"):
        load_clip("RN50", "openai")
    assert time.perf_counter() - start < 30
