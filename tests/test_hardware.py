"""Precision by hardware: the rule for every kind of machine (facts given by hand), the probe of this machine, and
the resolved precision in an encoded store's provenance and in `coopipe cache info`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from coopipe.encode import EncodeOptions, encode_split
from coopipe.hardware import HardwareFacts, choose_precision, probe, resolve_precision
from coopipe.store import open_store

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # facts, conv tower (ResNet) or not, expected
    (HardwareFacts("cuda", cuda_bf16=True, device_name="A100"), False, "bf16"),
    (HardwareFacts("cuda", cuda_bf16=True, device_name="A100"), True, "bf16"),
    (HardwareFacts("cuda", cuda_bf16=False, device_name="V100"), True, "fp16"),
    (HardwareFacts("cpu", "AVX512", amx=True, avx512_bf16=True), False, "bf16"),
    (HardwareFacts("cpu", "AVX512", amx=True, avx512_bf16=True), True, "bf16"),
    (HardwareFacts("cpu", "AVX512", amx=False, avx512_bf16=True), True, "bf16"),
    (HardwareFacts("cpu", "AVX512", amx=False, avx512_bf16=True), False, "fp32"),
    (HardwareFacts("cpu", "AVX512", amx=False, avx512_bf16=False), True, "fp32"),
    (HardwareFacts("cpu", "AVX2"), True, "fp32"),
    (HardwareFacts("cpu", "DEFAULT"), False, "fp32"),
    (HardwareFacts("mps"), True, "fp32"),
]


@pytest.mark.parametrize(("facts", "conv", "expected"), CASES)
def test_rule_for_every_kind_of_machine(facts: HardwareFacts, conv: bool, expected: str) -> None:
    choice = choose_precision(facts, conv_tower=conv)
    assert choice.precision == expected and choice.reason
    assert resolve_precision("auto", facts=facts, conv_tower=conv) == expected
    # the text tower is a transformer: the bf16 text path follows the non-convolutional rule


def test_auto_logs_the_choice_and_explicit_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    amx = HardwareFacts("cpu", "AVX512", amx=True, avx512_bf16=True, device_name="Xeon")
    with caplog.at_level(logging.INFO, logger="coopipe.hardware"):
        assert resolve_precision("auto", facts=amx) == "bf16"
        assert resolve_precision("fp32", facts=amx) == "fp32"
    text = caplog.text
    assert "precision auto -> bf16" in text and "AMX" in text and "Xeon" in text
    assert "precision fp32 (explicit; auto would pick bf16" in text


def test_bf16_on_an_emulating_cpu_warns_with_a_measured_ratio(caplog: pytest.LogCaptureFixture) -> None:
    plain = HardwareFacts("cpu", "AVX512", amx=False, avx512_bf16=False)
    with caplog.at_level(logging.WARNING, logger="coopipe.hardware"):
        assert resolve_precision("bf16", facts=plain) == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "emulates bf16" in warnings[0].getMessage() and "x the fp32 speed here just now" in warnings[0].getMessage()


def test_bf16_where_auto_picks_it_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    """An explicit bf16 that auto would also pick (a conv tower on AVX512-BF16) is not the slow path: no warning,
    while the same request for a transformer tower there still warns."""
    avx = HardwareFacts("cpu", "AVX512", amx=False, avx512_bf16=True)
    with caplog.at_level(logging.WARNING, logger="coopipe.hardware"):
        assert resolve_precision("bf16", facts=avx, conv_tower=True) == "bf16"
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        assert resolve_precision("bf16", facts=avx, conv_tower=False) == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "has AVX512-BF16 but no AMX" in warnings[0].getMessage()


def test_bad_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", facts=HardwareFacts("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        EncodeOptions(precision="half")


def test_probe_of_this_machine_agrees_with_torch() -> None:
    facts = probe("cpu")
    assert facts.device_type == "cpu"
    assert facts.amx == bool(torch.cpu._is_amx_tile_supported())
    assert facts.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert facts.describe().startswith("cpu ")
    resolved = EncodeOptions().resolved()
    assert resolved.precision == choose_precision(facts).precision != "auto"


def test_auto_is_the_one_default() -> None:
    assert EncodeOptions().precision == "auto"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["encode"]["precision"] == EncodeOptions().precision


def _imports(*names: str) -> bool:
    try:
        for name in names:
            __import__(name)
    except ImportError:
        return False
    return True


def test_store_records_the_resolved_precision_and_engine(eurosat, rn50, tmp_path: Path) -> None:
    from coopipe.cli import app

    opts = EncodeOptions(chunk_rows=4, batch_size=4, num_workers=0, progress=False)  # precision auto
    result = encode_split(eurosat, "test", cache_dir=tmp_path, positions=[0, 1000, 2000, 3000], options=opts, clip=rn50)
    prov = open_store(result.path).provenance
    expected = choose_precision(probe("cpu"), conv_tower=True).precision  # RN50: a convolutional tower
    # the engine rule: ONNX Runtime only for fp32 on the CPU with its packages installed
    engine = "onnxruntime" if expected == "fp32" and _imports("onnxruntime", "onnx") else "eager"
    assert prov["precision"] == expected and prov["engine"] == engine
    info = CliRunner().invoke(app, ["cache", "info", str(result.path)])
    assert info.exit_code == 0, info.output
    assert f"precision {expected}  engine {engine}" in info.output
    # asking for the resolved precision explicitly finds the same store (auto is never part of the key)
    again = encode_split(
        eurosat, "test", cache_dir=tmp_path, positions=[0, 1000, 2000, 3000], clip=rn50,
        options=EncodeOptions(precision=expected, chunk_rows=4, batch_size=4, num_workers=0, progress=False),
    )
    assert again.reused and again.path == result.path
