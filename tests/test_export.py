"""`coopipe export`: an exported folder predicts exactly what its run predicts (CoOp, CoCoOp, a rank-prompt age
run; random RN50 weights on a toy cache and synthetic images), its files are bound to its record, its model card
names the run's departures; the ONNX graph (CoCoOp's with its text path) agrees with predict under ONNX Runtime.
A rank-prompt run on real UTKFace faces checks the same on real images (skipped without the shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_cache
from PIL import Image
from typer.testing import CliRunner

from coopipe.cli import app
from coopipe.errors import CheckpointError, ParamsError
from coopipe.imageio import load_rgb
from coopipe.views import center_view, normalize_batch
from coopipe.export import CARD_FILE, ONNX_FILE, PROMPT_FILE, RECORD_FILE, export_run, load_export
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.predict import predict
from coopipe.store import find_stores

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake", "forest"]
AGES = [str(a) for a in range(20, 26)]  # a rank prompt's classes are ordered ranks (ages)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Five small synthetic RGB images of different sizes (decoded, resized and cropped as any image)."""
    folder = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(64, 80), (90, 60), (50, 50), (120, 70), (40, 100)]):
        path = folder / f"img{i}.png"
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def runs(rn50, tmp_path_factory) -> dict[str, Path]:
    """Finished, evaluated runs: CoOp (M = 4), CoCoOp and rank prompts on ages, 2 epochs each, on toy caches."""
    base = tmp_path_factory.mktemp("runs")
    sizes = {"train": (4, 2), "val": (2, 1), "test": (3, 1)}
    caches = {"toy": make_toy_cache(base / "cache", rn50, CLASSES, sizes),
              "ages": make_toy_cache(base / "age_cache", rn50, AGES, sizes)}
    out = {}
    for name, cache, overrides in (
        ("coop", caches["toy"], {"method": "coop", "n_ctx": 4}),
        ("cocoop", caches["toy"], {"method": "cocoop"}),
        ("rank", caches["ages"], {"method": "rank", "n_ctx": 4}),
    ):
        run = base / name
        run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, progress=False, clip=rn50,
                  overrides={"max_epoch": 2, "batch_size": 4, **overrides})
        run_eval(run, cache_dir=cache, clip=rn50)
        out[name], out[f"{name}_cache"] = run, cache
    return out


@pytest.mark.parametrize("method", ["coop", "cocoop", "rank"])
def test_export_predicts_what_its_run_predicts(runs, images, rn50, tmp_path, method):
    folder = export_run(runs[method], tmp_path / "export", clip=rn50).path
    from_run = predict(runs[method], images, topk=3, clip=rn50)
    from_export = predict(folder, images, topk=3, clip=rn50)
    assert len(from_run) == len(images)
    assert from_export == from_run  # image by image: paths, labels, class indices and probabilities, exactly
    test_store = find_stores(runs[f"{method}_cache"], "toy", "test")[0].path  # cached features: the same too
    assert predict(folder, store=test_store, clip=rn50) == predict(runs[method], store=test_store, clip=rn50)

    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["model"]["name"] == "RN50" and record["model"]["weights"] == rn50.weights_id
    assert record["model"]["activation"] == "GELU"  # RN50 built from its config with random weights
    assert record["preprocess"]["image_size"] == 224 and record["features"]["dtype"] == "float16"
    assert record["image_conditional"] == (method == "cocoop")
    if method == "cocoop":
        assert (folder / PROMPT_FILE).is_file() and "Meta-Net" in record["inference"]
        assert "text tower" in record["text_tower"] and record["text_path"]["share_prefix"] is True
    card = (folder / CARD_FILE).read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-classification" in card
    assert "- random weights" in card and "- 2 epochs (paper " in card  # the run's departures, from its records
    assert "accuracy" in card and "coopipe predict THIS_FOLDER" in card


