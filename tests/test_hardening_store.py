"""Hardening of the cache and the inputs: each failure class is one clear error, never zeros.

Classes: a missing chunk, a corrupt chunk, deleted array metadata, a stuck ``.partial``, disk full, a
decompression bomb, 16-bit images, path escape on import, non-UTF-8 names, symlink loops, bad options,
partial-store housekeeping. Stores are tiny (6 images, 3 chunks) and encoded with random-weight RN50.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from coopipe.cli import app
from coopipe.datasets import load_dataset
from coopipe.datasets.base import Dataset, Split
from coopipe.encode import EncodeOptions, encode_split
from coopipe.errors import BadImageError, CorruptStoreError, StoreError, UnsafePathError
from coopipe.imageio import load_rgb
from coopipe.store import open_store, partial_path
from PIL import Image
from typer.testing import CliRunner

OPTS = dict(precision="fp32", chunk_rows=2, batch_size=6, num_workers=0, progress=False)


def _tiny(root: Path, names: list[str] | None = None) -> Dataset:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i}.png" for i in range(6)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name)
    split = Split(tuple(names), tuple(i % 2 for i in range(len(names))))
    return Dataset("tiny", root, ("cat", "dog"), "a photo of a {}.", {"test": split})


@pytest.fixture
def encoded(tmp_path, rn50):
    data = _tiny(tmp_path / "imgs")
    result = encode_split(data, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)
    return data, result.path, open_store(result.path).read(view=None)


def _reencode(data, tmp_path, rn50):
    return encode_split(data, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)


def test_missing_chunk_is_an_error_and_reencode_repairs_only_it(encoded, tmp_path, rn50):
    data, path, original = encoded
    (path / "features" / "c" / "1" / "0" / "0").unlink()
    (path / "labels" / "c" / "0").unlink()
    with pytest.raises(CorruptStoreError, match=r"features chunk 1 .*missing.*finished chunks are kept"):
        open_store(path)
    result = _reencode(data, tmp_path, rn50)
    assert not result.reused and result.encoded_rows == 2  # only the lost chunk
    store = open_store(result.path, checksums=True)
    np.testing.assert_array_equal(store.read(view=None), original)
    assert store.labels().tolist() == [0, 1, 0, 1, 0, 1]


def test_corrupt_chunk_is_an_error_and_cache_verify_finds_it(encoded, tmp_path, rn50):
    data, path, original = encoded
    chunk0, chunk2 = path / "features/c/0/0/0", path / "features/c/2/0/0"
    chunk2.write_bytes(chunk0.read_bytes())  # decodable, wrong content: only the checksum sees it
    store = open_store(path)  # presence is fine
    with pytest.raises(CorruptStoreError, match="features chunk 2 does not match its checksum"):
        store.read()
    np.testing.assert_array_equal(store.read([0, 1], view=None), original[:2])  # intact chunks still read
    chunk0.write_bytes(chunk0.read_bytes()[:20])  # truncated: blosc fails
    with pytest.raises(CorruptStoreError, match="features chunk 0 is unreadable"):
        store.read([0])
    res = CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c")])
    assert res.exit_code == 1 and "DAMAGED" in res.output and "re-run the same `coopipe encode`" in res.output
    result = _reencode(data, tmp_path, rn50)
    assert result.encoded_rows == 4
    np.testing.assert_array_equal(open_store(result.path, checksums=True).read(view=None), original)
    assert CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c")]).exit_code == 0


def test_deleted_array_metadata_is_an_error_and_reencode_restores_it(encoded, tmp_path, rn50):
    data, path, original = encoded
    (path / "features" / "zarr.json").unlink()
    with pytest.raises(CorruptStoreError, match=r"features/zarr.json is missing"):
        open_store(path)
    result = _reencode(data, tmp_path, rn50)
    assert result.encoded_rows == 0  # every chunk was intact: nothing re-encoded
    np.testing.assert_array_equal(open_store(result.path).read(view=None), original)


@pytest.mark.parametrize("stage", ["empty-folder", "provenance-only", "arrays-no-init"])
def test_stuck_partial_without_complete_creation_restarts(tmp_path, rn50, stage):
    data = _tiny(tmp_path / "imgs")
    first = _reencode(data, tmp_path, rn50)
    original = open_store(first.path).read(view=None)
    import shutil

    partial = partial_path(first.path)
    shutil.move(first.path, partial)
    group = zarr.open_group(str(partial), mode="r+")
    if stage == "empty-folder":
        shutil.rmtree(partial)
        partial.mkdir()
    elif stage == "provenance-only":
        for name in ("features", "labels", "index", "paths", "valid", "done", "checksums"):
            shutil.rmtree(partial / name)
        group.attrs.update({"initialized": False, "complete": False})
    else:
        group.attrs.update({"initialized": False, "complete": False})
    result = _reencode(data, tmp_path, rn50)  # no "started from other inputs ... delete it"
    assert not partial.exists() and result.encoded_rows == 6
    np.testing.assert_array_equal(open_store(result.path).read(view=None), original)


def test_disk_full_while_encoding_keeps_finished_chunks(tmp_path, rn50, monkeypatch):
    data = _tiny(tmp_path / "imgs")
    original_set = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def full_after_chunk_one(self, key, value):
        if "features/c/1" in key:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_after_chunk_one)
    with pytest.raises(StoreError, match=r"cannot write chunk 1 .*disk full.*finished chunks are kept"):
        _reencode(data, tmp_path, rn50)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", original_set)
    result = _reencode(data, tmp_path, rn50)
    assert calls["n"] == 1 and result.encoded_rows == 4  # chunk 0 was kept


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression-bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_follows_on_bad_image(tmp_path, rn50):
    data = _tiny(tmp_path / "imgs")
    (data.image_root / "5.png").write_bytes(_png_claiming(40000, 40000))
    with pytest.raises(BadImageError, match=r"image .*5\.png is too large.*decompression bomb"):
        load_rgb(data.image_root / "5.png")
    with pytest.raises(BadImageError, match=r"5\.png"):
        _reencode(data, tmp_path, rn50)
    opts = EncodeOptions(**{**OPTS, "on_bad_image": "skip"})
    result = encode_split(data, "test", cache_dir=tmp_path / "c", options=opts, clip=rn50)
    assert [s["path"] for s in result.skipped] == ["5.png"]
    assert open_store(result.path).valid().tolist() == [True] * 5 + [False]


def test_wide_grayscale_is_decoded_as_open_clip_decodes(tmp_path, rn50, caplog):
    """Mode I holding 0..255 (kept as it is, not divided by 257), I;16 beyond 255 and fractional F images give
    the features open_clip's own preprocessing gives (PIL convert("RGB")), with a warning where values clip."""
    import torch
    from coopipe.compat import import_open_clip

    root = tmp_path / "imgs"
    root.mkdir()
    ramp = np.linspace(0, 255, 48 * 40).reshape(40, 48)
    images = {
        "i32.tiff": Image.fromarray(ramp.astype(np.int32), mode="I"),
        "i16.png": Image.fromarray((ramp * 200).astype(np.uint16)),
        "f.tiff": Image.fromarray((ramp / 1.7 + 0.4).astype(np.float32)),
        "rgb.png": Image.fromarray(np.stack([ramp.astype(np.uint8)] * 3, axis=-1)),
    }
    for name, img in images.items():
        img.save(root / name)
    with Image.open(root / "i32.tiff") as img:
        assert img.mode == "I"  # a 32-bit integer grayscale file, as reported
    names = tuple(images)
    data = Dataset("tiny", root, ("cat", "dog"), "a photo of a {}.", {"test": Split(names, (0, 1, 0, 1))})
    path = encode_split(data, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50).path
    transform = import_open_clip().image_transform(224, is_train=False)
    with torch.inference_mode():
        direct = rn50.model.encode_image(torch.stack([transform(Image.open(root / n)) for n in names])).numpy()
    cached = open_store(path).read()
    np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    np.testing.assert_array_equal(cached[0], cached[3])  # mode I 0..255 is the same picture as its 8-bit RGB
    caplog.clear()
    load_rgb(root / "i16.png")
    assert "clipped to 0..255 as open_clip does" in caplog.text
    caplog.clear()
    load_rgb(root / "i32.tiff")
    assert "clipped" not in caplog.text


