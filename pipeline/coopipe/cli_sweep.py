"""`coopipe sweep`: datasets x methods x shots x seeds (and baselines, base/new, transfer targets) on dask.distributed.

The command is registered by :mod:`coopipe.cli`; the work is :mod:`coopipe.sweep`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coopipe.cli_common import csv_list, errors, int_list, name_list
from coopipe.config import EncodeConfig, FewShotConfig, ModelSpec, PathsConfig, SweepConfig


def sweep(
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", "--datasets", help="Dataset name(s), comma-separated or repeated.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="CoOp-style $DATA folder (not needed with --no-encode).")] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", "--methods", help="Method labels (coop, coop_csc_middle, coop_m8, cocoop, rank; all: every registered method that suits the dataset) or variant names of tokens joined by _ (coop, csc, end|middle|front, m<N>, init, age); default: coop, or the variant flags (age datasets: coop_age, cocoop, rank).")] = None,
    csc: Annotated[bool, typer.Option("--csc", help="One variant by flags: class-specific context.")] = False,
    position: Annotated[Optional[str], typer.Option("--position", "--class-token-position", help="One variant by flags: class token position end, middle, front.")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="One variant by flags: context length M.")] = None,
    ctx_init: Annotated[Optional[str], typer.Option(help="One variant by flags: context from words, e.g. 'a photo of a'.")] = None,
    shots: Annotated[str, typer.Option(help="Shots per class.")] = csv_list(FewShotConfig.shots),
    seeds: Annotated[str, typer.Option(help="Seeds.")] = csv_list(FewShotConfig.seeds),
    fewshot: Annotated[bool, typer.Option("--fewshot/--no-fewshot", help="CoOp runs on all classes.")] = True,
    zeroshot: Annotated[bool, typer.Option("--zeroshot/--no-zeroshot", help="Zero-shot CLIP (on every target too).")] = False,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Zero-shot with CLIP's 80 ImageNet templates.")] = False,
    linear_probe: Annotated[bool, typer.Option("--linear-probe/--no-linear-probe", help="Linear-probe CLIP.")] = False,
    ridge: Annotated[bool, typer.Option("--ridge/--no-ridge", help="Age datasets: the ridge-regression probe too.")] = False,
    base2new: Annotated[bool, typer.Option("--base2new/--no-base2new", help="CoCoOp's base-to-new runs (train on base, test base and new).")] = False,
    targets: Annotated[Optional[str], typer.Option(help="Transfer targets: every few-shot run is evaluated on their test splits.")] = None,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Leave out targets whose data is missing.")] = False,
    model: Annotated[str, typer.Option(help="open_clip model.")] = ModelSpec.name,
    pretrained: Annotated[str, typer.Option(help="open_clip tag, local file, or none (random weights).")] = ModelSpec.pretrained,
    views: Annotated[int, typer.Option(help="Augmented views per few-shot train image in the cache.")] = EncodeConfig.views,
    augment: Annotated[str, typer.Option(help="Augmentation of the cached views: coop (random resized crop + flip) or ordinalclip (resize 256, random crop 224, flip: OrdinalCLIP's).")] = EncodeConfig.augment,
    cache: Annotated[Path, typer.Option(help="Feature cache.")] = Path(PathsConfig.cache),
    runs: Annotated[Optional[Path], typer.Option(help="Runs folder (default runs; runs-ep<N> with --epochs N).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override CoOp's epochs for quick tries (results go to runs-ep<N>).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    train_args: Annotated[Optional[str], typer.Option(help="Extra `coopipe train` options, e.g. '--bf16 --batch-size 32'.")] = None,
    encode_shots: Annotated[Optional[str], typer.Option(help="Shots to encode for (default: the grid's plus the paper's up to the largest).")] = None,
    dataset_option: Annotated[Optional[list[str]], typer.Option("--dataset-option", help="A dataset builder option KEY=VALUE, repeatable (e.g. max_age=116 for ages up to 116).")] = None,
    encode_args: Annotated[Optional[str], typer.Option(help="Extra `coopipe encode` options, e.g. '--workers 4 --batch-size 128'.")] = None,
    encode: Annotated[bool, typer.Option("--encode/--no-encode", help="Encode the datasets with missing runs first.")] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write RUNS/report when a result changed.")] = True,
    jobs: Annotated[str, typer.Option("--jobs", "-j", help="Runs at once: auto (1-thread runs, up to 2 per core, 1 per 2 GiB) or N.")] = "auto",
    stack: Annotated[str, typer.Option("--stack", help="Train runs of one dataset and method (seeds, shots) stacked in one text pass: auto (on CUDA, and on the CPU when the text GEMMs run on oneDNN), on, off.")] = SweepConfig.stack,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (default: a LocalCluster); 'inline' runs one by one in this process.")] = None,
    retry_failed: Annotated[int, typer.Option("--retry-failed", help="Retry a failed run this many times within the sweep (a re-run retries too).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over runs.")] = True,
) -> None:
    """Plan datasets x variants x shots x seeds (plus baselines, base-to-new, transfer) and run every missing run.

    A run folder is the unit of idempotence (finished runs are skipped) and locking (flock on <run>.lock). Exit
    code 1 when a run failed, 2 for bad options or missing data, 130 when interrupted.
    """
    import logging
    import signal

    from tqdm.auto import tqdm

    from coopipe.datasets.base import parse_dataset_options
    from coopipe.errors import CoopipeError
    from coopipe.methods import MethodSpec
    from coopipe.sweep import RunResult, SweepSpec, parse_variant, plan_sweep, run_sweep
    from coopipe.sweep.options import encode_args as parse_encode_args, train_args as parse_train_args
    from coopipe.sweep.plan import ALL_METHODS, RunSettings

    try:
        if jobs != "auto" and not (jobs.isdigit() and int(jobs) > 0):
            raise typer.BadParameter(f"--jobs must be a positive integer or auto, got {jobs!r}")
        from coopipe.sweep.runner import resolve_stack

        resolve_stack(stack, device)  # a bad --stack fails here, before any work
        from coopipe.models import check_model_name

        check_model_name(model)  # an unknown or unsupported model too
        methods: tuple[MethodSpec, ...] | None = None  # each dataset's default (age datasets: AGE_METHODS)
        names = name_list([variants]) if variants else []
        all_methods = ALL_METHODS in names
        if names:
            methods = tuple(parse_variant(v) for v in names if v != ALL_METHODS)
        elif csc or position or n_ctx or ctx_init:
            methods = (MethodSpec.of("coop", csc=csc or None, class_token_position=position, n_ctx=n_ctx,
                                               ctx_init=ctx_init),)
        options = parse_train_args(train_args)
        settings = RunSettings(cache=str(cache), model=model, pretrained=pretrained, device=device,
                               epochs=epochs or options.pop("max_epoch", None), train_options=options, ensemble=ensemble)
        spec = SweepSpec(
            datasets=tuple(name_list(dataset)), data_root=str(data_root) if data_root else None, methods=methods,
            all_methods=all_methods,
            shots=tuple(int_list(shots)), seeds=tuple(int_list(seeds)), fewshot=fewshot, zeroshot=zeroshot,
            linear_probe=linear_probe, ridge=ridge, base2new=base2new, targets=tuple(name_list([targets] if targets else [])),
            skip_missing=skip_missing, views=views, augment=augment, encode_shots=tuple(int_list(encode_shots)), encode=encode,
            encode_options=parse_encode_args(encode_args), dataset_options=parse_dataset_options(dataset_option or []),
            runs=str(runs) if runs else None, settings=settings,
        )
        plan = plan_sweep(spec)
    except (CoopipeError, ValueError, typer.BadParameter) as exc:
        typer.echo(f"coopipe sweep: {exc}", err=True)
        raise typer.Exit(code=2) from None

    def show(r: RunResult) -> None:
        tqdm.write(f"[{r.status}] {r.label}  ({r.detail()})")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    logging.getLogger("distributed").setLevel(max(logging.ERROR, logging.getLogger().getEffectiveLevel()))
    outcome = run_sweep(plan, jobs=jobs if jobs == "auto" else int(jobs), scheduler=scheduler, retries=retry_failed,
                        progress=progress, on_result=show, stack=stack)
    if outcome.jobs:
        typer.echo(f"== {sum(r.status != 'skipped' for r in outcome.results)} run(s) ran "
                   f"{outcome.jobs} at a time, {outcome.threads} thread(s) each")
    typer.echo(f"== sweep: {len(outcome.results)} run(s) in {outcome.seconds:.0f}s: {outcome.count('done')} done, "
               f"{outcome.count('skipped')} already finished, {outcome.count('held')} held by another process, "
               f"{outcome.count('failed')} failed")
    held = [r for r in outcome.results if r.status == "held"]
    if held:
        typer.echo("   held by another process (re-run when it has finished to pick up what it left):")
        for r in held:
            typer.echo(f"     {r.label}")
    if outcome.failed:
        typer.echo("   failed (the sweep went on; re-run, or --retry-failed N, to retry them):")
        for r in outcome.failed:
            typer.echo(f"     {r.label}  ({r.detail()})")
    if outcome.interrupted:
        typer.echo(f"interrupted: {outcome.planned - len(outcome.results)} run(s) stopped or not started; finished runs "
                   "are kept, interrupted ones resume from their checkpoint on re-run", err=True)
        raise typer.Exit(code=130)
    status = 1 if outcome.failed else 0
    if report and Path(plan.runs_dir).is_dir():
        from coopipe.sweep.runner import report_is_current, write_reports

        if report_is_current(Path(plan.runs_dir)):
            typer.echo(f"== report {plan.runs_dir}/report is up to date")
        else:
            with errors():
                for line in write_reports(Path(plan.runs_dir)):
                    typer.echo(f"== {line}")
    raise typer.Exit(code=status)
