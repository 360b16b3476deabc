"""The method seam: a typed method record, its run label and parser, and checkpoints that rebuild their learner."""

from __future__ import annotations

import json

import pytest
import torch

from coopipe.checkpoint import RunRecord, load_checkpoint, save_result
from coopipe.checkpoint_files import META_FILE
from coopipe.trained_learner import load_learner
from coopipe.errors import CheckpointError, ParamsError
from coopipe.methods import MethodSpec
from coopipe.text_encoder import PromptTextEncoder
from coopipe.train import train_prompt
from coopipe.train_config import TrainConfig

CLASSES = ["cat", "dog", "sea or lake"]


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        (MethodSpec(), "coop"),
        (MethodSpec.of("coop", csc=True), "coop_csc"),
        (MethodSpec.of("coop", class_token_position="middle"), "coop_middle"),
        (MethodSpec.of("coop", n_ctx=8), "coop_m8"),
        (MethodSpec.of("coop", csc=True, class_token_position="middle", n_ctx=4), "coop_csc_middle_m4"),
        (MethodSpec.of("coop", ctx_init="a photo of a"), "coop_init-a-photo-of-a"),
        (MethodSpec("cocoop"), "cocoop"),
        (MethodSpec.of("cocoop", n_ctx=16), "cocoop_m16"),
        (MethodSpec.of("cocoop", ctx_init="a satellite photo of"), "cocoop_init-a-satellite-photo-of"),
        (MethodSpec("rank"), "rank"),
        (MethodSpec.of("rank", n_base_ranks=5), "rank_b5"),
    ],
)
def test_label_and_parse_round_trip(spec: MethodSpec, label: str):
    assert spec.label() == label
    assert MethodSpec.parse(label) == spec
    assert MethodSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_paper_settings_and_bad_specs():
    cocoop = MethodSpec("cocoop")
    assert (cocoop.n_ctx, cocoop.ctx_init) == (4, "a photo of a")
    with pytest.raises(ParamsError, match="a method record must be a mapping with a 'method' key"):
        MethodSpec.from_dict({"n_ctx": 16, "ctx_init": None, "csc": True, "class_token_position": "end"})
    with pytest.raises(ParamsError, match="unknown method 'foo'"):
        MethodSpec("foo")
    with pytest.raises(ParamsError, match="cocoop has no option.*csc"):
        MethodSpec.of("cocoop", csc=True)
    assert MethodSpec.parse("cocoop_m4") == MethodSpec.of("cocoop", n_ctx=4)  # random init, M = 4
    for bad in ("coop_m0", "coop_sideways", "coop_m16", "linear", "linear_probe_x"):  # linear_probe is a method
        with pytest.raises(ParamsError):
            MethodSpec.parse(bad)
    assert not MethodSpec.of("coop", csc=True).transferable and MethodSpec().transferable


def test_checkpoint_round_trips_its_typed_record_and_rebuilds_an_identical_learner(rn50, tmp_path):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(4)
    feats = torch.randn(3, rn50.embed_dim, generator=g)[labels][:, None] + 0.5 * torch.randn(12, 2, rn50.embed_dim, generator=g)
    cfg = TrainConfig(max_epoch=2, batch_size=4, seed=1, method=MethodSpec.of("coop", n_ctx=4, class_token_position="middle"))
    result = train_prompt(feats, labels, rn50, CLASSES, cfg)
    run = RunRecord(dataset="toy", shots=4, seed=1, classes="all", pretrained="none")  # no few-shot index, no stores
    out = save_result(tmp_path / "run", result, clip=rn50, classnames=CLASSES, config=cfg, run=run)

    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == MethodSpec.of("coop", n_ctx=4, class_token_position="middle").to_dict()
    assert meta["run"] == run.to_dict()
    ckpt = load_checkpoint(out)
    assert ckpt.run == run and ckpt.method.label() == "coop_middle_m4" and ckpt.dataset == "toy"

    learner = load_learner(ckpt, rn50)
    assert torch.equal(learner.ctx.detach(), result.ctx)
    assert learner.config() == {"classnames": CLASSES, "n_ctx": 4, "ctx_init": None, "csc": False,
                                "class_token_position": "middle"}
    with torch.no_grad():
        plain = PromptTextEncoder(rn50, cut=False, share_prefix=False)(learner)
    assert torch.allclose(plain, result.text_features, atol=1e-5)

    # a class-specific context belongs to its classes: rebuilding it for others is a clear error
    csc_cfg = TrainConfig(max_epoch=1, batch_size=4, seed=1, method=MethodSpec.of("coop", n_ctx=2, csc=True))
    csc = load_checkpoint(save_result(tmp_path / "csc", train_prompt(feats, labels, rn50, CLASSES, csc_cfg),
                                      clip=rn50, classnames=CLASSES, config=csc_cfg))
    assert csc.run == RunRecord()
    with pytest.raises(CheckpointError, match="class-specific context"):
        load_learner(csc, rn50, ["bird", "fish"])
    # a malformed record is a one-line error, not a traceback
    meta["run"] = "oops"
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'run' must be an object"):
        _ = load_checkpoint(out).run