def test_crafted_hdf5_import_cannot_escape_the_cache(encoded, tmp_path):
    import h5py
    from coopipe.hdf5io import export_hdf5, import_hdf5

    _, path, _ = encoded
    h5_path = export_hdf5(open_store(path), tmp_path / "s.h5")
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    for key, value in (("split", "../../outside/x"), ("dataset", ".."), ("dataset", "../outside")):
        with h5py.File(h5_path, "r+") as h5:
            attrs = json.loads(h5.attrs["coopipe"])
            attrs["provenance"][key] = value
            h5.attrs["coopipe"] = json.dumps(attrs)
        with pytest.raises(UnsafePathError, match="not a plain name"):
            import_hdf5(h5_path, tmp_path / "cache2")
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").rglob("*"))
    from coopipe.store import store_path

    crafted = {"dataset": "..", "split": "../../x", "model": "../m", "weights": "open_clip:a/../../b",
               "views": {"n_aug": 0}}
    built = store_path(tmp_path / "cache3", crafted)
    assert (tmp_path / "cache3").resolve() in built.resolve().parents


def test_non_utf8_file_names_are_encoded_and_named(tmp_path, rn50):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(os.fsdecode(bytes(root / cls) + b"/caf\xe9%d.png" % i))
    data = load_dataset("imagefolder", root, val_ratio=0, test_ratio=0.5)
    result = encode_split(data, "test", cache_dir=tmp_path / "c", options=EncodeOptions(**OPTS), clip=rn50)
    assert any("caf\\xe9" in str(p) for p in open_store(result.path).paths())
    bad = os.fsdecode(bytes(root / "cat") + b"/caf\xe91.png")
    Path(bad).write_bytes(b"not an image")
    with pytest.raises(BadImageError) as info:
        load_rgb(bad)
    assert "caf\\xe91.png" in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogates


