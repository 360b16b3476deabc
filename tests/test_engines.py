"""The image-tower engines (coopipe.engines): the auto rule, ONNX Runtime's features against eager fp32, the export
cache (reused, a damaged file exported again), the fallback, and an end-to-end encode that records the engine."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coopipe.encode import EncodeOptions
from coopipe.engines import build_tower, export_path, resolve_engine
from coopipe.errors import EngineError
from coopipe.jobs.encode import run_encode
from coopipe.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "eurosat" / "2750"  # shipped in the repository


def _has_ort() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


needs_ort = pytest.mark.skipif(not _has_ort(), reason="onnxruntime/onnx not installed (pip install 'coopipe[onnx]')")


def _hide_ort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import onnxruntime`` fail, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cosine.min()), float((a - b).abs().max())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """4 normalised-looking 224 px inputs (the model's real size: the export is shape-specialised but batch-free)."""
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "requested, precision, device, installed, expected",
    [
        ("auto", "fp32", "cpu", True, "onnxruntime"),
        ("auto", "bf16", "cpu", True, "eager"),  # ORT's CPU provider has no fast bf16
        ("auto", "fp16", "cpu", True, "eager"),
        ("auto", "fp32", "cuda", True, "eager"),  # ORT here is the CPU provider only
        ("auto", "fp32", "cpu", False, "eager"),  # package missing
        ("eager", "fp32", "cpu", True, "eager"),
        ("onnxruntime", "fp32", "cpu", True, "onnxruntime"),
    ],
)
def test_auto_rule(requested, precision, device, installed, expected, monkeypatch, caplog) -> None:
    if installed and not _has_ort():
        pytest.skip("onnxruntime/onnx not installed")
    if not installed:
        _hide_ort(monkeypatch)
    with caplog.at_level("INFO", logger="coopipe.engines"):
        assert resolve_engine(requested, precision, device) == expected
    assert f"engine {requested}" in caplog.text  # the choice and its reason are logged
    if requested == "auto" and not installed:
        assert "pip install 'coopipe[onnx]'" in caplog.text


def test_resolved_options_never_hold_auto(monkeypatch) -> None:
    bf16 = EncodeOptions(precision="bf16").resolved()
    assert (bf16.precision, bf16.engine) == ("bf16", "eager")
    fp32 = EncodeOptions(precision="fp32").resolved()
    assert fp32.engine == ("onnxruntime" if _has_ort() else "eager")
    _hide_ort(monkeypatch)
    assert EncodeOptions(precision="fp32").resolved().engine == "eager"


def test_explicit_onnxruntime_that_cannot_run_is_a_one_line_error(monkeypatch) -> None:
    with pytest.raises(EngineError, match=r"--precision fp32") as bf16:
        resolve_engine("onnxruntime", "bf16", "cpu")
    with pytest.raises(EngineError, match=r"--engine eager") as cuda:
        resolve_engine("onnxruntime", "fp32", "cuda")
    _hide_ort(monkeypatch)
    with pytest.raises(EngineError, match=r"pip install 'coopipe\[onnx\]'") as missing:
        EncodeOptions(precision="fp32", engine="onnxruntime").resolved()
    for exc in (bf16, cuda, missing):
        assert "\n" not in str(exc.value) and "onnxruntime" in str(exc.value)
    with pytest.raises(ValueError, match="engine must be one of"):
        EncodeOptions(engine="tensorrt")


@needs_ort
def test_onnxruntime_features_equal_eager_fp32(rn50, images) -> None:
    """ORT on the shared export cache (default folder: exported once for every test and feature cache)."""
    ort = build_tower(rn50, "auto", "fp32", "cpu")
    eager = build_tower(rn50, "eager", "fp32", "cpu")
    assert (ort.engine, eager.engine) == ("onnxruntime", "eager")
    got, want = ort(images), eager(images)
    assert got.dtype == torch.float32 and got.shape == want.shape == (4, 1024)
    cos, diff = _compare(got, want)
    assert cos >= 0.9999, f"min cosine {cos:.7f}, max abs diff {diff:.2e}"
    assert diff <= 1e-4 * float(want.abs().max()), f"max abs diff {diff:.2e}"


