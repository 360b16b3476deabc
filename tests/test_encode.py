"""The encode stage on real EuroSAT images with RN50 (random weights): store content, parity with open_clip,
resume after a kill, reuse and mismatch, dask scale-out, HDF5 round trip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from coopipe.compat import import_open_clip
from coopipe.encode import EncodeOptions, encode_split
from coopipe.errors import IncompleteStoreError, ProvenanceMismatchError
from coopipe.store import find_stores, open_store, partial_path
from coopipe.views import ViewSpec

N_ROWS = 48  # a full chunk of 32 rows and a partial one
POSITIONS = list(range(0, 8100, 8100 // N_ROWS))[:N_ROWS]  # spread over all 10 classes of the test split
FP32 = EncodeOptions(precision="fp32", chunk_rows=32, batch_size=32, num_workers=1, progress=False)


@pytest.fixture(scope="module")
def fp32_store(eurosat, rn50, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = encode_split(eurosat, "test", cache_dir=cache, positions=POSITIONS, options=FP32, clip=rn50)
    return result


def test_store_shape_dtype_attrs_labels(fp32_store, eurosat):
    store = open_store(fp32_store.path)
    assert store.features.shape == (N_ROWS, 1, 1024)
    assert store.features.dtype == np.float16
    assert store.features.chunks == (32, 1, 1024)
    test = eurosat.split("test")
    assert store.labels().tolist() == [test.labels[p] for p in POSITIONS]
    assert store.index().tolist() == POSITIONS
    assert store.paths().tolist() == [test.paths[p] for p in POSITIONS]
    assert len(set(store.labels().tolist())) == 10
    prov = store.provenance
    assert prov["model"] == "RN50" and prov["weights"] == "random-init:seed=0"
    assert prov["dataset"] == "eurosat" and prov["split"] == "test"
    assert prov["file_list_sha256"] == eurosat.file_list_hash("test")
    assert prov["preprocess"]["image_size"] == 224 and prov["preprocess"]["interpolation"] == "bicubic"
    assert prov["views"]["n_aug"] == 0 and prov["precision"] == "fp32"
    assert prov["classnames"][0] == "Annual Crop Land"
    assert prov["open_clip_version"] and prov["coopipe_version"]
    assert store.attrs["complete"] is True
    assert not partial_path(fp32_store.path).exists()


def test_features_equal_direct_encode_image(fp32_store, eurosat, rn50):
    """The cache holds exactly what model.encode_image gives on open_clip's own preprocessing."""
    open_clip = import_open_clip()
    from PIL import Image

    transform = open_clip.image_transform(224, is_train=False)
    rows = [0, 5, 31, 32, N_ROWS - 1]  # both chunks, on either side of their boundary
    test = eurosat.split("test")
    batch = torch.stack([transform(Image.open(eurosat.image_root / test.paths[POSITIONS[r]])) for r in rows])
    with torch.inference_mode():
        direct = rn50.model.encode_image(batch).float().numpy()
    cached = open_store(fp32_store.path).read(rows)
    np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())


def test_bf16_features_close_to_fp32(fp32_store, eurosat, rn50, tmp_path):
    opts = EncodeOptions(precision="bf16", chunk_rows=32, batch_size=32, num_workers=0, progress=False)
    result = encode_split(eurosat, "test", cache_dir=tmp_path, positions=POSITIONS[:16], options=opts, clip=rn50)
    assert result.path != fp32_store.path  # precision is part of the store's identity
    a = open_store(result.path).read()
    b = open_store(fp32_store.path).read(list(range(16)))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


def test_rerun_is_noop_and_other_inputs_other_store(fp32_store, eurosat, rn50):
    cache = fp32_store.path.parents[1]
    again = encode_split(eurosat, "test", cache_dir=cache, positions=POSITIONS, options=FP32, clip=rn50)
    assert again.reused and again.encoded_rows == 0 and again.path == fp32_store.path
    other = encode_split(eurosat, "test", cache_dir=cache, positions=POSITIONS[:10], options=FP32, clip=rn50)
    assert not other.reused and other.path != fp32_store.path
    assert {s.path for s in find_stores(cache, "eurosat", "test")} >= {fp32_store.path, other.path}


def test_reader_expecting_other_inputs_gets_mismatch_error(fp32_store):
    with pytest.raises(ProvenanceMismatchError, match="model: store has 'RN50', expected 'ViT-B-32'"):
        open_store(fp32_store.path, expect={"model": "ViT-B-32"})
    with pytest.raises(ProvenanceMismatchError, match="weights"):
        open_store(fp32_store.path, expect={"weights": "open_clip:RN50/openai"})
    with pytest.raises(ProvenanceMismatchError, match="views.n_aug"):
        open_store(fp32_store.path, expect={"views": {"n_aug": 4}})
    open_store(fp32_store.path, expect={"model": "RN50", "split": "test"})  # matching expectations pass


