"""Exactness of the one text path for every registered prompt method and for stacked runs.

The reference is open_clip's plain 77-token path written here, independent of the encoder: each class's full prompt
embeddings (the learner's ``prompt_embeddings()``, its learned rows spliced into the frozen token embeddings; for
CoCoOp the context rows shifted by the Meta-Net's ``h(x)`` of each image) -> + positional embedding -> the model's
own transformer with its causal mask -> ln_final -> the [EOS] row -> text projection -> normalise, as
``encode_text`` does. Compared: logits and the gradient of a cross-entropy with respect to every learned parameter,
float64, tolerance 1e-10, in each configuration of the text path (packed in one chunk; packed in class chunks with
checkpointing and attention bins smaller than a class; the plain path cut at the longest [EOS], in class chunks).
A float64 copy of RN50's text tower cut to two blocks: exactness does not depend on depth, and two blocks check
both the packed block and the last one, which reads the first block's prefix rows (``test_text_parity.py`` and
``test_cocoop.py`` check deeper towers and ViT-B-32; ``test_text_parity.py`` that the plain path over all 77
positions is ``encode_text``). Class names of uneven token counts.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from coopipe import text_encoder
from coopipe.learners import PromptedLearner, is_image_conditional
from coopipe.methods import MethodSpec, get_method, method_names
from coopipe.models import LoadedClip, load_clip
from coopipe.stacked_text import check_stackable, stacked_text_features
from coopipe.text_encoder import PromptTextEncoder, coop_logits

NAMES = ["a", "golden retriever", "st. bernard with a very long name", "x y"]  # uneven token counts
TIGHT = 1e-10
LAYERS = 2
B = 3
BINS = text_encoder.BIN_ROWS  # the default attention bin

SPECS = {  # every registered prompt method; CoOp in each layout
    **{f"coop{'-csc' if csc else ''}-{pos}": MethodSpec.of("coop", n_ctx=5, csc=csc, class_token_position=pos)
       for csc in (False, True) for pos in ("end", "middle", "front")},
    "cocoop": MethodSpec.of("cocoop"),
    "kgcoop": MethodSpec.of("kgcoop"),
    "prograd-csc-middle": MethodSpec.of("prograd", n_ctx=5, csc=True, class_token_position="middle"),
    "rank": MethodSpec.of("rank", n_ctx=4),
    "ordcoop": MethodSpec.of("ordcoop"),
}
CONFIGS = [  # (encoder options, attention bin rows, CoCoOp image chunk)
    ({}, None, None),
    ({"class_chunk": 3, "checkpoint_chunks": True}, 8, 2),
    ({"share_prefix": False, "class_chunk": 3}, None, 1),
]
STACKED = ["coop-end", "coop-csc-middle", "coop-front", "kgcoop", "rank", "ordcoop"]  # each stackable method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip64() -> LoadedClip:
    """A float64 copy of RN50's text tower cut to its first LAYERS blocks (the image tower dropped)."""
    clip = load_clip("RN50", "none")
    model = copy.deepcopy(clip.model, memo={id(clip.model.visual): None})
    model.transformer.resblocks = model.transformer.resblocks[:LAYERS]
    return dataclasses.replace(clip, model=model.double())


def _learner(clip: LoadedClip, spec: MethodSpec, seed: int = 0) -> PromptedLearner:
    learner = spec.build_learner(clip, NAMES, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, param in learner.named_parameters():  # every learned parameter away from its init, so it matters
            if name == "meta_net.linear2.weight":
                param.mul_(20.0)  # a Meta-Net shift as large as the context
            elif name in ("ctx", "rank_embeds", "name_embeds"):
                param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 9),
                                              dtype=param.dtype))
    assert isinstance(learner, PromptedLearner)
    return learner


def _plain_77(clip: LoadedClip, prompts: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text on prompt embeddings (n, 77, width) pooled at ``eos`` (n,): (n, D) normalised."""
    model = clip.model
    x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)  # (n, 77, width)
    x = model.ln_final(x)[torch.arange(x.shape[0]), eos] @ model.text_projection  # (n, D)
    return x / x.norm(dim=-1, keepdim=True)


def _reference_logits(clip: LoadedClip, learner: PromptedLearner, images: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) through the plain 77-token path; CoCoOp: one image at a time, its context shifted by h(x)."""
    scale = clip.model.logit_scale.exp()
    prompts, eos = learner.prompt_embeddings(), learner.eos_index  # (K, 77, width), (K,)
    unit = images / images.norm(dim=-1, keepdim=True)  # (B, D)
    if not is_image_conditional(learner):
        return scale * unit @ _plain_77(clip, prompts, eos).t()
    net, m = learner.meta_net, learner.n_ctx
    rows = []
    for x in unit:
        shift = torch.zeros_like(prompts)
        shift[:, 1 : 1 + m] = net.linear2(torch.relu(net.linear1(x)))  # the context positions of the end layout
        rows.append(scale * _plain_77(clip, prompts + shift, eos) @ x)  # (K,)
    return torch.stack(rows)  # (B, K)


def _inputs(clip: LoadedClip) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, clip.embed_dim, generator=gen, dtype=torch.float64) * 3.0, torch.tensor([1, 2, 0])


