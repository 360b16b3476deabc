"""Pieces every command of the `coopipe` command line shares: the one error boundary (a known failure is one line
on stderr and exit code 1, finished work kept), list options, and how a metrics file is printed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer


@contextmanager
def errors() -> Iterator[None]:
    """Known failures -> one line on stderr and exit code 1 (tracebacks only with COOPIPE_LOG=DEBUG)."""
    from coopipe.errors import CoopipeError

    try:
        yield
    except (CoopipeError, ValueError, FileNotFoundError) as exc:
        import logging

        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; re-run the same command to resume", err=True)
        raise typer.Exit(code=130) from None


@contextmanager
def os_errors() -> Iterator[None]:
    """File-system errors the library did not anticipate (loops, permissions) -> one line naming the file."""
    try:
        yield
    except OSError as exc:
        from coopipe.imageio import shown_path

        where = f" ({shown_path(exc.filename)})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}; finished chunks are kept, fix it and re-run", err=True)
        raise typer.Exit(code=1) from exc


def csv_list(values: tuple[object, ...]) -> str:
    return ",".join(str(v) for v in values)


def int_list(text: str | None) -> list[int]:
    if not text or text.strip().lower() == "all":
        return []
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def name_list(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.replace(" ", "").split(",") if x]


def check_classes(classes: str) -> None:
    from coopipe.transfer import CLASS_SUBSETS

    if classes not in CLASS_SUBSETS:
        raise typer.BadParameter(f"--classes must be one of {', '.join(CLASS_SUBSETS)}, got {classes!r}")


def note_random_weights(weights: object) -> None:
    """Say so whenever a result comes from random-weight features (they carry no class signal)."""
    if str(weights or "").startswith("random-init"):
        typer.echo("  note: random weights (pretrained=none): these numbers only check that the pipeline runs")


def print_metrics(m: dict[str, Any]) -> None:
    shots = f" {m['shots']}-shot" if m.get("shots") else ""
    seed = f" seed {m['seed']}" if m.get("seed") is not None else ""
    classes = f" ({m['classes']} classes)" if m.get("classes", "all") != "all" else ""
    source = f" (trained on {m['source_dataset']})" if m.get("source_dataset") else ""
    typer.echo(f"{m['method']} on {m.get('dataset')}{classes}{source}{shots}{seed}: accuracy {100 * m['accuracy']:.2f}%  "
               f"macro-F1 {100 * m['macro_f1']:.2f}%  (n={m['n']})")
    from coopipe.jobs.age_eval import describe_age_metrics

    for line in describe_age_metrics(m):
        typer.echo(line)
    note_random_weights(m.get("weights"))
    if m.get("incomplete"):
        typer.echo(f"  note: INCOMPLETE run (trained {m.get('epochs')} epochs, killed or diverged): not a result")
    worst = sorted((v, k) for k, v in m["per_class_accuracy"].items() if v is not None)[:3]
    if worst:
        typer.echo("  lowest per-class accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for v, k in worst))
