"""Model loading: the torchvision shim, random weights, a local checkpoint file, and failing fast offline."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from coopipe.errors import WeightsError
from coopipe.models import load_clip, resolve_weights, sha256_file

pytestmark = pytest.mark.fresh_models  # each load builds its model: reproducibility is what is tested


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


def test_the_activation_follows_open_clip_s_pretrained_table() -> None:
    """OpenAI's weights were trained with QuickGELU: their tag forces it onto a GELU model name, and the identity says
    so (stores and checkpoints of the GELU build never match); a ``-quickgelu`` name, other tags and files unchanged."""
    from coopipe.lookup import pretrained_for
    from coopipe.models import tag_forces_quick_gelu, tag_identity, tag_of_identity

    for name in ("RN50", "ViT-B-32", "ViT-B-16"):
        assert tag_forces_quick_gelu(name, "openai")
        assert tag_identity(name, "openai") == f"open_clip:{name}/openai+quickgelu"
        assert tag_of_identity(tag_identity(name, "openai")) == "openai"
        assert pretrained_for(tag_identity(name, "openai")) == "openai"
    assert not tag_forces_quick_gelu("ViT-B-32-quickgelu", "openai")  # the name already builds QuickGELU
    assert tag_identity("ViT-B-32-quickgelu", "openai") == "open_clip:ViT-B-32-quickgelu/openai"
    assert not tag_forces_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")  # trained with GELU
    assert resolve_weights("ViT-B-32", "openai").identity == "open_clip:ViT-B-32/openai+quickgelu"


def test_a_checkpoint_file_takes_the_activation_of_the_model_name(rn50, tmp_path) -> None:
    from coopipe.models import activation_of

    assert activation_of(rn50.model) == "GELU"  # open_clip's RN50 config (its text tower; the image tower uses ReLU)
    ckpt = tmp_path / "rn50.pt"
    torch.save(rn50.model.state_dict(), ckpt)
    assert activation_of(load_clip("RN50-quickgelu", str(ckpt)).model) == "QuickGELU"
    assert activation_of(load_clip("RN50", str(ckpt)).model) == "GELU"


def test_a_torchscript_archive_is_refused_with_how_to_use_it_without_running_it(tmp_path, monkeypatch) -> None:
    """OpenAI's released files are TorchScript zips: one line saying what to do, found from the zip's table of
    contents (torch.jit.load, which runs the archive's code, is never called)."""

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    archive = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(archive))
    plain = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, plain)

    def never(*args, **kwargs):
        raise AssertionError("torch.jit.load must not run")

    monkeypatch.setattr(torch.jit, "load", never)
    with pytest.raises(WeightsError) as info:
        load_clip("ViT-B-32", str(archive))
    message = str(info.value)
    assert "\n" not in message and "TorchScript" in message and str(archive) in message
    assert "--pretrained openai" in message and "--model ViT-B-32-quickgelu" in message
    assert resolve_weights("ViT-B-32", str(plain)).kind == "file"  # a plain torch.save zip is not TorchScript
