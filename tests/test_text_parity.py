"""Parity of the CoOp text path with open_clip's ``encode_text`` and of the fast path with the plain one.

Random-weight RN50 (and ViT-B-32 in the slow tier), built once per module. Checks against ``encode_text`` run on
the full float32 models. The variant matrix (unified/CSC x end/middle/front: the prompt rows, and the packed path's
chunks and attention bins) runs on float64 copies of the text tower cut to its first ``SHALLOW_LAYERS`` blocks: the
tolerance can then be tight, and the test stays fast on a shared 2-core CPU; exactness of the shortcuts does not
depend on depth (several blocks still check that the shared prefix's keys/values are carried from block to block),
and one full-depth float32 case covers the real depth.
Every prompt method's text path against open_clip's plain 77-token path: ``tests/test_text_path.py``.
Run as a script for a rough plain-vs-fast timing on this machine.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from coopipe.errors import ParamsError
from coopipe.models import LoadedClip, load_clip
from coopipe.prompt import PromptLearner
from coopipe import text_encoder
from coopipe.text_encoder import PromptTextEncoder, coop_logits

# ViT-B-32's text tower is RN50's (width 512, 8 heads, 12 layers) with another embedding width (512, not 1024): the
# fast tier runs RN50, the slow tier both
MODELS = ("RN50", pytest.param("ViT-B-32", marks=pytest.mark.slow))
VARIANTS = [(csc, pos) for csc in (False, True) for pos in ("end", "middle", "front")]
CLASSNAMES = ["dog", "golden_retriever", "st. bernard with a very long name"]  # different lengths
N_CTX = 5  # odd, so the middle split (2 | 3) is not symmetric
TIGHT = 1e-10  # float64
FLOAT32 = 1e-5
SHALLOW_LAYERS = 3


def _shallow_double(clip: LoadedClip, layers: int = SHALLOW_LAYERS) -> LoadedClip:
    """A float64 copy of ``clip``'s text tower cut to its first ``layers`` blocks (no image tower)."""
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:layers]
    return dataclasses.replace(clip, model=model.double())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def clips(request: pytest.FixtureRequest) -> Iterator[tuple[LoadedClip, LoadedClip]]:
    """(full float32 model, shallow float64 text-only copy) for each model name, built once per module."""
    clip = load_clip(request.param, "none")
    yield clip, _shallow_double(clip)


def _learner(clip: LoadedClip, csc: bool, pos: str, seed: int = 0) -> PromptLearner:
    generator = torch.Generator().manual_seed(seed)
    return PromptLearner(clip, CLASSNAMES, n_ctx=N_CTX, csc=csc, class_token_position=pos, generator=generator)


def _name_ids(clip: LoadedClip, name: str) -> list[int]:
    tokens = clip.tokenizer([name.replace("_", " ")])[0]
    return tokens[1 : int(tokens.argmax())].tolist()


def _prompt_ids(clip: LoadedClip, ctx_ids: list[int], name: str, pos: str) -> list[int]:
    """Token ids of CoOp's layout written out independently of the learner's code."""
    sos, eos = clip.tokenizer([""])[0][:2].tolist()
    dot = _name_ids(clip, ".")
    name_ids = _name_ids(clip, name)
    half = len(ctx_ids) // 2
    body = {
        "end": ctx_ids + name_ids,
        "middle": ctx_ids[:half] + name_ids + ctx_ids[half:],
        "front": name_ids + ctx_ids,
    }[pos]
    ids = [sos, *body, *dot, eos]
    return ids + [0] * (clip.model.positional_embedding.shape[0] - len(ids))


def test_encode_texts_matches_encode_text(clips: tuple[LoadedClip, LoadedClip]) -> None:
    clip, _ = clips
    texts = ["a photo of a dog.", "a photo of a golden retriever, a type of pet.", "dtd texture."]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer(texts), normalize=True)
        plain = PromptTextEncoder(clip, cut=False).encode_texts(texts)
        fast = PromptTextEncoder(clip, cut=True, class_chunk=2).encode_texts(texts)
    assert torch.equal(plain, expected)  # the same ops as encode_text: bit for bit
    assert torch.allclose(fast, expected, rtol=0, atol=FLOAT32)


