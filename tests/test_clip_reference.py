"""coopipe against OpenAI's original CLIP code (``clip/model.py`` of clip-anytorch) on the same weights.

Every other exactness test compares coopipe with open_clip's model as coopipe builds it, so a model that is not CLIP
(GELU where OpenAI trained QuickGELU) passes them. Here the reference is independent: OpenAI's ``build_model`` on
random weights in OpenAI's layout (``tests/clip_reference.py``), OpenAI's preprocessing and tokenizer, and prompts
composed from OpenAI's modules as CoOp's ``TextEncoder`` does. coopipe loads the same weights as a checkpoint file
(``--pretrained FILE`` with the ``-quickgelu`` model name, as the README says for OpenAI's weights) and through the
``openai`` tag from a private Hugging Face cache (the default ``--pretrained openai`` with the plain model name).

Tolerances (float32 on both sides): 1 - cosine <= 1e-8 and max |difference| <= 1e-4 of the reference's largest
entry. Measured on RN50 and ViT-B-32: the two implementations agree to 1 - cosine <= 1.2e-11 and <= 4e-6 relative
(different kernels and op orders over 12-24 blocks: fused attention, the packed text path, ONNX Runtime's fused
kernels), while GELU in place of QuickGELU gives 1 - cosine 5e-5 .. 7e-4 and 1e-2 .. 3.5e-2 relative: 25x inside
the relative bound on one side, 100x outside it on the other, and the cosine bound 5000x below the GELU error. The
controls in the text test check that the bounds see the activation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from clip_reference import (
    original_preprocess,
    reference_model,
    save_checkpoint,
    text_features,
    tokenize,
    write_hub_cache,
)
from coopipe.baselines import zero_shot_classifier
from coopipe.cli import app
from coopipe.cocoop import CoCoOpLearner
from coopipe.cocoop_text import cocoop_text_features
from coopipe import models
from coopipe.models import LoadedClip, activation_of, load_clip
from coopipe.prompt import PromptLearner
from coopipe.rank_prompt import RankPromptLearner
from coopipe.store import find_stores
from coopipe.text_encoder import PromptTextEncoder, coop_logits

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "eurosat" / "2750"  # real EuroSAT images, shipped in the repository
IMAGE_CLASSES = ("Forest", "Highway", "SeaLake")
PER_CLASS = 2
CLASSNAMES = ["forest", "highway or road", "sea or lake", "annual crop land"]
TEXTS = ["a centered satellite photo of forest.", "a photo of a dog.", "sea or lake", "X X X permanent crop land."]
COSINE = 1e-8
RELATIVE = 1e-4
MODELS = ["RN50", "ViT-B-32", pytest.param("ViT-B-16", marks=pytest.mark.slow)]
# The prompt tests run the text tower only, and RN50's is ViT-B-32's and ViT-B-16's (width 512, 8 heads, 12 layers:
# ``ARCHITECTURES`` in tests/clip_reference.py): the fast tier runs them on RN50, the slow tier on all three.
TEXT_MODELS = ["RN50", *(pytest.param(name, marks=pytest.mark.slow) for name in ("ViT-B-32", "ViT-B-16"))]
text_models = pytest.mark.parametrize("case", TEXT_MODELS, indirect=True)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Row-wise cosine >= 1 - COSINE and max abs difference <= RELATIVE x the reference's largest entry."""
    ours, reference = ours.double().reshape(-1, ours.shape[-1]), reference.double().reshape(-1, reference.shape[-1])
    cosine = float(F.cosine_similarity(ours, reference, dim=-1).min())
    worst = float((ours - reference).abs().max() / reference.abs().max())
    assert 1 - cosine <= COSINE and worst <= RELATIVE, f"{what}: 1 - cosine {1 - cosine:.2e}, max diff {worst:.2e} rel"


