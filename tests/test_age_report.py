"""The MORPH-style age table (mean ± std over seeds, one seed without ±) and the age figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coopipe.age_report import (
    PROTOCOL_NOTE,
    age_cells,
    age_markdown,
    plot_cs_curves,
    plot_mae_vs_shots,
    plot_predicted_vs_true,
)
from coopipe.errors import ParamsError


def _records() -> list[dict]:
    return [
        {"method": "coop", "shots": 2, "seed": 1, "mae_exp": 5.0, "mae_max": 6.0},
        {"method": "coop", "shots": 2, "seed": 2, "mae_exp": 7.0, "mae_max": 6.0},
        {"method": "rank", "shots": 2, "seed": 1, "mae_exp": 4.0, "mae_max": 4.5},
        {"method": "zeroshot", "shots": 0, "seed": None, "mae_exp": 9.5, "mae_max": 11.0},
    ]


def test_table_mean_std_and_single_seed() -> None:
    cells = {(c.method, c.shots): c for c in age_cells(_records())}
    assert cells[("coop", 2)].text() == "6.00 ± 1.00"  # population std of 5 and 7
    assert cells[("rank", 2)].text() == "4.00" and cells[("zeroshot", 0)].text() == "9.50"
    lines = age_markdown(list(cells.values()), constant_mae=10.25, dataset="utkface")
    text = "\n".join(lines)
    assert "| CoOp | – | 6.00 ± 1.00 |" in text and "| Rank prompts (OrdinalCLIP) | – | 4.00 |" in text and "| constant (train median) | 10.25 | 10.25 |" in text
    assert lines[-1] == PROTOCOL_NOTE and "VGG-16" in PROTOCOL_NOTE and "frozen" in PROTOCOL_NOTE
    assert "best validation MAE" in PROTOCOL_NOTE and "its validation list is its test list" in PROTOCOL_NOTE
    assert {c.text() for c in age_cells(_records(), decoding="max") if c.method == "coop"} == {"6.00 ± 0.00"}
    with pytest.raises(ParamsError, match="mae_exp"):
        age_cells([{"method": "coop", "shots": 1}])


def test_figures_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(16, 78, size=200).astype(float)
    pred = true + rng.normal(scale=5, size=200)
    assert plot_predicted_vs_true(true, pred, tmp_path / "pvt.png").stat().st_size > 1000
    curves = {"coop 16": {t: min(1.0, t / 10) for t in range(1, 11)}, "rank 16": {t: min(1.0, t / 8) for t in range(1, 11)}}
    assert plot_cs_curves(curves, tmp_path / "cs.png").stat().st_size > 1000
    assert plot_mae_vs_shots(age_cells(_records()), tmp_path / "mae.png", constant_mae=10.0).exists()


def test_constant_row_per_shots() -> None:
    """Each shots column shows the constant predictor of its own train draws (a missing column shows –)."""
    lines = age_markdown(age_cells(_records()), constant_mae={0: 11.0, 2: 9.5})
    assert "| constant (train median) | 11.00 | 9.50 |" in lines
    lines = age_markdown(age_cells(_records()), constant_mae={2: 9.5})
    assert "| constant (train median) | – | 9.50 |" in lines
