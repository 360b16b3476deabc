"""The DVC pipeline as a user meets it.

- Each stage depends on every library module its script runs (the import closure, computed from the source).
- On one fresh clone, the README's offline main job (`dvc exp run -S ...`) and then the tests both pass, and
  `git status` shows only what the README says the main job writes.
- Two experiments with different params compare: `dvc exp show` has both rows' metrics, `dvc exp diff` their
  differences, `dvc plots diff` their training curves.

The clone runs on a smaller copy of the bundled sample (2 images per class and split) with a few epochs, so that
two experiments fit in a few minutes; everything else is the README's command.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "pipeline"


# ---------------------------------------------------------------- code dependencies
def _module_file(name: str) -> Path | None:
    """``coopipe.x.y`` -> pipeline/coopipe/x/y.py (or the package's __init__.py); None if no such file."""
    base = LIBRARY.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Every ``coopipe`` module ``path`` imports, at the top or inside functions (lazy imports run too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "coopipe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "coopipe":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return found | parents  # importing a.b.c runs a/__init__.py and a/b/__init__.py


def import_closure(script: Path) -> set[Path]:
    """The library files a stage script runs: its coopipe imports, theirs, and so on (plus stages/params.py)."""
    todo, seen = [script, ROOT / "stages" / "params.py"], set()
    files: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            file = _module_file(module)
            if file is not None:
                files.add(file)
                todo.append(file)
    return files


def test_every_stage_depends_on_the_library_modules_its_script_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        script = re.search(r"scripts/stage\.sh (\w+)", stage["cmd"]).group(1)
        deps = [str(d) for d in stage["deps"]]
        assert f"stages/{script}.py" in deps and "stages/params.py" in deps and "scripts/stage.sh" in deps, name
        for file in sorted(import_closure(ROOT / "stages" / f"{script}.py")):
            rel = file.relative_to(ROOT).as_posix()
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                missing.append(f"{name}: {rel}")
    assert not missing, "stage deps miss modules the stage runs:\n" + "\n".join(missing)


def test_no_stage_depends_on_a_whole_cache_folder():
    """Stages read given stores and index files: a store another command adds must not rerun them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cache_deps = [d for d in stage["deps"] if str(d).startswith("${paths.cache}")]
        assert all(str(d).endswith(".json") for d in cache_deps), (name, cache_deps)


# ---------------------------------------------------------------- the README's main job on a fresh clone
def readme_offline_settings() -> list[str]:
    """The ``-S`` settings of the README's offline main-job command (``bash scripts/repro.sh -S ...``)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(li for li in readme.splitlines() if li.startswith("bash scripts/repro.sh -S"))
    words = shlex.split(line)
    return [words[i + 1] for i, w in enumerate(words) if w == "-S"]


def readme_main_job_writes() -> set[str]:
    """What the README says the main job leaves in `git status` (the ``git status`` line of its quick start)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"`git status` then shows (.+?)\.(?:\s|$)", readme, flags=re.S)
    assert match, "the README says what the main job leaves in `git status`"
    return set(re.findall(r"`([^`]+)`", match.group(1)))


def _small_sample(dest: Path, per_class: int = 2) -> Path:
    """The bundled sample with ``per_class`` images per class and split (same layout, same split file format)."""
    src = ROOT / "data" / "sample" / "eurosat"
    split = json.loads((src / "split_zhou_EuroSAT.json").read_text())
    small: dict[str, list] = {}
    for name, items in split.items():
        counts: dict[int, int] = {}
        small[name] = [it for it in items if counts.setdefault(it[1], 0) < per_class
                       and not counts.__setitem__(it[1], counts[it[1]] + 1)]
    for items in small.values():
        for rel, _, _ in items:
            (dest / "eurosat" / "2750" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "2750" / rel, dest / "eurosat" / "2750" / rel)
    (dest / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(small))
    return dest


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "COOPIPE_PYTHON": sys.executable, "PATH": f"{venv_bin}:{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "GIT_AUTHOR_NAME": "coopipe test",
            "GIT_AUTHOR_EMAIL": "test@coopipe.invalid", "GIT_COMMITTER_NAME": "coopipe test",
            "GIT_COMMITTER_EMAIL": "test@coopipe.invalid", "OMP_NUM_THREADS": "2"}


def _run(cmd: list[str], cwd: Path, timeout: float = 1500, **env: str) -> str:
    """``cmd``'s stdout; it and everything it started (DVC's stage processes) are killed if the test stops early."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout here or pytest-timeout's: no stage process may outlive the test
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, Path]:
    """A fresh clone of this repository (its committed state) and a smaller sample beside it."""
    base = tmp_path_factory.mktemp("fresh")
    _run(["git", "clone", "-q", str(ROOT), str(base / "coopipe")], cwd=base, timeout=120)
    return base / "coopipe", _small_sample(base / "sample")


# on top of the README's settings; the lr set explicitly (params.yaml leaves it to the method: null), so that the
# second experiment's lr is a change of a number
SHORT = ("fewshot.shots=[1]", "train.max_epoch=2", "encode.views=1", "train.lr=0.002")


@pytest.fixture(scope="module")
def two_experiments(clone) -> Path:
    """The README's offline main job (shortened, on the smaller sample), then a second experiment with another lr."""
    repo, sample = clone
    settings = [*readme_offline_settings(), *SHORT, f"data.root={sample}"]
    _run(_dvc("exp", "run", "-n", "first", *[a for s in settings for a in ("-S", s)]), cwd=repo)
    _run(_dvc("exp", "run", "-n", "second", "-S", "train.lr=0.05"), cwd=repo)
    return repo


@pytest.mark.slow
@pytest.mark.timeout(3000)  # two experiments of 7 stages each: 5-10 minutes on 2 cores, more under load
def test_main_job_then_tests_on_one_clone(two_experiments: Path):
    repo = two_experiments
    status = _run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=repo)
    changed = {line[3:].rstrip("/") for line in status.splitlines()}
    assert changed <= {p.rstrip("/") for p in readme_main_job_writes()}, status
    assert "params.yaml" in changed  # the experiment's values are applied to the workspace, as DVC does
    # the tests that read params.yaml pass after the main job (they compare the defaults with the committed file)
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_defaults.py"], cwd=repo,
               PYTHONPATH=str(repo / "pipeline"))  # the clone's library, as its own .venv would import it
    assert "passed" in out and "failed" not in out


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_two_experiments_compare(two_experiments: Path):
    repo = two_experiments
    rows = json.loads(_run(_dvc("exp", "show", "--json"), cwd=repo))
    exps = {e["name"]: e for row in rows for e in [*(x["revs"][0] for x in row.get("experiments") or [])]}
    assert {"first", "second"} <= set(exps)
    for name in ("first", "second"):
        metrics = exps[name]["data"]["metrics"]["metrics/scores.json"]["data"]
        assert metrics["accuracy"]["coop"]["shots1"] >= 0 and "coop" in metrics["gain_over_zeroshot"]
    diff = json.loads(_run(_dvc("exp", "diff", "first", "second", "--all", "--json"), cwd=repo))
    assert diff["params"]["params.yaml"]["train.lr"] == {"old": 0.002, "new": 0.05, "diff": pytest.approx(0.048)}
    assert "metrics/scores.json" in diff["metrics"]
    plots = json.loads(_run(_dvc("plots", "diff", "first", "second", "--json"), cwd=repo))
    curves = plots["data"]["metrics/training/shots1_seed1.tsv"][0]
    assert curves["revisions"] == ["first", "second"]
    values = curves["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"first", "second"} and {v["epoch"] for v in values} == {"1", "2"}
