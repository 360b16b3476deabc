"""Pieces every command of the `coopipe` command line shares: the one error boundary (a known failure is one line
on stderr and exit code 1, finished work kept), list options, and how a metrics file is printed."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup


@contextmanager
def errors() -> Iterator[None]:
    """The one error boundary: known failures and operating-system errors -> one line on stderr naming the path
    and the fix, exit code 1 (tracebacks only with COOPIPE_LOG=DEBUG). Finished work is kept by the library (every
    write is atomic or resumable, temporary files are removed where they fail); this only reports."""
    from coopipe.errors import CoopipeError

    try:
        yield
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; re-run the same command to resume", err=True)
        raise typer.Exit(code=130) from None
    except (CoopipeError, ValueError, OSError, RuntimeError, RecursionError) as exc:
        import logging

        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        message = one_line(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=1) from exc


class NoNulArguments(TyperGroup):
    """The command line's top group: an argument holding a NUL byte (no path, option value or name can hold one; a
    script or a YAML ``"\\0"`` can pass it) is one line naming it, before any command sees it; os calls would
    otherwise fail later with a bare ``embedded null byte``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        bad = next((a for a in args if "\0" in a), None)
        if bad is not None:
            typer.echo(f"error: argument {bad!r} holds a NUL byte, which no path, option value or name can hold; "
                       f"retype it", err=True)
            raise typer.Exit(code=1)
        return super().parse_args(ctx, args)


def one_line(exc: BaseException) -> str | None:
    """The message of an error the boundary reports (``None``: a programming error, left as a traceback)."""
    from coopipe.errors import CoopipeError

    if isinstance(exc, CoopipeError | ValueError) or (isinstance(exc, FileNotFoundError) and not exc.filename):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_line(exc)
    if isinstance(exc, RecursionError):
        return f"input nested too deeply to read ({exc}); check the file the command reads"
    text = str(exc)
    if "DataLoader worker" in text:  # a killed or crashed decode worker (out of memory, signal)
        return (f"an image-decoding worker died ({text.splitlines()[0]}); finished chunks are kept: re-run the same "
                f"command, with --workers 0 if it happens again (out of memory?)")
    return None


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there and re-run the same command (finished work is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space there and re-run the same command (finished work is kept)",
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter name or folder",
    errno.EISDIR: "it is a folder: pass a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EACCES: "permission denied: fix the permissions of that path or choose another",
    errno.EPERM: "operation not permitted: fix the permissions of that path or choose another",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ELOOP: "too many symbolic links (a loop): fix the links",
    errno.ENOENT: "it does not exist: check the path",
    errno.EEXIST: "it exists already: remove it or choose another path",
}


def os_error_line(exc: OSError) -> str:
    """``<what> (<path>): <fix>`` for an operating-system error; the path with undecodable bytes escaped."""
    from coopipe.imageio import shown_path

    where = " and ".join(shown_path(f) for f in (exc.filename, exc.filename2) if f)
    fix = _OS_FIXES.get(exc.errno or 0, "fix it and re-run the same command (finished work is kept)")
    return f"{exc.strerror or exc}{f' ({where})' if where else ''}; {fix}"


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
    from coopipe.config import CLASS_SUBSETS

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
