"""`coopipe export` (a run as a self-contained classifier folder) and `coopipe models` (which open_clip models the
exact prompt text path supports). Registered by :mod:`coopipe.cli`; the work is :mod:`coopipe.export` and
:mod:`coopipe.model_support`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coopipe.cli_common import errors


def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `coopipe train` (finished).")],
    out: Annotated[Path, typer.Argument(help="Folder to write the exported classifier into (new, empty, or an earlier export).")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Also write model.onnx: image tower + head (CoCoOp: + Meta-Net and text tower), preprocessed images -> class probabilities.")] = False,
    pretrained: Annotated[Optional[str], typer.Option(help="Where to load the weights from, if the run's local weights file moved (identity must match).")] = None,
) -> None:
    """Export a trained prompt: class weights and logit scale (safetensors), a record, a model card, optionally ONNX."""
    from coopipe.export import export_run

    with errors():
        result = export_run(run, out, onnx=onnx, pretrained=pretrained)
        typer.echo(f"exported {run} to {result.path}: {', '.join(result.files)}")


def models(
    name: Annotated[Optional[str], typer.Argument(help="Check one model name (an architecture, hf-hub:ORG/REPO or local-dir:PATH) instead of listing all.", show_default=False)] = None,
    all_tags: Annotated[bool, typer.Option("--tags/--no-tags", help="List every pretrained tag with the activation it loads with.")] = True,
    supported_only: Annotated[bool, typer.Option("--supported", help="Only the models the text path supports.")] = False,
) -> None:
    """The open_clip architectures, whether the exact prompt text path supports each (and why not), and the
    activation each pretrained tag was trained with (QuickGELU or GELU)."""
    from coopipe.model_support import list_supported
    from coopipe.models import describe_model

    if name is not None:
        with errors():
            typer.echo(describe_model(name))
        return
    entries = list_supported()
    shown = [e for e in entries if e.support.supported or not supported_only]
    for entry in shown:
        mark = "yes" if entry.support.supported else f"no: {entry.support.reason}"
        typer.echo(f"{entry.name:<36} {mark}")
        if all_tags:
            for tag, activation in entry.tags:
                typer.echo(f"    {tag:<40} {activation}")
    n_yes = sum(e.support.supported for e in entries)
    typer.echo(f"{n_yes} of {len(entries)} architectures supported; also hf-hub:ORG/REPO and local-dir:PATH names "
               f"(`coopipe models NAME` checks one from its open_clip_config.json)")
