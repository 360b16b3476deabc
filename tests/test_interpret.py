"""Interpreting learned context: FAISS nearest tokens vs brute force, init-word round trip, decoding, caching."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
import torch

from coopipe.errors import ParamsError, ProvenanceMismatchError
from coopipe.interpret.projection import evaluate_projection, nearest_prompt_tokens
from coopipe.interpret.reading import interpret_prompt
from coopipe.interpret.render import format_table, format_tsv
from coopipe.interpret.tokens import CONTINUES, decode_token, join_tokens
from coopipe.interpret.vocab_index import load_vocab_index, vocab_embeddings, vocab_index_path
from coopipe.prompt import PromptLearner

CLASSES = ["forest", "sea lake", "annual crop land"]


@pytest.fixture(scope="module")
def vocab_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def indices(rn50, vocab_cache):
    return {metric: load_vocab_index(rn50, metric=metric, cache_dir=vocab_cache) for metric in ("l2", "cosine")}


def _trained_like(learner: PromptLearner, seed: int) -> PromptLearner:
    """Move the context off its init, as training would (a fixed random perturbation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=g) * 0.01)
    return learner


def _brute_force(rn50, queries: torch.Tensor, metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.cdist over the whole vocabulary + sort: (distances, ids), each (n, k)."""
    table = torch.from_numpy(vocab_embeddings(rn50)).double()  # (vocab, width)
    q = queries.double()
    if metric == "cosine":
        table, q = torch.nn.functional.normalize(table, dim=-1), torch.nn.functional.normalize(q, dim=-1)
    d = torch.cdist(q, table)  # (n, vocab) Euclidean
    if metric == "cosine":
        d = d.pow(2) / 2  # |a - b|^2 = 2 - 2 cos for unit vectors -> 1 - cos
    dist, ids = d.sort(dim=-1, stable=True)
    return dist[:, :k], ids[:, :k]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
def test_faiss_equals_cdist(rn50, indices, metric, csc):
    g = torch.Generator().manual_seed(3)
    learner = PromptLearner(rn50, CLASSES, n_ctx=4, csc=csc, generator=g)
    # half of the vectors near real tokens (a trained context often is), half random N(0, 0.02)
    with torch.no_grad():
        table = torch.from_numpy(vocab_embeddings(rn50))
        flat = learner.ctx.view(-1, learner.ctx.shape[-1])
        flat[::2] = table[torch.randint(0, table.shape[0], (flat[::2].shape[0],), generator=g)] + 0.005 * torch.randn(
            flat[::2].shape, generator=g
        )
    k = 7
    result = interpret_prompt(learner, rn50, indices[metric], topk=k)
    assert len(result.contexts) == (len(CLASSES) if csc else 1)
    got_ids = torch.tensor([[n.token.id for n in s.neighbours] for r in result.contexts for s in r.slots])
    got_d = torch.tensor([[n.distance for n in s.neighbours] for r in result.contexts for s in r.slots], dtype=torch.float64)
    want_d, want_ids = _brute_force(rn50, learner.ctx.detach().reshape(-1, learner.ctx.shape[-1]), metric, k)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_d, want_d, rtol=0, atol=1e-6)
    assert torch.equal(result.nearest_ids.reshape(-1), want_ids[:, 0])
    assert result.nearest_ids.shape == ((len(CLASSES), 4) if csc else (4,))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_untrained_word_init_reads_back_its_words(rn50, indices, metric, position):
    learner = PromptLearner(rn50, CLASSES, ctx_init="a photo of a", class_token_position=position, csc=position == "front")
    result = interpret_prompt(learner, rn50, indices[metric], topk=3)
    words = rn50.tokenizer.encode("a photo of a")
    for reading in result.contexts:
        assert [s.nearest.id for s in reading.slots] == words
        assert reading.words == "a photo of a"
        for slot in reading.slots:
            assert slot.neighbours[0].distance == pytest.approx(0.0, abs=1e-6)
            assert slot.neighbours[1].distance > 1e-3
            assert slot.init_token is not None and slot.init_token.id == slot.nearest.id
            assert slot.init_distance == pytest.approx(0.0, abs=1e-9)
    expected = {"end": "a photo of a {classname}.", "middle": "a photo {classname} of a.", "front": "{classname} a photo of a."}
    assert result.contexts[0].template == expected[position]
    # the discrete prompt is exactly what the string tokenises to, in the learner's own layout
    typed = torch.as_tensor(rn50.tokenizer([expected[position].replace("{classname}", c) for c in CLASSES]))
    assert torch.equal(nearest_prompt_tokens(learner, result.nearest_ids), typed)


def test_projection_accuracy_of_untrained_init_is_the_learned_accuracy(rn50, indices):
    learner = PromptLearner(rn50, CLASSES, ctx_init="a photo of a")
    result = interpret_prompt(learner, rn50, indices["l2"], topk=2)
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(40, rn50.embed_dim, generator=g), torch.randint(0, len(CLASSES), (40,), generator=g)
    before = learner.ctx.detach().clone()
    acc = evaluate_projection(result, learner, rn50, feats, labels)
    assert torch.equal(learner.ctx.detach(), before)  # context restored
    assert acc.text_roundtrip and acc.n_images == 40
    assert acc.learned == acc.nearest_tokens == acc.nearest_text
    with pytest.raises(ProvenanceMismatchError):
        evaluate_projection(result, learner, rn50, torch.randn(4, 7), torch.zeros(4, dtype=torch.long))


def test_trained_csc_projection_differs_and_reports(rn50, indices):
    learner = _trained_like(PromptLearner(rn50, CLASSES[:2], n_ctx=3, csc=True, generator=torch.Generator().manual_seed(1)), 2)
    result = interpret_prompt(learner, rn50, indices["l2"], topk=2)
    g = torch.Generator().manual_seed(5)
    result.accuracy = evaluate_projection(
        result, learner, rn50, torch.randn(30, rn50.embed_dim, generator=g), torch.randint(0, 2, (30,), generator=g)
    )
    table = format_table(result)
    assert "class 'forest'" in table and "class 'sea lake'" in table and "nearest-word prompt" in table
    assert "test accuracy (30 images)" in table
    # the two accuracies under labels that cannot be confused; word pieces spaced, their mark explained
    assert "learned context (the trained vectors):" in table and "nearest tokens (each vector replaced" in table
    pieces = [s.nearest for c in result.contexts for s in c.slots if not s.nearest.end_of_word]
    assert ("marks a word piece" in table) == bool(pieces)
    for reading in result.contexts:
        assert reading.tokens_template.split()[:3] == [s.nearest.display for s in reading.slots]
    data = result.to_dict()
    assert [c["class"] for c in data["contexts"]] == CLASSES[:2]
    assert data["variant"] == {"n_ctx": 3, "ctx_init": None, "csc": True, "class_token_position": "end"}
    assert data["contexts"][0]["slots"][0]["init"] is None
    tsv = format_tsv(result).splitlines()
    assert tsv[0].split("\t")[:4] == ["class", "position", "rank", "token_id"]
    assert len(tsv) == 1 + 2 * 3 * 2
    assert all(len(line.split("\t")) == 9 for line in tsv)
    json.dumps(data)  # serialisable


def test_decode_tokens(rn50):
    tok = rn50.tokenizer
    photo = decode_token(tok, tok.encoder["photo</w>"])
    assert (photo.text, photo.end_of_word, photo.special, photo.display) == ("photo", True, False, "photo")
    piece = decode_token(tok, tok.encoder["sel"])
    assert not piece.end_of_word and piece.display == "sel" + CONTINUES
    start, end = decode_token(tok, tok.sot_token_id), decode_token(tok, tok.eot_token_id)
    assert start.special and end.special and (start.text, end.text) == ("<start_of_text>", "<end_of_text>")
    assert decode_token(tok, tok.encoder["Ā"]).text == "\\x00"  # byte 0x00: control character, escaped
    # a lone UTF-8 lead byte is escaped, not dropped; whole non-Latin characters are kept
    lead = decode_token(tok, tok.encoder[tok.byte_encoder[0xE6]])
    assert lead.text == "\\xe6"
    ids = tok.encode("café привет 日本")
    tokens = [decode_token(tok, i) for i in ids]
    assert "café" in [t.text for t in tokens]
    assert join_tokens(tokens) == "café привет 日本"  # pieces glue back into the words


def test_index_cache_is_reused_validated_and_keyed(rn50, tmp_path, monkeypatch):
    first = load_vocab_index(rn50, metric="l2", cache_dir=tmp_path)
    path = vocab_index_path(tmp_path, rn50.name, rn50.weights_id, "l2")
    assert first.built and first.path == path and path.is_file() and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["model"], meta["weights"], meta["metric"], meta["vocab_size"]) == ("RN50", rn50.weights_id, "l2", 49408)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    again = load_vocab_index(rn50, metric="l2", cache_dir=tmp_path)
    assert not again.built
    assert np.array_equal(again.vectors, first.vectors)
    # a sidecar naming other weights is not trusted: rebuilt
    meta["weights"] = "open_clip:RN50/openai"
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert load_vocab_index(rn50, metric="l2", cache_dir=tmp_path).built
    # a corrupt index file is rebuilt too
    path.write_bytes(b"not an index")
    assert load_vocab_index(rn50, metric="l2", cache_dir=tmp_path).built
    assert vocab_index_path(tmp_path, "RN50", rn50.weights_id, "cosine") != path
    assert vocab_index_path(tmp_path, "RN50", "random-init:seed=1", "l2") != path
    # GPU only when faiss-gpu and CUDA are both there
    import coopipe.interpret.vocab_index as interpret_mod

    monkeypatch.setattr(interpret_mod, "gpu_available", lambda: False)
    assert not load_vocab_index(rn50, metric="l2").on_gpu
    with pytest.raises(ParamsError, match="GPU"):
        load_vocab_index(rn50, metric="l2", gpu=True)


def test_bad_requests(rn50, indices):
    learner = PromptLearner(rn50, CLASSES, n_ctx=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ParamsError):
        interpret_prompt(learner, rn50, indices["l2"], topk=0)
    with pytest.raises(ParamsError):
        load_vocab_index(rn50, metric="manhattan")
    with torch.no_grad():
        learner.ctx[0, 0] = float("nan")
    with pytest.raises(ParamsError, match="NaN"):
        interpret_prompt(learner, rn50, indices["l2"], topk=1)


# ---------------------------------------------------------------------------------------------- stage and CLI
def _toy_store(cache, split: str, clip, classnames, n: int, seed: int):
    """A small complete feature store (random features) where `coopipe encode` would put it."""
    from coopipe.store import open_store, store_path
    from coopipe.store_writer import StoreWriter

    prov = {
        "dataset": "toy", "split": split, "classnames": list(classnames), "rows": "all", "n_split": n,
        "model": clip.name, "weights": clip.weights_id, "views": {"n_aug": 0}, "dtype": "float32",
    }
    path = store_path(cache, prov)
    g = np.random.default_rng(seed)
    writer = StoreWriter.create(
        path, prov, labels=list(np.arange(n) % len(classnames)), index=list(range(n)),
        paths=[f"img{i}.jpg" for i in range(n)], n_views=1, dim=clip.embed_dim, dtype="float32", chunk_rows=n,
    )
    writer.write_chunk(0, g.standard_normal((n, 1, clip.embed_dim)).astype(np.float32))
    writer.finalize()
    return open_store(path)


def _toy_checkpoint(tmp_path, clip, cache, **variant):
    from coopipe.checkpoint import save_checkpoint
    from coopipe.train_config import TrainConfig, TrainState

    config = TrainConfig.for_method("coop", 16, max_epoch=2, **variant)
    config = dataclasses.replace(config, method=config.method.resolve(clip))  # M in tokens, as a training run records
    learner = config.method.build_learner(clip, CLASSES, generator=torch.Generator().manual_seed(0))
    state = TrainState(
        epoch=2, params={"ctx": learner.ctx.detach().clone()},
        generator_state=torch.Generator().get_state(), variant={k: v for k, v in learner.config().items() if k != "classnames"},
    )
    train = _toy_store(cache, "train", clip, CLASSES, 6, seed=1)
    return save_checkpoint(tmp_path / "run", clip=clip, classnames=CLASSES, config=config, state=state, stores={"train": train})


def test_stage_writes_outputs_and_reuses_the_index(rn50, tmp_path):
    from coopipe.jobs.interpret import run_interpret

    cache = tmp_path / "cache"
    ckpt = _toy_checkpoint(tmp_path, rn50, cache, ctx_init="a photo of a")
    _toy_store(cache, "test", rn50, CLASSES, 30, seed=2)
    out_json, out_tsv = tmp_path / "out" / "interpret.json", tmp_path / "out" / "interpret.tsv"
    result = run_interpret(checkpoint=ckpt, cache_dir=cache, topk=3, json_out=out_json, tsv_out=out_tsv)
    assert result.index_built and result.index_path is not None and result.index_path.parent == cache / "vocab"
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["checkpoint"] == str(ckpt) and data["model"] == "RN50" and data["metric"] == "l2"
    assert data["contexts"][0]["words"] == "a photo of a"
    assert data["contexts"][0]["prompt"] == "a photo of a {classname}."
    assert [s["init_distance"] for s in data["contexts"][0]["slots"]] == [0.0] * 4
    acc = data["accuracy"]
    assert acc["n_images"] == 30 and acc["text_roundtrip"] and acc["learned"] == acc["nearest_tokens"]
    assert out_tsv.read_text(encoding="utf-8").count("\n") == 1 + 4 * 3
    again = run_interpret(checkpoint=ckpt, cache_dir=cache, topk=3, metric="l2", accuracy=False)
    assert not again.index_built and again.accuracy is None


def test_cli_interpret(rn50, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import coopipe.jobs.interpret as stage
    from coopipe.cli import app

    monkeypatch.setattr(stage, "load_clip", lambda *a, **k: rn50)  # the same random-init RN50, loaded once
    cache = tmp_path / "cache"
    ckpt = _toy_checkpoint(tmp_path, rn50, cache, n_ctx=2, csc=True, class_token_position="middle")
    runner = CliRunner()
    res = runner.invoke(app, ["interpret", str(ckpt), "--cache", str(cache), "--topk", "2", "--metric", "cosine", "--tsv", str(tmp_path / "n.tsv")])
    assert res.exit_code == 0, res.output
    assert "class 'annual crop land'" in res.stdout and "cosine distance" in res.stdout
    assert "test accuracy" not in res.stdout  # no test store in the cache: interpretation only
    assert (tmp_path / "n.tsv").is_file()
    _toy_store(cache, "test", rn50, CLASSES, 12, seed=3)
    res = runner.invoke(app, ["interpret", str(ckpt), "--cache", str(cache), "--topk", "1"])
    assert res.exit_code == 0 and "test accuracy (12 images)" in res.stdout
    res = runner.invoke(app, ["interpret", str(tmp_path / "nope"), "--cache", str(cache)])
    assert res.exit_code == 1 and "no checkpoint" in res.output
    res = runner.invoke(app, ["interpret", str(ckpt), "--metric", "manhattan"])
    assert res.exit_code == 2


def test_checkpoint_weights_map_back_to_load_arguments(tmp_path):
    from coopipe.checkpoint import Checkpoint
    from coopipe.errors import CheckpointError
    from coopipe.jobs.interpret import checkpoint_pretrained

    def ckpt(weights, pretrained=None):
        return Checkpoint(path=tmp_path, meta={"weights": weights, "run": {"pretrained": pretrained}}, tensors={})

    assert checkpoint_pretrained(ckpt("open_clip:RN50/openai")) == "openai"
    assert checkpoint_pretrained(ckpt("random-init:seed=0")) == "none"
    weights_file = tmp_path / "w.pt"
    weights_file.write_bytes(b"x")
    assert checkpoint_pretrained(ckpt("sha256:ab", str(weights_file))) == str(weights_file)
    with pytest.raises(CheckpointError, match="--pretrained"):
        checkpoint_pretrained(ckpt("sha256:ab", str(tmp_path / "gone.pt")))