_KILL_SCRIPT = """
import sys
from coopipe.datasets import load_dataset
from coopipe.encode import EncodeOptions, encode_split
ds = load_dataset("eurosat", sys.argv[1])
positions = [int(x) for x in sys.argv[3].split(",")]
encode_split(ds, "test", cache_dir=sys.argv[2], positions=positions,
             options=EncodeOptions(precision="fp32", chunk_rows=16, batch_size=16, num_workers=0, progress=False))
"""


@pytest.mark.slow  # a real encode killed mid-run, then resumed: about a minute
def test_kill_and_resume(fp32_store, eurosat, eurosat_root, rn50, tmp_path):
    """SIGKILL an encode after its first chunks; the partial store is unreadable; a re-run finishes only the rest."""
    positions = POSITIONS  # three chunks of 16
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(eurosat_root), str(tmp_path), ",".join(map(str, positions))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    partial = None
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("eurosat/*.zarr.partial"))
            if found:
                try:
                    done = zarr.open_group(str(found[0]), mode="r")["done"][:]
                except (KeyError, FileNotFoundError):  # the partial store is still being created
                    time.sleep(0.2)
                    continue
                if done.sum() >= 1:
                    partial = found[0]
                    break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert partial is not None, f"encode never wrote a chunk: {proc.stderr.read().decode()[-2000:]}"
    final = partial.with_name(partial.name[: -len(".partial")])
    done_before = int(zarr.open_group(str(partial), mode="r")["done"][:].sum())
    assert 1 <= done_before < len(positions) // 16
    with pytest.raises(IncompleteStoreError, match="re-run the same"):
        open_store(final)
    opts = EncodeOptions(precision="fp32", chunk_rows=16, batch_size=16, num_workers=0, progress=False)
    resumed = encode_split(eurosat, "test", cache_dir=tmp_path, positions=positions, options=opts, clip=rn50)
    assert resumed.path == final and not resumed.reused
    assert resumed.encoded_rows == len(positions) - 16 * done_before  # only the missing chunks were computed
    got = open_store(final).read()
    want = open_store(fp32_store.path).read()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.slow  # a 2-process LocalCluster, each worker loading RN50: about 45 s on 2 cores
def test_dask_local_cluster_equals_in_process(fp32_store, eurosat, rn50, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as cluster:
        result = encode_split(eurosat, "test", cache_dir=tmp_path, positions=POSITIONS, options=FP32,
                              scheduler=cluster.scheduler_address, clip=rn50)
    dist = open_store(result.path)
    local = open_store(fp32_store.path)
    assert result.path.name == fp32_store.path.name  # same inputs, same store identity
    assert dist.provenance == local.provenance
    np.testing.assert_array_equal(dist.labels(), local.labels())
    np.testing.assert_array_equal(dist.index(), local.index())
    a, b = dist.read(), local.read()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_augmented_views_are_seeded_per_image(eurosat, rn50, tmp_path):
    """Views depend only on (seed, image, view): encoding a subset gives the same views for shared images."""
    opts = EncodeOptions(precision="fp32", chunk_rows=8, batch_size=24, num_workers=0, progress=False)
    spec = ViewSpec(n_aug=2, seed=7)
    a = encode_split(eurosat, "train", cache_dir=tmp_path, positions=[3, 10, 500], views=spec, options=opts, clip=rn50)
    b = encode_split(eurosat, "train", cache_dir=tmp_path, positions=[10, 500], views=spec, options=opts, clip=rn50)
    fa, fb = open_store(a.path).read(view=None), open_store(b.path).read(view=None)
    assert fa.shape == (3, 3, 1024)
    np.testing.assert_allclose(fa[1:], fb, rtol=1e-4, atol=1e-3)
    assert not np.allclose(fa[:, 0], fa[:, 1])  # augmented views differ from the centre view
    assert open_store(a.path).provenance["views"]["scale"] == [0.08, 1.0]


def test_hdf5_round_trip(fp32_store, tmp_path):
    from coopipe.hdf5io import export_hdf5, import_hdf5

    store = open_store(fp32_store.path)
    h5 = export_hdf5(store, tmp_path / "feats.h5")
    imported = open_store(import_hdf5(h5, tmp_path / "cache"))
    assert imported.path.name == store.path.name
    assert imported.provenance == store.provenance
    np.testing.assert_array_equal(imported.read(), store.read())
    np.testing.assert_array_equal(imported.labels(), store.labels())
