"""`coopipe models`: the support decided from open_clip's configs agrees with running the packed prompt text path on
the built models (RN50, ViT-B-32, ViT-B-16 with random weights: parity with ``encode_text``) and with the text
tower refusing a CoCa model; every command refuses an unsupported model with the listing's reason; each tag's
activation is the one open_clip records (QuickGELU for OpenAI's weights)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from coopipe.cli import app
from coopipe.compat import import_open_clip
from coopipe.errors import ParamsError
from coopipe.model_support import list_supported, tag_activation, unsupported_reason
from coopipe.models import activation_of, load_clip, model_config
from coopipe.prompt import PromptLearner
from coopipe.text_encoder import PromptTextEncoder
from coopipe.text_tower import resolve_text_tower

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORTED = ("RN50", "ViT-B-32", "ViT-B-16")
REFUSED = "coca_ViT-B-32"  # appends a class token after the text: not pooled at [EOS]
NAMES = ["dog", "golden retriever", "st. bernard with a long name"]


@pytest.fixture(scope="module")
def listing() -> dict:
    return {entry.name: entry for entry in list_supported()}


@pytest.mark.parametrize("name", SUPPORTED)
def test_listed_as_supported_and_the_packed_path_is_exact(listing, name):
    assert listing[name].support.supported
    clip = load_clip(name, "none")
    learner = PromptLearner(clip, NAMES, ctx_init="a photo of a")
    tokens = clip.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        expected = clip.model.encode_text(tokens, normalize=True)
        packed = PromptTextEncoder(clip, class_chunk=2)(learner)  # shared prefix, packed rows, bins
    assert torch.allclose(packed, expected, rtol=0, atol=1e-5)


def test_refused_architecture_agrees_with_the_text_tower(listing):
    entry = listing[REFUSED]
    assert not entry.support.supported and "does not pool at [EOS]" in entry.support.reason
    model = import_open_clip().create_model(REFUSED, pretrained=None)
    with pytest.raises(ParamsError, match="class embedding"):
        resolve_text_tower(model)
    reason = unsupported_reason(REFUSED, model_config(REFUSED))
    with pytest.raises(ParamsError) as err:  # refused before anything is built
        load_clip(REFUSED, "none")
    assert str(err.value) == reason and entry.support.reason in reason


def test_every_command_refuses_with_the_same_line(tmp_path):
    reason = unsupported_reason(REFUSED, model_config(REFUSED))
    runner = CliRunner()
    for args in (["zeroshot", "--features", str(tmp_path), "--dataset", "toy", "--model", REFUSED,
                  "--pretrained", "none"],
                 ["train", "--features", str(tmp_path), "--dataset", "toy", "--shots", "1", "--seed", "1",
                  "--out", str(tmp_path / "run"), "--model", REFUSED],
                 ["sweep", "--dataset", "toy", "--model", REFUSED, "--no-encode", "--runs", str(tmp_path / "runs")],
                 ["encode", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--model", REFUSED,
                  "--pretrained", "none", "--cache", str(tmp_path / "cache")]):
        res = runner.invoke(app, args)
        assert res.exit_code in (1, 2) and reason in res.output, res.output  # sweep: 2 for bad options


def test_activation_of_tags_and_models(listing):
    assert dict(listing["ViT-B-32"].tags)["openai"] == "QuickGELU"
    assert dict(listing["ViT-B-32"].tags)["laion2b_s34b_b79k"] == "GELU"
    assert tag_activation("RN50-quickgelu", "yfcc15m") == "QuickGELU"  # from the model config
    assert listing["RN50"].activation == "GELU" and listing["RN50-quickgelu"].activation == "QuickGELU"
    assert activation_of(load_clip("RN50", "none").model) == "GELU"
    assert activation_of(import_open_clip().create_model("RN50-quickgelu", pretrained=None)) == "QuickGELU"


def test_cli_listing():
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rows = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert all(rows[name].split(None, 1)[1] == "yes" for name in SUPPORTED)
    assert "no: " in rows[REFUSED] and "no causal mask" in rows["ViT-B-16-SigLIP"]
    openai = [line.split() for line in lines if line.startswith("    openai")]
    assert openai and all(parts[1] == "QuickGELU" for parts in openai)