def assert_apart(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """The control: the GELU build must fall outside the bounds (else the bounds could not see the activation)."""
    with pytest.raises(AssertionError):
        assert_close(ours, reference, what)


@dataclass
class Case:
    name: str
    reference: torch.nn.Module  # OpenAI's CLIP, float32
    checkpoint: Path  # the same weights as a state-dict file
    hf_home: Path  # a Hugging Face cache holding them where the `openai` tag looks
    tag: LoadedClip  # coopipe: `name` with --pretrained openai (from the cache)
    file: LoadedClip  # coopipe: `name-quickgelu` with --pretrained FILE


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    name = request.param
    reference, state = reference_model(name)
    folder = tmp_path_factory.mktemp(f"weights-{name}")
    checkpoint = save_checkpoint(state, folder / f"{name}.pt")
    hf_home = folder / "hf"
    write_hub_cache(hf_home, name, checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        offline_hub(patch, hf_home)
        tag = load_clip(name, "openai")
    file = load_clip(f"{name}-quickgelu", str(checkpoint))
    assert activation_of(tag.model) == activation_of(file.model) == "QuickGELU"
    yield Case(name, reference, checkpoint, hf_home, tag, file)


def offline_hub(patch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """Point this process's Hugging Face hub at ``hf_home``, offline (huggingface_hub reads its environment once at
    import, so its constants are patched; the environment for coopipe's own check and for subprocesses)."""
    from huggingface_hub import constants

    patch.setenv("HF_HOME", str(hf_home))
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    patch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of a few real EuroSAT images (PER_CLASS of each of IMAGE_CLASSES)."""
    import shutil

    folder = tmp_path_factory.mktemp("eurosat") / "few"
    for cls in IMAGE_CLASSES:
        (folder / cls).mkdir(parents=True)
        for src in sorted((SAMPLE / cls).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(src, folder / cls / src.name)
    return folder


def reference_images(case: Case, folder: Path, paths: np.ndarray) -> torch.Tensor:
    """OpenAI's ``encode_image`` of the images at ``paths`` on OpenAI's preprocessing: (n, D)."""
    preprocess = original_preprocess(case.reference.visual.input_resolution)
    batch = torch.stack([preprocess(Image.open(folder / str(p))) for p in paths])
    with torch.no_grad():
        return case.reference.encode_image(batch)


def encode_args(folder: Path, cache: Path, model: str, pretrained: str, engine: str) -> list[str]:
    """``coopipe encode`` of every image in ``folder``, fp32, stored as float32."""
    return [
        "encode", "--dataset", "imagefolder", "--data-root", str(folder), "--split", "train", "--shots", "all",
        "--views", "0", "--model", model, "--pretrained", pretrained, "--precision", "fp32", "--dtype", "float32",
        "--engine", engine, "--cache", str(cache), "--workers", "0", "--batch-size", "4", "--no-progress",
    ]


def stored(folder: Path, cache: Path, weights: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(paths, raw features) of the one store of ``folder``'s images under ``cache`` (with ``weights``)."""
    (store,) = find_stores(cache, f"imagefolder-{folder.name}", "train", weights=weights)
    return store.paths(), torch.from_numpy(store.read())


def encode(folder: Path, cache: Path, model: str, pretrained: str, engine: str) -> tuple[np.ndarray, torch.Tensor]:
    """``coopipe encode`` in this process: (paths, raw features) of the store it wrote."""
    result = CliRunner().invoke(app, encode_args(folder, cache, model, pretrained, engine))
    assert result.exit_code == 0, result.output
    paths, features = stored(folder, cache)
    return paths, features


@pytest.fixture(scope="module")
def eager_encoded(case: Case, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, torch.Tensor]:
    """``coopipe encode`` of ``images`` with the eager engine, once per model: the image-feature and zero-shot tests
    read the same store (each encode builds the tower from the checkpoint file again)."""
    cache = tmp_path_factory.mktemp(f"cache-{case.name}")
    return encode(images, cache, f"{case.name}-quickgelu", str(case.checkpoint), "eager")


@pytest.mark.parametrize("engine", ["eager", pytest.param("onnxruntime", marks=pytest.mark.slow)])  # ~20-50 s export
def test_image_features_of_coopipe_encode_equal_the_original(case: Case, images: Path, engine: str,
                                                             eager_encoded: tuple[np.ndarray, torch.Tensor],
                                                             tmp_path) -> None:
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
        paths, ours = encode(images, tmp_path / "cache", f"{case.name}-quickgelu", str(case.checkpoint), engine)
    else:
        paths, ours = eager_encoded
    assert len(paths) >= len(IMAGE_CLASSES)
    assert_close(ours, reference_images(case, images, paths), f"{case.name} {engine} image features")


@text_models
def test_hand_crafted_prompts_equal_the_original(case: Case) -> None:
    tokens = tokenize(TEXTS)
    assert torch.equal(torch.as_tensor(case.tag.tokenizer(TEXTS)), tokens)  # open_clip's tokenizer is OpenAI's
    with torch.no_grad():
        reference = F.normalize(case.reference.encode_text(tokens), dim=-1)
        gelu = PromptTextEncoder(load_clip(case.name, str(case.checkpoint))).encode_texts(TEXTS)
    for clip in (case.tag, case.file):
        with torch.no_grad():
            assert_close(PromptTextEncoder(clip).encode_texts(TEXTS), reference, f"{clip.weights_id} prompts")
    assert_apart(gelu, reference, "GELU build")


def coop_reference(case: Case, names: list[str], ctx: torch.Tensor, position: str) -> torch.Tensor:
    """CoOp's prompts from OpenAI's modules, as KaiyangZhou/CoOp trainers/coop.py composes them: the embeddings of
    "X .. X name." with the context spliced in after [SOS] (``end``) or around the name (``middle``)."""
    n_ctx = ctx.shape[-2]
    tokens = tokenize([" ".join(["X"] * n_ctx) + f" {name}." for name in names])
    name_lens = [len(tokenize([name])[0].nonzero()) - 2 for name in names]
    with torch.no_grad():
        embedding = case.reference.token_embedding(tokens)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
    ctx = ctx.expand(len(names), -1, -1) if ctx.ndim == 2 else ctx
    if position == "end":
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
    else:
        half = n_ctx // 2
        prompts = torch.cat([
            torch.cat([prefix[i : i + 1], ctx[i : i + 1, :half], suffix[i : i + 1, : name_lens[i]],
                       ctx[i : i + 1, half:], suffix[i : i + 1, name_lens[i] :]], dim=1)
            for i in range(len(names))
        ])
    with torch.no_grad():
        return F.normalize(text_features(case.reference, prompts, tokens.argmax(dim=-1)), dim=-1)


def given_context(case: Case, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A context of the size of word embeddings (the reference's std, not CoOp's 0.02 init)."""
    scale = float(case.reference.token_embedding.weight.detach().std())
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@text_models
@pytest.mark.parametrize(("csc", "position"), [(False, "end"), (True, "middle")])
def test_coop_prompts_equal_the_original(case: Case, csc: bool, position: str) -> None:
    n_ctx = 5
    width = case.reference.token_embedding.weight.shape[1]
    ctx = given_context(case, (len(CLASSNAMES), n_ctx, width) if csc else (n_ctx, width), seed=1)
    reference = coop_reference(case, CLASSNAMES, ctx, position)
    for clip in (case.tag, case.file):
        learner = PromptLearner(clip, CLASSNAMES, n_ctx=n_ctx, csc=csc, class_token_position=position)
        with torch.no_grad():
            learner.ctx.copy_(ctx)
            assert_close(PromptTextEncoder(clip)(learner), reference, f"{clip.weights_id} CoOp {position}")


@text_models
def test_cocoop_prompts_equal_the_original(case: Case) -> None:
    """CoCoOp (KaiyangZhou/CoOp trainers/cocoop.py): each image's Meta-Net shift added to every context vector."""
    clip = case.tag
    learner = CoCoOpLearner(clip, CLASSNAMES, generator=torch.Generator().manual_seed(2))
    width = case.reference.token_embedding.weight.shape[1]
    ctx = given_context(case, (learner.n_ctx, width), seed=3)
    image = torch.randn(3, clip.embed_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        learner.ctx.copy_(ctx)
        ours = cocoop_text_features(PromptTextEncoder(clip), learner, image)  # (B, K, D)
        net = dict(learner.meta_net.named_parameters())
        hidden = F.relu(F.linear(F.normalize(image, dim=-1), net["linear1.weight"], net["linear1.bias"]))
        shifts = F.linear(hidden, net["linear2.weight"], net["linear2.bias"])  # (B, width)
    reference = torch.stack([coop_reference(case, CLASSNAMES, ctx + shift, "end") for shift in shifts])
    assert_close(ours, reference, "CoCoOp")


@text_models
def test_rank_prompts_equal_the_original(case: Case) -> None:
    """OrdinalCLIP's prompt "[SOS] ctx [rank]. [EOS]", its rank token given by the learner's interpolation."""
    clip = case.tag
    learner = RankPromptLearner(clip, 7, n_ctx=4, n_base_ranks=3, generator=torch.Generator().manual_seed(5))
    width = case.reference.token_embedding.weight.shape[1]
    ctx = given_context(case, (4, width), seed=6)
    with torch.no_grad():
        learner.ctx.copy_(ctx)
        learner.rank_embeds.copy_(given_context(case, (3, width), seed=7))
        ours = PromptTextEncoder(clip)(learner)
        ranks = learner.rank_embeddings()  # (7, width)
    tokens = tokenize(["X X X X X."] * 7)
    with torch.no_grad():
        embedding = case.reference.token_embedding(tokens)
    prompts = torch.cat([embedding[:, :1], ctx.expand(7, -1, -1), ranks.unsqueeze(1), embedding[:, 6:]], dim=1)
    with torch.no_grad():
        reference = F.normalize(text_features(case.reference, prompts, tokens.argmax(dim=-1)), dim=-1)
    assert_close(ours, reference, "rank prompts")


def test_zero_shot_logits_equal_the_original(case: Case, images: Path,
                                            eager_encoded: tuple[np.ndarray, torch.Tensor]) -> None:
    paths, features = eager_encoded
    template = "a centered satellite photo of {}."
    ours = coop_logits(features, zero_shot_classifier(case.tag, CLASSNAMES, template), case.tag.model.logit_scale)
    with torch.no_grad():
        preprocess = original_preprocess(case.reference.visual.input_resolution)
        batch = torch.stack([preprocess(Image.open(images / str(p))) for p in paths])
        reference, _ = case.reference(batch, tokenize([template.format(c) for c in CLASSNAMES]))
    assert_close(ours, reference, "zero-shot logits")
    assert torch.equal(ours.argmax(dim=1), reference.argmax(dim=1))


@pytest.mark.slow  # 20-30 s: a fresh process, two encodes
def test_offline_openai_tag_encode_equals_the_original_and_never_reuses_gelu_features(case: Case, images: Path,
                                                                                        tmp_path) -> None:
    """`coopipe encode --pretrained openai` offline (HF_HUB_OFFLINE=1, a private HF_HOME holding the weights where the
    tag looks), in its own process, against OpenAI's model; a store the tag's GELU build wrote into the same cache
    (as coopipe did before it built QuickGELU) is not reused."""
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:  # the GELU build, under the identity it had
        offline_hub(patch, case.hf_home)
        patch.setattr(models, "tag_forces_quick_gelu", lambda model, tag: False)
        _, gelu = encode(images, cache, case.name, "openai", "eager")
    env = {**os.environ, "HF_HOME": str(case.hf_home), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "coopipe.cli", *encode_args(images, cache, case.name, "openai", "eager")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reused" not in run.stdout and "encoded" in run.stdout, run.stdout
    paths, ours = stored(images, cache, weights=f"open_clip:{case.name}/openai+quickgelu")
    reference = reference_images(case, images, paths)
    assert_close(ours, reference, f"{case.name} offline tag image features")
    if case.name != "RN50":  # RN50's image tower uses ReLU: the activation only shows in its text tower
        assert_apart(gelu, reference, "the GELU store")
