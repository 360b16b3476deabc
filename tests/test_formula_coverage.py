"""Every registered method beyond the prompt methods of the first release has a float64 formula test: one that
recomputes its logits and loss (and, for a trained method, its gradients) from its paper's formula, written
independently of the method module. A method registered later fails here until its formula test is listed."""

from __future__ import annotations

import ast
from pathlib import Path

from coopipe.methods import get_method, method_names

TESTS = Path(__file__).resolve().parent

# the prompt methods whose text path is checked against the original code (tests/test_clip_reference.py)
PROMPT_PATH = {"coop", "cocoop", "rank", "ordcoop"}

FORMULA_TESTS = {
    "kgcoop": "test_kgcoop.py::test_loss_and_gradient_follow_the_paper",
    "prograd": "test_prograd.py::test_loss_and_projected_gradient_follow_the_paper",
    "taskres": "test_feature_methods.py::test_taskres_base_logits_loss_and_gradient_follow_the_reference",
    "clipadapter": "test_feature_methods.py::test_clipadapter_logits_loss_and_gradients_follow_the_reference",
    "tipadapter": "test_feature_methods.py::test_tipadapter_cache_logits_loss_and_key_gradients_follow_the_reference",
    "tipadapterf": "test_feature_methods.py::test_tipadapter_cache_logits_loss_and_key_gradients_follow_the_reference",
    "lpp": "test_lpp_clap.py::test_lpp_start_logits_loss_gradients_and_steps_follow_the_reference",
    "clap": "test_lpp_clap.py::test_clap_start_logits_loss_and_gradients_follow_the_reference",
    "zeroshot": "test_baseline_methods.py::test_baseline_logits_and_loss_follow_their_closed_forms",
    "linear_probe": "test_baseline_methods.py::test_baseline_logits_and_loss_follow_their_closed_forms",
    "ridge": "test_baseline_methods.py::test_baseline_logits_and_loss_follow_their_closed_forms",
}


def _function(file: str, name: str) -> ast.FunctionDef | None:
    tree = ast.parse((TESTS / file).read_text(encoding="utf-8"))
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def test_every_registered_method_has_a_formula_test():
    assert set(method_names()) - PROMPT_PATH == set(FORMULA_TESTS), "list the new method's formula test here"
    for method, where in FORMULA_TESTS.items():
        file, name = where.split("::")
        function = _function(file, name)
        assert function is not None, where
        source = ast.unparse(function)
        assert any(word in source for word in ("float64", "F64", "clip64", ".double()")), f"{where}: not in float64"
        assert "assert_close" in source and "loss" in source, where
        if get_method(method).trains:  # a trained method's gradients are compared too
            assert "grad" in source, f"{where} compares no gradient"
