"""The two test tiers: `bash scripts/test.sh` leaves the tests marked `slow` out, `bash scripts/test.sh --all` (what
CI runs, and what the README names) runs everything. The slow tests are listed here, so that a new slow test, or a
mark dropped by accident, shows up in review rather than in the fast tier's wall time."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each over about 20 s on 2 cores (kill loops, LocalClusters, whole sweeps and pipelines, real-data learning,
# end-to-end CLI and job runs, ONNX exports).
SLOW = {
    "fault/test_kill_loop.py::test_encode_killed_at_random_points_resumes_to_the_same_store",
    "fault/test_kill_loop.py::test_train_killed_at_random_points_resumes_bitwise",
    "test_baseline_methods.py::test_age_baselines_through_the_sweep_match_their_closed_forms",
    "test_baseline_methods.py::test_classification_baselines_through_the_sweep_match_their_closed_forms",
    "test_age_jobs.py::test_age_jobs_end_to_end",
    "test_age_sweep.py::test_age_sweep_end_to_end",
    "test_cli_pipeline.py::test_train_eval_baselines_interpret",
    "test_clip_reference.py::test_offline_openai_tag_encode_equals_the_original_and_never_reuses_gelu_features",
    "test_dvc_pipeline.py::test_main_job_then_tests_on_one_clone",
    "test_dvc_pipeline.py::test_two_experiments_compare",
    "test_encode.py::test_dask_local_cluster_equals_in_process",
    "test_encode.py::test_kill_and_resume",
    "test_engines.py::test_export_cache_is_reused_and_a_damaged_file_exported_again",
    "test_feature_methods.py::test_the_four_methods_train_evaluate_predict_sweep_and_report",
    "test_kgcoop.py::test_sweep_trains_and_reports_kgcoop_and_prograd",
    "test_lpp_clap.py::test_sweep_and_report_name_both",
    "test_methods_benchmark.py::test_methods_benchmark_smallest_configuration",
    "test_planted.py::test_cocoop_finds_a_planted_conditional_prompt",
    "test_planted.py::test_coop_finds_a_planted_prompt",
    "test_planted.py::test_rank_prompts_find_planted_ranks",
    "test_planted.py::test_zero_shot_regularised_methods_find_a_planted_prompt_and_a_frozen_prompt_does_not",
    "test_plugin_method.py::test_resume_after_sigkill_equals_an_uninterrupted_run",
    "test_selection.py::test_kills_at_every_write_of_the_best_epoch_resume_to_the_uninterrupted_run",
    "test_selection.py::test_resume_after_sigkill_equals_an_uninterrupted_run",
    "test_stacked_jobs.py::test_sweep_stacks_compatible_runs_and_keeps_the_others_alone",
    "test_sweep.py::test_killed_sweep_reruns_only_missing_runs",
    "test_sweep.py::test_local_cluster_of_two_workers_matches_one_by_one",
    "test_train.py::test_coop_learns_on_eurosat_features",
    "test_write_points.py::test_a_full_disk_at_every_other_write_point_is_one_line_and_a_rerun_finishes",
    "test_write_points.py::test_a_full_disk_inside_a_dvclive_write_is_one_line_and_a_rerun_equals_an_uninterrupted_run",
    "test_write_points.py::test_a_full_disk_inside_each_zarr_write_of_an_encode_is_one_line_and_a_rerun_equals_an_uninterrupted_run",
}


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow``, called or not, alone or in a list of marks."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.List | ast.Tuple):
        return any(_is_slow_mark(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def _slow_tests() -> set[str]:
    found = set()
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                          and _is_slow_mark(n.value) for n in tree.body)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if module_slow or any(_is_slow_mark(d) for d in node.decorator_list):
                    found.add(f"{path.relative_to(ROOT / 'tests')}::{node.name}")
    return found


def test_the_slow_marks_are_the_listed_ones():
    assert _slow_tests() == SLOW


def test_the_fast_tier_leaves_out_slow_and_all_runs_everything():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert re.search(r'pytest "\$\{workers\[@\]\}" -m "not slow" "\$@"\s*$', script), \
        "the default tier must deselect the slow tests"
    all_branch = script.split("--all", 2)[-1]
    assert "pytest" in all_branch and "not slow" not in all_branch.split("fi", 1)[0]


def test_both_tiers_run_on_two_workers_with_each_file_on_one():
    """Most tests use one core: two pytest-xdist workers use both of a 2-core CI machine. A module's tests stay on
    one worker (its module fixtures are built once), in the order conftest gives (files with slow tests first)."""
    script = (ROOT / "scripts" / "test.sh").read_text()
    workers = re.search(r"^workers=\((.+)\)$", script, flags=re.M)
    assert workers and workers.group(1).split() == ['-n', '"${COOPIPE_TEST_WORKERS:-2}"', "--dist", "loadfile",
                                                    "--no-loadscope-reorder"]
    assert script.count('pytest "${workers[@]}"') == 2
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dev = \[.*"pytest-xdist', pyproject, flags=re.M), "the dev extra installs pytest-xdist"


def test_ci_runs_the_readme_full_suite_command():
    command = "bash scripts/test.sh --all"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert command in readme and "bash scripts/test.sh " in readme
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, f".ci/run must call the README's full-suite command `{command}` as it is"
    assert "bash scripts/lint.sh" in ci