def test_symlink_loops_in_an_image_folder(tmp_path, rn50):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (0, 60 * i, 0)).save(root / cls / f"{i}.png")
    (root / "cat" / "loop").symlink_to(root / "cat")  # a folder loop: not followed
    (root / "knot").symlink_to(root / "knot")  # a class-level link to itself: skipped, not a traceback
    (root / "dog" / "self.png").symlink_to(root / "dog" / "self.png")  # a file that is a loop
    data = load_dataset("imagefolder", root, val_ratio=0, test_ratio=0.5)
    assert data.classnames == ("cat", "dog")
    opts = EncodeOptions(**{**OPTS, "on_bad_image": "skip"})
    for split in ("train", "test"):
        result = encode_split(data, split, cache_dir=tmp_path / "c", options=opts, clip=rn50)
        assert all("self.png" in s["path"] for s in result.skipped)
    with pytest.raises(BadImageError, match=r"self\.png"):
        load_rgb(root / "dog" / "self.png")


def test_bad_options_are_named_and_leave_no_store(tmp_path):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(root / cls / "0.png")
    base = ["encode", "--dataset", "imagefolder", "--data-root", str(root), "--cache", str(tmp_path / "c"),
            "--pretrained", "none", "--no-progress", "--shots", "all"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--crop-scale", "abc"])
    assert res.exit_code == 2 and "--crop-scale" in res.output
    res = runner.invoke(app, [*base, "--views", "-1"])
    assert res.exit_code == 2 and "--views" in res.output
    assert not (tmp_path / "c").exists()
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    res = runner.invoke(app, [*base, "--pretrained", str(tmp_path / "bad.pt")])  # the last --pretrained wins
    assert res.exit_code == 1 and "bad.pt" in res.output and len(res.output.strip().splitlines()) == 1
    assert not list((tmp_path / "c").rglob("*.zarr*"))
    res = runner.invoke(app, ["encode", "--dataset", "eurosat", "--data-root", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "data root" in res.output and "does not exist" in res.output
    assert "split_file=" not in res.output


def test_partial_stores_are_listed_and_cleaned_and_noop_keeps_summary(tmp_path, encoded, rn50):
    _, path, _ = encoded
    from coopipe.jobs.encode import run_encode

    cache = tmp_path / "cli_cache"
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (i, 0, 0)).save(root / cls / f"{i}.png")
    kw = dict(dataset="imagefolder", data_root=root, splits=("test",), cache_dir=cache, pretrained="none",
              options=EncodeOptions(**OPTS))
    run_encode(**kw)
    summary = next(cache.rglob("encode_summary.json"))
    before = summary.read_text()
    run_encode(**kw)
    assert summary.read_text() == before  # a no-op re-run does not report 0 img/s
    stuck = partial_path(path)
    os.replace(path, stuck)
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "info", str(tmp_path / "c")])
    assert res.exit_code == 0 and str(stuck) in res.output and "partial" in res.output
    res = runner.invoke(app, ["cache", "clean", str(tmp_path / "c")], input="n\n")
    assert res.exit_code == 1 and stuck.exists()
    res = runner.invoke(app, ["cache", "clean", str(tmp_path / "c"), "--yes"])
    assert res.exit_code == 0 and not stuck.exists()