@pytest.mark.parametrize(("csc", "pos"), VARIANTS)
def test_plain_path_equals_encode_text(clips: tuple[LoadedClip, LoadedClip], csc: bool, pos: str) -> None:
    """Context set to real word embeddings: the plain path must be encode_text of the matching token ids."""
    _, clip = clips
    learner = _learner(clip, csc, pos)
    vocab = clip.model.token_embedding.weight
    ctx_ids = torch.randint(
        1000, 40000, (len(CLASSNAMES) if csc else 1, N_CTX), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        learner.ctx.copy_(vocab[ctx_ids] if csc else vocab[ctx_ids[0]])
        ids = torch.tensor(
            [_prompt_ids(clip, ctx_ids[i if csc else 0].tolist(), name, pos) for i, name in enumerate(CLASSNAMES)]
        )
        assert torch.equal(learner.eos_index, ids.argmax(dim=-1))
        expected = clip.model.encode_text(ids, normalize=True)
        plain = PromptTextEncoder(clip, cut=False, share_prefix=False)(learner)
    assert torch.equal(learner.prompt_embeddings(), clip.model.token_embedding(ids))
    assert torch.allclose(plain, expected, rtol=0, atol=TIGHT)


UNEVEN_NAMES = ["a", "b c d e f g h", "forest", "st. bernard", "x"]  # very different lengths, 5 classes


@pytest.mark.parametrize(("csc", "pos"), VARIANTS)
def test_packed_rows_are_the_prompt_rows(clips: tuple[LoadedClip, LoadedClip], csc: bool, pos: str) -> None:
    """``packed_embeddings`` is exactly the prompt rows start..[EOS] of each class, class after class."""
    _, clip = clips
    learner = PromptLearner(clip, UNEVEN_NAMES, n_ctx=N_CTX, csc=csc, class_token_position=pos)
    full = learner.prompt_embeddings()  # (n_cls, L, width)
    for classes in (slice(None), slice(1, 4), slice(4, 5)):
        for start in sorted({1, learner.shared_length}):
            rows, positions, lengths = learner.packed_embeddings(classes, start)
            eos = learner.eos_index[classes]
            expected = torch.cat([full[classes][i, start : int(e) + 1] for i, e in enumerate(eos)])
            assert torch.equal(rows, expected)
            assert torch.equal(lengths, eos - start + 1)
            assert torch.equal(positions, torch.cat([torch.arange(start, int(e) + 1) for e in eos]))


@pytest.mark.parametrize(("csc", "pos"), VARIANTS)
def test_packed_path_uneven_names_and_chunks(
    clips: tuple[LoadedClip, LoadedClip], csc: bool, pos: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names of very different lengths (lots of padding in a padded batch), in uneven chunks, with checkpointing,
    and attention bins of one class each, of several classes, and of classes longer than a bin."""
    _, clip = clips
    learner = PromptLearner(
        clip, UNEVEN_NAMES, n_ctx=N_CTX, csc=csc, class_token_position=pos, generator=torch.Generator().manual_seed(4)
    )
    # rows per class: end [3, 9, 3, 5, 3], middle [6, 12, 6, 8, 6], front or csc [8, 14, 8, 10, 8]
    assert int(learner.eos_index.max() - learner.eos_index.min()) == 6
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(8, clip.embed_dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, len(UNEVEN_NAMES), (8,), generator=gen)

    def run(encoder: PromptTextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        logits = coop_logits(images, encoder(learner), clip.model.logit_scale)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), learner.ctx)
        return logits.detach(), grad

    ref_logits, ref_grad = run(PromptTextEncoder(clip, cut=False, share_prefix=False))
    default_bins = text_encoder.BIN_ROWS
    for config, bin_rows in (
        ({}, default_bins),  # one bin
        ({}, 1),  # one class per bin
        ({}, 8),  # end: bins [3], [9] (a class longer than a bin), [3, 5], [3]
        ({}, 16),  # middle: [6], [12], [6, 8], [6]
        ({}, 20),  # middle: [6, 12], [6, 8, 6]; front: [8], [14], [8, 10], [8]
        ({"class_chunk": 2}, default_bins),  # chunks of 2, 2, 1 classes, each packed with its own prefix rows
        ({"class_chunk": 3, "checkpoint_chunks": True}, 8),
        ({"class_chunk": 1}, default_bins),
    ):
        monkeypatch.setattr(text_encoder, "BIN_ROWS", bin_rows)
        logits, grad = run(PromptTextEncoder(clip, **config))
        assert torch.allclose(logits, ref_logits, rtol=0, atol=TIGHT), (config, bin_rows)
        assert torch.allclose(grad, ref_grad, rtol=0, atol=TIGHT), (config, bin_rows)


def test_fast_path_matches_plain_full_depth_float32(clips: tuple[LoadedClip, LoadedClip]) -> None:
    clip, _ = clips
    learner = _learner(clip, False, "end")
    images = torch.randn(4, clip.embed_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 1])
    results = []
    for encoder in (PromptTextEncoder(clip, cut=False, share_prefix=False), PromptTextEncoder(clip, class_chunk=2)):
        logits = coop_logits(images, encoder(learner), clip.model.logit_scale)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), learner.ctx)
        results.append((logits.detach(), grad))
    (ref_logits, ref_grad), (logits, grad) = results
    assert torch.allclose(logits, ref_logits, rtol=0, atol=FLOAT32 * 100)  # logits are scaled by 100
    assert torch.allclose(grad, ref_grad, rtol=0, atol=FLOAT32 * ref_grad.abs().max())


def test_ctx_init_words(clips: tuple[LoadedClip, LoadedClip]) -> None:
    clip, _ = clips
    words = "a photo of a"
    word_ids = clip.tokenizer([words])[0][1:5]
    expected_ctx = clip.model.token_embedding.weight[word_ids]  # (4, width)
    csc = PromptLearner(clip, CLASSNAMES, ctx_init=words, csc=True)
    assert csc.n_ctx == 4 and torch.equal(csc.ctx, expected_ctx.expand(len(CLASSNAMES), -1, -1))

    learner = PromptLearner(clip, CLASSNAMES, n_ctx=16, ctx_init=words)  # the words decide n_ctx
    assert learner.n_ctx == 4 and torch.equal(learner.ctx, expected_ctx)
    prompts = clip.tokenizer([f"{words} {name.replace('_', ' ')}." for name in CLASSNAMES])
    assert torch.equal(learner.tokenized_prompts, prompts)
    with torch.no_grad():
        expected = clip.model.encode_text(prompts, normalize=True)
        plain = PromptTextEncoder(clip, cut=False, share_prefix=False)(learner)
        fast = PromptTextEncoder(clip, class_chunk=2)(learner)
    assert torch.equal(plain, expected)  # the same ops as encode_text: bit for bit
    assert torch.allclose(fast, expected, rtol=0, atol=FLOAT32)


def test_bf16_autocast_is_close(clips: tuple[LoadedClip, LoadedClip]) -> None:
    clip, _ = clips
    learner = _learner(clip, False, "end")
    with torch.no_grad():
        reference = PromptTextEncoder(clip)(learner)  # equals the plain path (tested above)
    for share in (False, True):
        out = PromptTextEncoder(clip, share_prefix=share, class_chunk=2, autocast_bf16=True)(learner)
        assert out.dtype == torch.float32 and out.shape == reference.shape
        (grad,) = torch.autograd.grad(out.sum(), learner.ctx)
        assert torch.isfinite(grad).all()
        cosine = (out.detach() * reference).sum(dim=-1)
        assert cosine.min() > 0.98, cosine


def test_learner_state_and_errors(clips: tuple[LoadedClip, LoadedClip]) -> None:
    clip, _ = clips
    seeded = [_learner(clip, True, "middle", seed=3).ctx for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    assert seeded[0].shape == (len(CLASSNAMES), N_CTX, clip.model.token_embedding.weight.shape[1])
    assert abs(float(seeded[0].detach().std()) - 0.02) < 0.002
    for pos in ("middle", "front"):  # partial builds (the cut path) are slices of the full prompt
        learner = _learner(clip, False, pos)
        full = learner.prompt_embeddings()
        for length in (1, 4, 9, learner.max_length):
            assert torch.equal(learner.prompt_embeddings(slice(1, 3), length=length), full[1:3, :length])
    learner = _learner(clip, False, "end")
    assert list(learner.state_dict()) == ["ctx"]
    assert learner.config()["class_token_position"] == "end"
    assert learner.shared_length == 1 + N_CTX and learner.max_length == int(learner.eos_index.max()) + 1
    with pytest.raises(ParamsError):
        PromptLearner(clip, CLASSNAMES, class_token_position="start")
    with pytest.raises(ParamsError):
        PromptLearner(clip, CLASSNAMES, n_ctx=0)
    with pytest.raises(ParamsError):
        PromptLearner(clip, ["word " * 40], n_ctx=40)
    with pytest.raises(ParamsError):
        PromptLearner(clip, [])
    with pytest.raises(ParamsError):
        PromptTextEncoder(clip, class_chunk=0)


def _time_step(encoder: PromptTextEncoder, learner: PromptLearner, repeat: int = 3) -> float:
    """Best-of-``repeat`` seconds for one forward+backward of the text path."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        encoder(learner).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Rough forward+backward timing of plain vs fast (cut + shared prefix), unified context, M=16, float32."""
    clip = load_clip("RN50", "none")
    for n_cls in (10, 100):
        names = [f"class number {i}" for i in range(n_cls)]
        learner = PromptLearner(clip, names, n_ctx=16, generator=torch.Generator().manual_seed(0))
        for label, encoder in (
            ("plain", PromptTextEncoder(clip, cut=False, share_prefix=False)),
            ("cut", PromptTextEncoder(clip, cut=True, share_prefix=False)),
            ("fast", PromptTextEncoder(clip)),
        ):
            seconds = _time_step(encoder, learner)
            print(f"K={n_cls:4d} M=16 {label:5s}: {seconds * 1000:8.1f} ms per forward+backward")


if __name__ == "__main__":
    main()