def test_export_cli_and_integrity(runs, images, rn50, tmp_path):
    out = tmp_path / "coop_export"
    res = CliRunner().invoke(app, ["export", str(runs["coop"]), str(out)])
    assert res.exit_code == 0, res.output
    head = load_export(out)
    assert head.classnames == CLASSES and head.classifier is not None
    # the CLI prints what `coopipe predict RUN` prints
    printed = [CliRunner().invoke(app, ["predict", str(src), *map(str, images), "--topk", "2"]).stdout
               for src in (runs["coop"], out)]
    assert printed[0] == printed[1] and printed[0].count("\n") == len(images)
    # a modified file is refused, not used
    card = out / CARD_FILE
    card.write_text(card.read_text() + "edited\n")
    with pytest.raises(CheckpointError, match="does not match"):
        load_export(out)
    # never into the run itself or a foreign folder
    with pytest.raises(ParamsError, match="run folder"):
        export_run(runs["coop"], runs["coop"], clip=rn50)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ParamsError, match="notes.txt"):
        export_run(runs["coop"], foreign, clip=rn50)
    # an export interrupted before its record can be written again
    (out / RECORD_FILE).unlink()
    assert export_run(runs["coop"], out, clip=rn50).path == out and load_export(out).classnames == CLASSES


@pytest.mark.parametrize("method", ["coop", "rank", "cocoop"])
def test_onnx_graph_agrees_with_predict(runs, images, rn50, tmp_path, method):
    """The ONNX graph (fp32 image tower, features rounded to the recorded float16 as the stores hold them, the
    head or CoCoOp's text path, softmax) under ONNX Runtime against `coopipe predict` at fp32.

    Tolerance: both compute the same float32 graph; the eager and ORT towers differ by float32 rounding (relative
    ~1e-6 on features, measured cosine >= 0.9999999 in docs/performance.md). A feature element that lands on the
    other side of a float16 rounding boundary moves by one float16 step (2^-11 relative); its effect on a logit is
    exp(logit_scale) (= 100) x that step x |f_i w_i| / |f| ~ 100 x 5e-4 x 1e-3 = 5e-5 at D = 1024, and on a
    probability at most a quarter of the logit change. CoCoOp's graph runs the text path unpacked (open_clip's blocks
    on B x K padded prompts) where predict packs it: float32 rounding again (~1e-6 relative on text features, the
    text parity tests' bound). So probabilities agree to 1e-4 absolute (measured here: <= 2.1e-7; random weights
    give CLIP's initial logit scale, 1/0.07, so these probabilities are flatter than a trained model's)."""
    ort = pytest.importorskip("onnxruntime")
    folder = export_run(runs[method], tmp_path / "export", clip=rn50, onnx=True).path
    batch = normalize_batch(torch.stack([center_view(load_rgb(p), rn50.preprocess) for p in images]),
                            rn50.preprocess).numpy()  # coopipe encode's centre view
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"x": batch})[0]
    expected = predict(runs[method], images, topk=len(AGES), clip=rn50, precision="fp32")
    full = np.zeros_like(probs)
    for i, p in enumerate(expected):
        full[i, list(p.indices)] = p.probs
    assert probs.shape == (len(images), len(load_export(folder).classnames))
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.abs(probs - full).max() < 1e-4
    assert [int(i) for i in probs.argmax(axis=1)] == [p.indices[0] for p in expected]


def test_rank_prompt_on_real_faces(shared_data, rn50, tmp_path):
    """A rank-prompt run on a small real UTKFace subset (101 age ranks, random RN50): its export predicts what it
    predicts on the faces, and its model card carries the run's MAE."""
    from conftest import copy_utkface

    data = copy_utkface(shared_data, tmp_path / "utk", range(20, 26), 3)
    cache, run, out = tmp_path / "cache", tmp_path / "rank", tmp_path / "export"
    res = CliRunner().invoke(app, ["encode", "--dataset", "utkface", "--data-root", str(data), "--cache", str(cache),
                                   "--pretrained", "none", "--views", "0", "--shots", "1", "--seeds", "1",
                                   "--no-progress", "--workers", "0", "--batch-size", "32"])
    assert res.exit_code == 0, res.output
    run_train(cache_dir=cache, dataset="utkface", shots=1, seed=1, out_dir=run, clip=rn50, progress=False,
              overrides={"method": "rank", "max_epoch": 1, "n_ctx": 4})
    run_eval(run, cache_dir=cache, clip=rn50)
    export_run(run, out, clip=rn50)
    faces = sorted((data / "utkface" / "images").glob("*.jpg"))[:6]
    from_run = predict(run, faces, topk=3, clip=rn50)
    assert predict(out, faces, topk=3, clip=rn50) == from_run and len(from_run) == 6
    card = (out / CARD_FILE).read_text()
    assert "type: mae" in card and "- 1 epochs (paper 100)" in card