def test_manifest_paths_outside_the_root_allowed_by_default_refused_with_confine(tmp_path):
    from coopipe.jobs.encode import run_encode

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "x.png")
    root = tmp_path / "data"
    root.mkdir()
    rows = ["path,label,split"]
    for i, label in enumerate(("cat", "dog") * 2):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{label},{'train' if i < 2 else 'test'}")
    rows.append("../elsewhere/x.png,cat,test")
    rows.append(f"{outside / 'x.png'},dog,test")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset("manifest", root / "m.csv")  # allowed by default (documented in the README)
    assert "../elsewhere/x.png" in data.split("test").paths
    with pytest.raises(UnsafePathError, match=r"2 image path\(s\) listed in .*m\.csv lie outside"):
        run_encode(dataset="manifest", data_root=root / "m.csv", cache_dir=tmp_path / "c", confine_paths=True)
    res = CliRunner().invoke(app, ["encode", "--dataset", "manifest", "--data-root", str(root / "m.csv"),
                                   "--cache", str(tmp_path / "c"), "--confine-paths", "--shots", "all"])
    assert res.exit_code == 1 and "outside" in res.output and not (tmp_path / "c").exists()


def test_bad_view_options_from_params_are_refused_before_any_file(tmp_path):
    from coopipe.errors import ParamsError
    from coopipe.jobs.encode import run_encode

    for views, scale in ((-1, (0.08, 1.0)), (2, (0.9, 0.1))):
        with pytest.raises(ParamsError):
            run_encode(dataset="eurosat", data_root=tmp_path, cache_dir=tmp_path / "c", views=views, crop_scale=scale)
    assert not (tmp_path / "c").exists()


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _edit_attrs(store: Path, change) -> None:
    _edit_json(store / "zarr.json", lambda meta: change(meta["attributes"]))


