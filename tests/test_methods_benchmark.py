"""`benchmarks/methods.py` runs at its smallest (one method, one epoch, one timed step, synthetic 1-shot features,
no reference image encoding) and ends with one JSON object holding its ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_methods_benchmark_smallest_configuration(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pipeline"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--methods", "coop", "--ks", "10",
                          "--epochs", "1", "--steps", "1", "--shots", "1", "--reencode", "none", "--threads", "1",
                          "--cache", str(tmp_path / "no-cache")], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "AMD" in lines[0] or "cpu" in lines[0]  # the CPU comes first
    summary = json.loads(lines[-1])
    assert summary["ratio_coop_K10"] > 0 and summary["x_coop_coop_K10"] == 1.0
    (row,) = summary["rows"]
    assert row["method"] == "coop" and row["images"] == 10 and row["reference"] == "cached features"
