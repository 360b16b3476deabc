"""Bad images at encode time: mode conversion, the fail/skip policies, and that finished work survives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from coopipe.datasets.base import Dataset, Split
from coopipe.encode import EncodeOptions, encode_split
from coopipe.errors import BadImageError
from coopipe.store import open_store, partial_path


def _make_images(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(root / "b_gray.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "c_cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "d_rgba.png")
    Image.fromarray(rgb).save(root / "e_rgb2.jpg")
    data = (root / "a_rgb.jpg").read_bytes()
    (root / "f_truncated.jpg").write_bytes(data[: len(data) // 3])
    return ["a_rgb.jpg", "b_gray.png", "c_cmyk.jpg", "d_rgba.png", "e_rgb2.jpg", "f_truncated.jpg"]


@pytest.fixture
def tiny(tmp_path) -> Dataset:
    paths = _make_images(tmp_path / "imgs")
    split = Split(tuple(paths), (0, 1, 0, 1, 0, 1))
    return Dataset("tiny", tmp_path / "imgs", ("cat", "dog"), "a photo of a {}.", {"test": split})


OPTS = dict(precision="fp32", chunk_rows=2, batch_size=2, num_workers=0, progress=False)


def test_fail_policy_names_the_file_and_keeps_finished_chunks(tiny, rn50, tmp_path):
    with pytest.raises(BadImageError, match=r"f_truncated\.jpg.*--on-bad-image skip"):
        encode_split(tiny, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)
    partials = list((tmp_path / "c" / "tiny").glob("*.partial"))
    assert len(partials) == 1
    import zarr

    done = zarr.open_group(str(partials[0]), mode="r")["done"][:]
    assert done.tolist() == [True, True, False]  # grayscale, CMYK and RGBA images were fine and are kept
    # Fix the file, re-run: only the last chunk is encoded.
    Image.new("RGB", (30, 30), (200, 10, 10)).save(tiny.image_root / "f_truncated.jpg", format="JPEG")
    fixed = Dataset(tiny.name, tiny.image_root, tiny.classnames, tiny.template, tiny.splits)
    result = encode_split(fixed, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)
    assert result.encoded_rows == 2
    assert open_store(result.path).valid().all()


def test_skip_policy_writes_a_report_and_marks_rows_invalid(tiny, rn50, tmp_path):
    opts = EncodeOptions(**OPTS, on_bad_image="skip")
    result = encode_split(tiny, "test", cache_dir=tmp_path / "c", options=opts, clip=rn50)
    store = open_store(result.path)
    assert store.valid().tolist() == [True, True, True, True, True, False]
    report = json.loads(Path(str(result.path) + ".skipped.json").read_text())
    assert [r["path"] for r in report] == ["f_truncated.jpg"] and "cannot decode" in report[0]["error"]
    assert store.attrs["skipped"] == report
    assert np.isfinite(store.read()).all() and not partial_path(result.path).exists()
    with pytest.raises(Exception, match="skipped as unreadable"):
        store.rows_for([5])


def test_cli_encode_info_and_bad_image_exit_code(tmp_path):
    from coopipe.cli import app

    folder = tmp_path / "folder"
    for cls, color in (("cat", (250, 0, 0)), ("dog", (0, 0, 250))):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32 + i, 32), color).save(folder / cls / f"{i}.png")
    runner = CliRunner()
    args = ["encode", "--dataset", "imagefolder", "--data-root", str(folder), "--split", "test",
            "--cache", str(tmp_path / "cache"), "--precision", "fp32", "--no-progress", "--pretrained", "none",
            "--views", "0", "--shots", "all"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "encoded" in res.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "reused" in again.output
    info = runner.invoke(app, ["cache", "info", str(tmp_path / "cache"), "--json"])
    assert info.exit_code == 0, info.output
    parsed = json.loads(info.output)
    assert parsed["provenance"]["model"] == "RN50" and parsed["provenance"]["dataset"].startswith("imagefolder")
    (folder / "dog" / "0.png").write_bytes(b"\x89PNG broken")
    bad = runner.invoke(app, [*args, "--split", "train"])
    assert bad.exit_code == 1
    assert "0.png" in bad.output and "--on-bad-image skip" in bad.output
    unknown = runner.invoke(app, ["encode", "--dataset", "nosuch", "--data-root", str(folder)])
    assert unknown.exit_code == 1 and "unknown dataset 'nosuch'" in unknown.output