@pytest.mark.parametrize("edit", ["dtype-int16", "empty-json", "shape"])
def test_changed_array_metadata_is_damage_and_reencode_restores_it(tmp_path, rn50, edit):
    data = _tiny(tmp_path / "imgs")
    opts = EncodeOptions(**{**OPTS, "dtype": "float16"})
    path = encode_split(data, "test", cache_dir=tmp_path / "c", options=opts, clip=rn50).path
    original = open_store(path).read(view=None)
    meta = path / "features" / "zarr.json"
    if edit == "dtype-int16":  # same bytes, other meaning: the chunk checksums alone cannot see it
        _edit_json(meta, lambda m: m.update(data_type="int16"))
    elif edit == "empty-json":
        meta.write_text("{}")
    else:
        _edit_json(meta, lambda m: m.update(shape=[4, 1, 1024]))
    with pytest.raises(CorruptStoreError, match=r"features/zarr.json (differs|is missing)"):
        open_store(path)
    res = CliRunner().invoke(app, ["cache", "verify", str(path)])
    assert res.exit_code == 1 and "DAMAGED" in res.output and "Traceback" not in res.output
    result = encode_split(data, "test", cache_dir=tmp_path / "c", options=opts, clip=rn50)
    assert result.encoded_rows == 0  # metadata restored from the bound copy, no chunk re-encoded
    np.testing.assert_array_equal(open_store(result.path, checksums=True).read(view=None), original)


@pytest.mark.parametrize("edit", ["integrity-0", "no-integrity", "classnames", "provenance-list", "array-meta",
                                  "root-deleted"])
def test_altered_store_attributes_are_refused_and_reencode_rebuilds(encoded, tmp_path, rn50, edit):
    data, path, original = encoded
    changes = {
        "integrity-0": lambda a: a.update(integrity=0),
        "no-integrity": lambda a: a.pop("integrity"),
        "classnames": lambda a: a["provenance"].update(classnames=["dog", "cat"]),
        "provenance-list": lambda a: a.update(provenance=["x"]),
        "array-meta": lambda a: a["array_meta"]["features"].update(data_type="int16"),
    }
    if edit == "root-deleted":
        (path / "zarr.json").unlink()
    else:
        _edit_attrs(path, changes[edit])
    with pytest.raises(StoreError, match="cannot be checked|lost its group metadata|not a coopipe"):
        open_store(path)
    for command in (["cache", "verify", str(path)], ["cache", "info", str(path)]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 1 and "Traceback" not in res.output and "error" in res.output.lower() + "damaged"
    result = _reencode(data, tmp_path, rn50)  # rebuilt: nothing in it could be trusted
    assert result.path == path and result.encoded_rows == 6
    np.testing.assert_array_equal(open_store(path, checksums=True).read(view=None), original)


def test_stores_written_before_metadata_checksums_are_checked_and_say_so(encoded, tmp_path):
    _, path, original = encoded
    _edit_attrs(path, lambda a: (a.pop("meta_digest"), a.update(integrity=1)))
    np.testing.assert_array_equal(open_store(path, checksums=True).read(view=None), original)
    res = CliRunner().invoke(app, ["cache", "verify", str(path)])
    assert res.exit_code == 0 and "provenance not covered" in res.output
    _edit_json(path / "features" / "zarr.json", lambda m: m.update(data_type="int32"))
    with pytest.raises(CorruptStoreError, match="differs from the one recorded"):
        open_store(path)


def test_an_encode_rerun_onto_a_store_of_other_inputs_says_what_differs_and_what_to_do(tmp_path, rn50):
    """A store folder copied or renamed onto another's name: re-running encode cannot help, the message says what
    differs and what can (move or delete the store, a new --cache; `coopipe cache clean` for a partial one)."""
    import shutil

    data = _tiny(tmp_path / "imgs")
    other = Dataset(data.name, data.image_root, ("kitten", "dog"), data.template, data.splits)
    mine = _reencode(data, tmp_path, rn50).path
    target = _reencode(other, tmp_path, rn50).path
    shutil.rmtree(target)
    shutil.copytree(mine, target)
    for state in ("complete", "partial"):
        if state == "partial":
            shutil.move(target, partial_path(target))
            zarr.open_group(str(partial_path(target)), mode="r+").attrs.update({"complete": False})
        with pytest.raises(StoreError) as info:
            _reencode(other, tmp_path, rn50)
        message = str(info.value)
        assert "classnames" in message and "\n" not in message, message
        if state == "complete":
            assert f"move or delete {target}" in message and "new --cache folder" in message, message
        else:
            assert f"coopipe cache clean {tmp_path / 'c'} --yes" in message, message
        assert "re-encode with the current settings" not in message