def _grads(learners: list[PromptedLearner], loss: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """d(loss)/d(every learned parameter) of each learner, by name, from one backward pass."""
    named = [[(n, p) for n, p in learner.named_parameters() if p.requires_grad] for learner in learners]
    grads = iter(torch.autograd.grad(loss, [p for params in named for _, p in params]))
    return [{n: next(grads) for n, _ in params} for params in named]


def _assert_close(logits, grads, ref_logits, ref_grads, what) -> None:
    assert torch.allclose(logits, ref_logits, rtol=0, atol=TIGHT), what
    assert grads.keys() == ref_grads.keys(), what
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=0, atol=TIGHT), (what, name)


def test_every_registered_prompt_method_is_covered(clip64: LoadedClip) -> None:
    """A prompt method added to the registry must be added to SPECS (its learner takes the text path)."""
    prompted = set()
    for name in method_names():
        # an ordered-label method's classes are ranks (the ridge probe reads their ages when it is built)
        names = [str(age) for age in range(20, 24)] if get_method(name).ordered_labels else NAMES
        learner = MethodSpec(name).build_learner(clip64, names, generator=torch.Generator().manual_seed(0))
        if isinstance(learner, PromptedLearner):
            prompted.add(name)
    assert prompted == {spec.method for spec in SPECS.values()}
    stackable = {name for name in prompted if get_method(name).stackable}
    assert stackable == {SPECS[key].method for key in STACKED}
    assert {"coop", "cocoop", "kgcoop", "prograd", "rank", "ordcoop"} <= prompted


@pytest.mark.parametrize("key", list(SPECS))
def test_text_path_equals_the_plain_77_token_path(clip64: LoadedClip, key: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and every learned parameter's gradient, in every configuration of the text path."""
    learner = _learner(clip64, SPECS[key])
    images, labels = _inputs(clip64)
    ref = _reference_logits(clip64, learner, images)
    (ref_grads,) = _grads([learner], F.cross_entropy(ref, labels))
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values()), key
    scale = clip64.model.logit_scale
    for options, bin_rows, image_chunk in CONFIGS:
        monkeypatch.setattr(text_encoder, "BIN_ROWS", bin_rows or BINS)
        encoder = PromptTextEncoder(clip64, **options)
        logits = learner.logits(encoder, images, scale, image_chunk=image_chunk)  # image_chunk: CoCoOp's
        what = (key, options, bin_rows, image_chunk)
        (grads,) = _grads([learner], F.cross_entropy(logits, labels))
        _assert_close(logits.detach(), grads, ref, ref_grads, what)


@pytest.mark.parametrize("key", STACKED)
def test_stacked_runs_equal_the_plain_77_token_path(clip64: LoadedClip, key: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Three runs in one text pass: each run's logits and the gradients of its parameters from the summed loss
    equal its own plain 77-token path's."""
    learners = [_learner(clip64, SPECS[key], seed) for seed in range(3)]
    check_stackable(learners)
    images, labels = _inputs(clip64)
    refs = [_reference_logits(clip64, learner, images) for learner in learners]
    ref_grads = _grads(learners, sum(F.cross_entropy(ref, labels) for ref in refs))
    scale = clip64.model.logit_scale
    for options, bin_rows, _ in CONFIGS:
        monkeypatch.setattr(text_encoder, "BIN_ROWS", bin_rows or BINS)
        encoder = PromptTextEncoder(clip64, **options)
        logits = [coop_logits(images, text, scale) for text in stacked_text_features(encoder, learners)]
        grads = _grads(learners, sum(F.cross_entropy(x, labels) for x in logits))
        for r in range(len(learners)):
            _assert_close(logits[r].detach(), grads[r], refs[r], ref_grads[r], (key, options, bin_rows, r))
    assert not torch.allclose(refs[0], refs[1])  # the runs really differ
