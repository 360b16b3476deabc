"""`coopipe cache import` reads HDF5 files from anyone: each crafted file is refused in one line, quickly, with
bounded memory, and never makes the import read another file, allocate what the file only declares, or write a
store that says less than the truth (integrity off, wrong dtypes, rows that do not match)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from coopipe.cli import app
from coopipe.errors import StoreError, UnsafePathError
from coopipe.hdf5io import export_hdf5, import_hdf5
from coopipe.store import open_store
from typer.testing import CliRunner


Mutation = Callable[[h5py.File, Path], None]


def _replace(name: str, **create: object) -> Mutation:
    def mutate(h5: h5py.File, _: Path) -> None:
        del h5[name]
        h5.create_dataset(name, **create)
    return mutate


def _attrs(change: Callable[[dict], object]) -> Mutation:
    def mutate(h5: h5py.File, _: Path) -> None:
        attrs = json.loads(h5.attrs["coopipe"])
        change(attrs)
        h5.attrs["coopipe"] = json.dumps(attrs)
    return mutate


def _external_storage(h5: h5py.File, tmp: Path) -> None:
    victim = tmp / "secret.txt"
    victim.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    del h5["labels"]
    h5.create_dataset("labels", shape=(6,), dtype="int32", external=[(str(victim), 0, 24)])


def _external_link(h5: h5py.File, tmp: Path) -> None:
    with h5py.File(tmp / "other.h5", "w") as other:
        other.create_dataset("labels", data=np.zeros(6, np.int32))
    del h5["labels"]
    h5["labels"] = h5py.ExternalLink(str(tmp / "other.h5"), "/labels")


def _soft_link(h5: h5py.File, _: Path) -> None:
    del h5["labels"]
    h5["labels"] = h5py.SoftLink("/index")


def _virtual(h5: h5py.File, tmp: Path) -> None:
    with h5py.File(tmp / "other.h5", "w") as other:
        other.create_dataset("labels", data=np.zeros(6, np.int32))
    layout = h5py.VirtualLayout(shape=(6,), dtype="int32")
    layout[:] = h5py.VirtualSource(str(tmp / "other.h5"), "labels", shape=(6,))
    del h5["labels"]
    h5.create_virtual_dataset("labels", layout)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CRAFTED: dict[str, tuple[Mutation, type[Exception], str]] = {
    "external-storage": (_external_storage, UnsafePathError, "other files"),
    "external-link": (_external_link, UnsafePathError, "ExternalLink"),
    "soft-link": (_soft_link, UnsafePathError, "SoftLink"),
    "virtual": (_virtual, UnsafePathError, "other files"),
    "1e8-rows": (_replace("features", shape=(10**8, 1, 1024), chunks=(256, 1, 1024), dtype="float32"),
                 StoreError, "stores 0 of"),
    "1e9-dim": (_replace("features", shape=(6, 1, 10**9), chunks=(2, 1, 4096), dtype="float32"), StoreError,
                "chunks|shape"),
    "1e12-labels": (_replace("labels", shape=(10**12,), chunks=(10**6,), dtype="int32"), StoreError, "stores 0 of"),
    "contiguous-1e9": (_replace("labels", shape=(10**9,), dtype="int32"), StoreError, "declares shape"),
    "huge-chunk": (_replace("labels", shape=(6,), chunks=(6,), maxshape=(None,), dtype="int32",
                            data=np.zeros(6, np.int32)), StoreError, None),
    "features-int8": (_replace("features", data=np.ones((6, 1, 1024), np.int8)), StoreError, "features are int8"),
    "features-bool": (_replace("features", data=np.ones((6, 1, 1024), bool)), StoreError, "features are bool"),
    "features-uint64": (_replace("features", data=np.ones((6, 1, 1024), np.uint64)), StoreError, "uint64"),
    "features-complex": (_replace("features", data=np.ones((6, 1, 1024), np.complex64)), StoreError, "complex"),
    "features-strings": (_replace("features", data=np.full((6, 1, 4), "x", dtype=object), dtype=h5py.string_dtype()),
                         StoreError, "features are object"),
    "features-2d": (_replace("features", data=np.ones((6, 1024), np.float32)), StoreError, "features have shape"),
    "features-nan": (_replace("features", data=np.full((6, 1, 1024), np.nan, np.float32)), StoreError, "NaN"),
    "labels-fractional": (_replace("labels", data=np.array([0, 1.5, 0, 1, 0, 1])), StoreError, "whole numbers"),
    "labels-out-of-range": (_replace("labels", data=np.array([0, 1, 2, 1, 0, 7], np.int32)), StoreError,
                            "labels range"),
    "labels-negative": (_replace("labels", data=np.array([0, 1, -1, 1, 0, 1], np.int32)), StoreError, "labels range"),
    "rows-mismatch": (_replace("labels", data=np.zeros(5, np.int32)), StoreError, "features have 6 rows"),
    "index-repeated": (_replace("index", data=np.zeros(6, np.int64)), StoreError, "distinct split positions"),
    "valid-ints": (_replace("valid", data=np.ones(6, np.int64)), StoreError, "booleans"),
    "paths-too-long": (_replace("paths", data=np.asarray(["p" * 5000] * 6, dtype=object),
                                dtype=h5py.string_dtype()), StoreError, "longer than"),
    "attr-list": (lambda h5, _: h5.attrs.__setitem__("coopipe", ["a", "b"]), StoreError, "not one JSON string"),
    "attr-not-json": (lambda h5, _: h5.attrs.__setitem__("coopipe", "{nope"), StoreError, "not valid JSON"),
    "no-classnames": (_attrs(lambda a: a["provenance"].pop("classnames")), StoreError, "classnames"),
    "classnames-list-of-lists": (_attrs(lambda a: a["provenance"].__setitem__("classnames", [["a"], ["b"]])),
                                 StoreError, "classnames"),
    "provenance-list": (_attrs(lambda a: a.__setitem__("provenance", ["a"])), StoreError, "not an object"),
    "views-string": (_attrs(lambda a: a["provenance"].__setitem__("views", "x")), StoreError, "views"),
    "long-split": (_attrs(lambda a: a["provenance"].__setitem__("split", "s" * 5000)), StoreError,
                   "printable characters"),
    "split-escape": (_attrs(lambda a: a["provenance"].__setitem__("split", "../../x")), UnsafePathError,
                     "not a plain name"),
    "dtype-lie": (_attrs(lambda a: a["provenance"].__setitem__("dtype", "float16")), StoreError, "features are float32"),
}
del CRAFTED["huge-chunk"]  # h5py caps chunks itself; the size bound is checked by the 1e9-dim file


@pytest.fixture(scope="module")
def exported(tmp_path_factory, rn50):
    """A 6-row, 2-class fp32 store (3 chunks of 2 rows) exported to HDF5."""
    from coopipe.datasets.base import Dataset, Split
    from coopipe.encode import EncodeOptions, encode_split
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("exported")
    root = tmp_path / "imgs"
    root.mkdir()
    names = [f"{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(root / name)
    data = Dataset("tiny", root, ("cat", "dog"), "a photo of a {}.", {"test": Split(tuple(names), (0, 1) * 3)})
    opts = EncodeOptions(precision="fp32", dtype="float32", chunk_rows=2, batch_size=6, num_workers=0, progress=False)
    result = encode_split(data, "test", cache_dir=tmp_path / "c", options=opts, clip=rn50)
    return export_hdf5(open_store(result.path), tmp_path / "s.h5")


def _craft(exported: Path, tmp: Path, name: str, mutate: Mutation) -> Path:
    folder = tmp / "crafted" / name
    folder.mkdir(parents=True)
    out = folder / "s.h5"
    shutil.copy(exported, out)
    with h5py.File(out, "r+") as h5:
        mutate(h5, folder)
    return out


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_hdf5_is_refused_in_one_line_and_leaves_nothing(exported, tmp_path, case):
    mutate, error, message = CRAFTED[case]
    crafted = _craft(exported, tmp_path, case, mutate)
    cache = tmp_path / "cache"
    with pytest.raises(error, match=message):
        import_hdf5(crafted, cache)
    assert not [p for p in cache.rglob("*.zarr*") if p.is_dir()], "a refused import leaves no store or partial"
    res = CliRunner().invoke(app, ["cache", "import", str(crafted), "--cache", str(cache)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "s.h5" in res.output


def test_non_hdf5_and_truncated_files_are_one_line(exported, tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5 at all\n")
    truncated = tmp_path / "half.h5"
    shutil.copy(exported, truncated)
    _truncate(truncated)
    for src, message in ((tmp_path / "text.h5", "not an HDF5 file"), (truncated, "truncated or damaged"),
                         (tmp_path / "missing.h5", "cannot read")):
        res = CliRunner().invoke(app, ["cache", "import", str(src), "--cache", str(tmp_path / "c")])
        assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_crafted_files_are_refused_within_a_second_and_100_mb(exported, tmp_path):
    files = [str(_craft(exported, tmp_path, case, CRAFTED[case][0])) for case in sorted(CRAFTED)]
    script = textwrap.dedent("""
        import json, resource, sys, time
        from coopipe.hdf5io import import_hdf5
        from coopipe.errors import CoopipeError
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        slowest = 0.0
        for path in sys.argv[2:]:
            t = time.perf_counter()
            try:
                import_hdf5(path, sys.argv[1])
                raise SystemExit(f"imported {path}")
            except CoopipeError:
                pass
            slowest = max(slowest, time.perf_counter() - t)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps({"slowest_s": slowest, "grown_mb": grown}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), *files], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["slowest_s"] < 1.0 and figures["grown_mb"] < 100, figures


def test_import_recomputes_integrity_and_confines_odd_names(exported, tmp_path):
    original = open_store(import_hdf5(exported, tmp_path / "ref"))

    def lie(attrs: dict) -> None:
        attrs.update({"integrity": 0, "checksums": {}, "array_meta": {}, "complete": True})
        attrs["provenance"]["weights"] = "sha256:/../../x"
        attrs["provenance"]["model"] = "m" * 150

    crafted = _craft(exported, tmp_path, "lie", _attrs(lie))
    cache = tmp_path / "cache"
    store = open_store(import_hdf5(crafted, cache), checksums=True)
    folder = cache / store.provenance["dataset"]
    assert store.path.parent == folder and len(store.path.name) < 200
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no stray folder
    assert store.attrs["integrity"] >= 1 and store.attrs["checksums"] == original.attrs["checksums"]
    np.testing.assert_array_equal(store.read(view=None), original.read(view=None))
    chunk = store.path / "features" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["cache", "verify", str(store.path)])
    assert res.exit_code == 1 and "DAMAGED" in res.output