@pytest.mark.slow  # two ONNX exports of RN50: over 30 s
@needs_ort
def test_export_cache_is_reused_and_a_damaged_file_exported_again(rn50, images, tmp_path) -> None:
    first = build_tower(rn50, "onnxruntime", "fp32", "cpu", export_dir=tmp_path)
    path = export_path(rn50, tmp_path)
    assert path.is_file() and path.with_name(path.name + ".sha256").is_file()
    assert [p.name for p in tmp_path.glob("*.onnx")] == [path.name]
    stamp, size = path.stat().st_mtime_ns, path.stat().st_size
    want = first(images)
    build_tower(rn50, "onnxruntime", "fp32", "cpu", export_dir=tmp_path)
    assert path.stat().st_mtime_ns == stamp  # the second build loaded the file: no new export
    with open(path, "r+b") as fh:  # a half-written file (e.g. copied in by hand, or a disk fault)
        fh.truncate(size // 2)
    leftover = tmp_path / f".{path.name}.x1y2.tmp.onnx"  # the temporary of an export killed mid-way
    leftover.write_bytes(b"partial")
    again = build_tower(rn50, "onnxruntime", "fp32", "cpu", export_dir=tmp_path)
    assert path.stat().st_size == size and path.stat().st_mtime_ns != stamp  # detected and exported again
    assert not leftover.exists()
    cos, diff = _compare(again(images), want)
    assert cos >= 0.9999, f"min cosine {cos:.7f}, max abs diff {diff:.2e}"


@needs_ort
def test_export_key_tells_weights_apart(rn50) -> None:
    """Random weights and a checkpoint of the same model must not share a file: the key hashes the state."""
    before = export_path(rn50, "/x")
    param = rn50.model.visual.attnpool.c_proj.bias
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
        try:
            assert export_path(rn50, "/x") != before
        finally:
            param.copy_(saved)
    assert export_path(rn50, "/x") == before


@needs_ort
def test_auto_falls_back_to_eager_when_the_export_fails(rn50, images, tmp_path, caplog) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the export folder should be")
    with caplog.at_level("WARNING", logger="coopipe.engines"):
        tower = build_tower(rn50, "auto", "fp32", "cpu", export_dir=blocked)
    assert tower.engine == "eager" and "running the eager tower instead" in caplog.text
    assert tower(images).shape == (4, 1024)
    with pytest.raises(EngineError, match="--engine eager"):
        build_tower(rn50, "onnxruntime", "fp32", "cpu", export_dir=blocked)


@needs_ort
def test_run_encode_records_onnxruntime_and_matches_eager(tmp_path) -> None:
    """End to end on a tiny image folder: auto at fp32 runs ORT and says so; an eager store of the same images is
    another store (never reused or extended across engines) with the same features."""
    folder = tmp_path / "tiny"
    for cls in ("Forest", "SeaLake"):
        (folder / cls).mkdir(parents=True)
        for src in sorted((SAMPLE / cls).glob("*.jpg"))[:3]:
            shutil.copy(src, folder / cls / src.name)
    common = dict(dataset="imagefolder", data_root=folder, splits=("train", "test"), cache_dir=tmp_path / "cache",
                  model="RN50", pretrained="none", views=0)

    def opts(**kw) -> EncodeOptions:
        return EncodeOptions(precision="fp32", batch_size=4, chunk_rows=2, num_workers=0, progress=False, **kw)

    ort = run_encode(**common, options=opts())
    eager = run_encode(**common, options=opts(engine="eager"))
    for a, b in zip(ort, eager):
        assert not b.reused and a.path != b.path  # the engine is part of the store's key
        pa, pb = open_store(a.path).provenance, open_store(b.path).provenance
        assert (pa["engine"], pb["engine"]) == ("onnxruntime", "eager") and pa["precision"] == "fp32"
        fa, fb = torch.from_numpy(open_store(a.path).read()), torch.from_numpy(open_store(b.path).read())
        cos, diff = _compare(fa, fb)
        assert cos >= 0.9999, f"{a.path.name}: min cosine {cos:.7f}, max abs diff {diff:.2e}"
        np.testing.assert_array_equal(open_store(a.path).index(), open_store(b.path).index())
    again = run_encode(**common, options=opts(engine="onnxruntime"))  # explicit = what auto resolved to
    assert all(r.reused for r in again) and [r.path for r in again] == [r.path for r in ort]
