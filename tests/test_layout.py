"""The layout a reader can follow: every path the README and docs name exists, and the tree holds no symlinks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("pipeline/", "stages/", "scripts/", "tests/", "benchmarks/", "docs/", ".ci/", "cache/", "data/")
TOP_FILES = {"dvc.yaml", "params.yaml", "pyproject.toml", "cli.py", "constraints.txt", "README.md"}
PLACEHOLDER = re.compile(r"NAME|<|\*|\.\.\.|\{")


def _named_paths(text: str) -> set[str]:
    """Repository paths named in Markdown: `code` spans and link targets that start at a top-level folder/file."""
    spans = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s#]+)\)", text)
    found = set()
    for span in spans:
        span = span.removeprefix("./")
        if span.startswith(TOP) or span in TOP_FILES:
            if not PLACEHOLDER.search(span):
                found.add(span)
    return found


def test_every_path_the_readme_and_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for doc in docs:
        base = ROOT if doc.parent == ROOT else doc.parent
        for path in sorted(_named_paths(doc.read_text(encoding="utf-8"))):
            if path.startswith("cache/") or path.startswith("runs/"):
                continue  # outputs, made by the commands
            if not ((ROOT / path).exists() or (base / path).exists()):
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_no_symlinks_in_the_tree():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in listed.splitlines() if line.startswith("120000")]
    assert not links, f"symlinks in the repository: {links}"
    on_disk = [p for p in (ROOT / d for d in ("pipeline", "stages", "scripts", "tests", "benchmarks")) for p in p.rglob("*")
               if p.is_symlink()]
    assert not on_disk, f"symlinks on disk: {on_disk}"


def test_every_coopipe_import_names_a_file():
    """`from coopipe.x.y import ...` must be the file pipeline/coopipe/x/y.py (or a package folder)."""
    bad = []
    for source in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("tests/*.py"),
                   *ROOT.glob("benchmarks/*.py"), ROOT / "cli.py"]:
        for module in re.findall(r"^\s*(?:from|import)\s+(coopipe(?:\.\w+)*)", source.read_text(), flags=re.M):
            rel = Path("pipeline", *module.split("."))
            if not ((ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()):
                bad.append(f"{source.relative_to(ROOT)}: {module}")
    assert not bad, "imports that name no file:\n" + "\n".join(bad)
