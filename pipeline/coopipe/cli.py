"""The `coopipe` command line: a thin typer layer over the job functions in ``coopipe.jobs``.

Every option default is read from the library's config dataclasses (``coopipe.config``, ``EncodeOptions``,
``TrainConfig``), never written here: ``tests/test_defaults.py`` checks that they agree with params.yaml.

Every command validates its paths at the boundary, turns coopipe's errors into a one-line message on stderr
with exit code 1, and leaves the work to the stage scripts (which do the file I/O) and the library.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from coopipe.method import METHODS
from coopipe.config import EncodeConfig, FewShotConfig, InterpretConfig, ModelSpec, PathsConfig, ReportConfig
from coopipe.encode import EncodeOptions
from coopipe.jobs.train import CHECKPOINT_EVERY_S
from coopipe.train import TrainConfig

_ENC_OPTS = EncodeOptions()
_TRAIN = TrainConfig()
_CROP = ",".join(str(x) for x in EncodeConfig.crop_scale)

app = typer.Typer(
    name="coopipe",
    help="Prompt learning (CoOp) for CLIP models on cached image features: encode once, train many times.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect feature stores and move them to/from HDF5.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@contextmanager
def _errors() -> Iterator[None]:
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


def _csv(values: tuple[object, ...]) -> str:
    return ",".join(str(v) for v in values)


def _int_list(text: str | None) -> list[int]:
    if not text or text.strip().lower() == "all":
        return []
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.", envvar="COOPIPE_LOG")] = "INFO",
) -> None:
    from coopipe.logs import setup_logging

    setup_logging(log_level)


@app.command()
def encode(
    dataset: Annotated[str, typer.Option(help="Registered dataset name (see `coopipe datasets`).")],
    data_root: Annotated[Path, typer.Option(help="CoOp-style $DATA folder; for imagefolder the class folder; for manifest the file.")],
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "all",
    model: Annotated[str, typer.Option(help="open_clip model name: RN50, ViT-B-32, ViT-B-16, ...")] = ModelSpec.name,
    pretrained: Annotated[str, typer.Option(help="open_clip tag (downloads, e.g. openai), local checkpoint path, or none (random weights: only to check the pipeline runs).")] = ModelSpec.pretrained,
    views: Annotated[int, typer.Option(help="Augmented views per train image (random resized crop + flip) beside the centre view.")] = EncodeConfig.views,
    crop_scale: Annotated[str, typer.Option(help="Random-resized-crop scale range, 'lo,hi'.")] = _CROP,
    aug_seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = EncodeConfig.aug_seed,
    shots: Annotated[str, typer.Option(help="Few-shot K values: train/val encode only the images these draws use; 'all' encodes the whole splits.")] = _csv(FewShotConfig.shots),
    seeds: Annotated[str, typer.Option(help="Few-shot seeds (with --shots).")] = _csv(FewShotConfig.seeds),
    cache: Annotated[Path, typer.Option(help="Cache directory for feature stores.")] = Path(PathsConfig.cache),
    batch_size: Annotated[int, typer.Option(help="Model batch size (images x views).")] = _ENC_OPTS.batch_size,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = _ENC_OPTS.num_workers,
    precision: Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU computes bf16 natively, fp16 on older CUDA, else fp32; the resolved choice is logged and recorded in the store), bf16, fp16 or fp32.")] = _ENC_OPTS.precision,
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: float16 or float32.")] = _ENC_OPTS.dtype,
    chunk_rows: Annotated[int, typer.Option(help="Rows per zarr chunk (the resume granularity).")] = _ENC_OPTS.chunk_rows,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = _ENC_OPTS.device,
    on_bad_image: Annotated[str, typer.Option(help="fail: stop at an unreadable image; skip: skip it and write a report.")] = _ENC_OPTS.on_bad_image,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (default: in-process).")] = EncodeConfig.scheduler,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    confine_paths: Annotated[bool, typer.Option("--confine-paths", help="Refuse image paths in split files/manifests that resolve outside the data root (for untrusted lists).")] = EncodeConfig.confine_paths,
) -> None:
    """Encode a dataset's images once into chunked zarr feature stores under --cache."""
    from coopipe.encode import EncodeOptions
    from coopipe.jobs.encode import ALL_SPLITS, run_encode

    with _errors(), _os_errors():
        splits = ALL_SPLITS if split == "all" else (split,)
        if any(s not in ALL_SPLITS for s in splits):
            raise typer.BadParameter(f"--split must be train, val, test or all, got {split!r}")
        lo, hi = _crop_scale(crop_scale)
        if views < 0:  # refused before any store is created
            raise typer.BadParameter(f"must be >= 0 (augmented views per image), got {views}", param_hint="--views")
        results = run_encode(
            dataset=dataset, data_root=data_root, splits=splits, cache_dir=cache, model=model,
            pretrained=pretrained, views=views, crop_scale=(lo, hi), aug_seed=aug_seed, confine_paths=confine_paths,
            shots=(few := _int_list(shots)), seeds=_int_list(seeds) if few else [], scheduler=scheduler,
            options=EncodeOptions(
                batch_size=batch_size, num_workers=workers, dtype=dtype, precision=precision,
                chunk_rows=chunk_rows, on_bad_image=on_bad_image, device=device, progress=progress,
            ),
        )
        for r in results:
            state = "reused" if r.reused else f"encoded {r.encoded_rows} img in {r.seconds:.1f}s ({r.images_per_second:.1f} img/s)"
            typer.echo(f"{r.path}  [{r.n_rows} rows x {r.n_views} views] {state}")
            if r.skipped:
                typer.echo(f"  skipped {len(r.skipped)} unreadable image(s): see {r.path}.skipped.json", err=True)


def _crop_scale(text: str) -> tuple[float, float]:
    """``--crop-scale 'lo,hi'`` with 0 < lo <= hi <= 1, or a usage error naming the option."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two numbers 'lo,hi' such as {_CROP}, got {text!r}", param_hint="--crop-scale") from None
    if not 0 < lo <= hi <= 1:
        raise typer.BadParameter(f"needs 0 < lo <= hi <= 1, got {text!r}", param_hint="--crop-scale")
    return lo, hi


@contextmanager
def _os_errors() -> Iterator[None]:
    """File-system errors the library did not anticipate (loops, permissions) -> one line naming the file."""
    try:
        yield
    except OSError as exc:
        from coopipe.imageio import shown_path

        where = f" ({shown_path(exc.filename)})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}; finished chunks are kept, fix it and re-run", err=True)
        raise typer.Exit(code=1) from exc


@app.command()
def train(
    features: Annotated[Path, typer.Option(help="Cache directory holding the encoded stores (e.g. cache/).")],
    dataset: Annotated[str, typer.Option(help="Dataset name, as encoded.")],
    shots: Annotated[int, typer.Option(help="K images per class (1, 2, 4, 8, 16 in the paper).")],
    seed: Annotated[int, typer.Option(help="Few-shot draw and training seed (1, 2, 3 in the paper).")],
    out: Annotated[Path, typer.Option(help="Run folder for the checkpoint, classifier and history.")],
    method: Annotated[str, typer.Option(help="coop, cocoop (Meta-Net, image-conditional; its paper setting: M=4 from 'a photo of a', 10 epochs, batch 1) or rank (OrdinalCLIP rank prompts, age datasets).")] = _TRAIN.method,
    n_ctx: Annotated[Optional[int], typer.Option(help="Number of context tokens M (default: the method's paper setting, CoOp 16, CoCoOp 4 from words).")] = None,
    csc: Annotated[bool, typer.Option("--csc", help="Class-specific context (one context per class).")] = False,
    class_token_position: Annotated[str, typer.Option(help="end, middle or front.")] = _TRAIN.class_token_position,
    ctx_init: Annotated[Optional[str], typer.Option(help="Initialise the context from words, e.g. 'a photo of a' (sets M; default: the method's paper setting).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--max-epoch", "--epochs", help="Epochs (default: the paper's; CoOp 50/100/100/200/200 by shots, ImageNet 50; CoCoOp 10).")] = None,
    lr: Annotated[float, typer.Option(help="SGD learning rate (cosine decay per epoch, first epoch at 1e-5).")] = _TRAIN.lr,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: the method's paper setting, CoOp 32, CoCoOp 1; CoCoOp above 1 departs from the paper).")] = None,
    views: Annotated[str, typer.Option(help="augmented: one cached augmented view per image per epoch; center; all.")] = _TRAIN.views,
    bf16: Annotated[bool, typer.Option("--bf16", help="Run the text transformer under bf16 autocast.")] = False,
    class_chunk: Annotated[Optional[int], typer.Option(help="Encode classes in chunks of this size (large K).")] = _TRAIN.class_chunk,
    classes: Annotated[str, typer.Option(help="all, or base/new: train on the first ceil(K/2) sorted classes or the rest (CoCoOp's base-to-new).")] = "all",
    model: Annotated[Optional[str], typer.Option(help="Model (default: the one the features were encoded with).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights (default: inferred from the features; a path for local files).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between resume checkpoints (0: every epoch).")] = CHECKPOINT_EVERY_S,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a CoOp prompt on cached features (only the context moves; the image encoder never runs)."""
    from coopipe.jobs.train import run_train

    with _errors():
        if method not in METHODS:
            raise typer.BadParameter(f"unknown --method {method!r}; available: {', '.join(METHODS)}")
        _check_classes(classes)
        overrides = {
            "n_ctx": n_ctx, "csc": csc, "class_token_position": class_token_position, "ctx_init": ctx_init,
            "max_epoch": epochs, "lr": lr, "batch_size": batch_size, "views": views, "autocast_bf16": bf16,
            "class_chunk": class_chunk, "method": method,
        }
        summary = run_train(cache_dir=features, dataset=dataset, shots=shots, seed=seed, out_dir=out, model=model,
                            pretrained=pretrained, overrides=overrides, device=device, progress=progress,
                            classes=classes, checkpoint_every=checkpoint_every)
        state = "already complete (skipped)" if summary["skipped"] else f"trained in {summary['train_seconds']:.1f}s"
        val = summary.get("final_val_acc")
        typer.echo(f"{out}: {summary['method']} {shots}-shot seed {seed} {state}; final loss {summary['final_loss']:.4f}"
                   + (f", val acc {100 * val:.2f}%" if val is not None else ""))
        _note_random_weights(summary.get("weights"))


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder (or its prompt.json) written by `coopipe train`.")],
    features: Annotated[Path, typer.Option(help="Cache directory.")] = Path(PathsConfig.cache),
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the one the prompt was trained on).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    store: Annotated[Optional[Path], typer.Option(help="Evaluate on this store instead (must match model and classes).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Metrics JSON path (default: RUN/metrics.json, RUN/metrics_<classes>.json, RUN/transfer/<dataset>/metrics.json).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="all, base or new (default: the classes the run was trained on; all on another dataset).")] = None,
    transfer: Annotated[bool, typer.Option("--transfer", help="Evaluate on another dataset's classes: build the classifier from the learned context with the store's class names.")] = False,
    pretrained: Annotated[Optional[str], typer.Option(help="Where to load the weights for the text encoder (only needed for a checkpoint trained on local-file weights).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (text encoder, when the class list differs).")] = "cpu",
) -> None:
    """Evaluate a trained prompt on cached features: accuracy, macro-F1, per-class accuracy.

    --classes base|new (base-to-new) and --dataset D --transfer (cross-dataset) use other class names.

    Then the classifier is built from the learned context with those names (unified context only).
    """
    from coopipe.jobs.evaluate import run_eval

    with _errors():
        if classes is not None:
            _check_classes(classes)
        _print_metrics(run_eval(run, cache_dir=features, dataset=dataset, store=store, split=split, out=out,
                                classes=classes, transfer=transfer, pretrained=pretrained, device=device))


@app.command()
def zeroshot(
    features: Annotated[Path, typer.Option(help="Cache directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Prompt ensembling over CLIP's 80 ImageNet templates.")] = False,
    template: Annotated[Optional[list[str]], typer.Option(help="Custom template(s) with {} for the class name; repeatable.")] = None,
    classes: Annotated[str, typer.Option(help="all, base or new (base-to-new protocol; writes metrics_<classes>.json).")] = "all",
    out: Annotated[Optional[Path], typer.Option(help="Output folder for metrics.json (default: runs/<dataset>/zeroshot).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model (default: inferred from the features).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights (default: inferred).")] = None,
) -> None:
    """Zero-shot CLIP with the dataset's hand-crafted prompt (or an ensemble) on the cached test features."""
    from coopipe.jobs.evaluate import run_zeroshot

    with _errors():
        _check_classes(classes)
        folder = out or Path(PathsConfig.runs) / dataset / ("zeroshot_ensemble" if ensemble else "zeroshot")
        _print_metrics(run_zeroshot(cache_dir=features, dataset=dataset, out_dir=folder, model=model,
                                    pretrained=pretrained, ensemble=ensemble, templates=template, classes=classes))


@app.command("linear-probe")
def linear_probe(
    features: Annotated[Path, typer.Option(help="Cache directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    shots: Annotated[int, typer.Option(help="K images per class.")],
    seed: Annotated[int, typer.Option(help="Few-shot seed.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default runs/<dataset>/linear_probe/shotsK_seedS).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model (default: inferred from the features).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights (default: inferred).")] = None,
) -> None:
    """Linear probe (logistic regression, C searched on the few-shot validation split) on cached features."""
    from coopipe.lookup import run_name
    from coopipe.jobs.evaluate import run_linear_probe

    with _errors():
        folder = out or Path(PathsConfig.runs) / dataset / "linear_probe" / run_name(shots, seed)
        _print_metrics(run_linear_probe(cache_dir=features, dataset=dataset, shots=shots, seed=seed,
                                        out_dir=folder, model=model, pretrained=pretrained))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `coopipe train` (holds classifier.safetensors).")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files, folders (recursive) or CSV/JSON manifests with a 'path' column.", show_default=False)] = None,
    topk: Annotated[int, typer.Option(help="Classes shown per image.")] = 5,
    out: Annotated[Optional[Path], typer.Option(help="Write the predictions to a .csv or .json file instead of printing them.")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Predict the images of this cache store (*.zarr) from its features; no model is loaded.")] = None,
    batch_size: Annotated[int, typer.Option(help="Model batch size.")] = _ENC_OPTS.batch_size,
    workers: Annotated[int, typer.Option(help="Decoding worker processes (0: in the main process).")] = 0,
    precision: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: the precision of the run's features).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = _ENC_OPTS.device,
    on_bad_image: Annotated[str, typer.Option(help="fail: stop at an unreadable image; skip: warn and leave it out.")] = _ENC_OPTS.on_bad_image,
    pretrained: Annotated[Optional[str], typer.Option(help="Where to load the weights from, if the run's local weights file moved (identity must match).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (for more images than one batch).")] = True,
) -> None:
    """Classify images with a trained prompt: top-k classes with probabilities (softmax of CLIP's logits)."""
    from coopipe.predict import predict as run_predict
    from coopipe.predict import write_predictions

    with _errors():
        if topk < 1:
            raise typer.BadParameter(f"--topk must be >= 1, got {topk}")
        if not images and store is None:
            raise typer.BadParameter("give image files, folders or a manifest, or --store PATH")
        if out is not None and out.suffix.lower() not in (".csv", ".json"):
            raise typer.BadParameter(f"--out must end in .csv or .json, got {out}")
        predictions = run_predict(run, images or [], topk=topk, store=store, batch_size=batch_size,
                                  num_workers=workers, precision=precision, device=device,
                                  on_bad_image=on_bad_image, pretrained=pretrained, progress=progress)
        if out is not None:
            write_predictions(predictions, out, run=run)
            typer.echo(f"wrote {len(predictions)} prediction(s) to {out}", err=True)
            return
        for p in predictions:
            typer.echo(f"{p.path}\t" + "\t".join(f"{label} {100 * prob:.1f}%" for label, prob in zip(p.labels, p.probs)))


def _check_classes(classes: str) -> None:
    from coopipe.transfer import CLASS_SUBSETS

    if classes not in CLASS_SUBSETS:
        raise typer.BadParameter(f"--classes must be one of {', '.join(CLASS_SUBSETS)}, got {classes!r}")


@app.command()
def report(
    runs: Annotated[Path, typer.Argument(help="Runs folder to summarise (every metrics*.json below it).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUNS/report).")] = None,
    gain_method: Annotated[str, typer.Option(help="Method compared with zero-shot CLIP in the gain figure.")] = ReportConfig.gain_method,
    gain_shots: Annotated[Optional[int], typer.Option(help="Shots of that method in the gain figure (default: the most available).")] = ReportConfig.gain_shots,
) -> None:
    """Tables (mean ± std over seeds, Markdown + CSV) and the paper's figures from finished runs.

    Writes report.md, report.csv, fig3_accuracy_vs_shots.png, fig4_gain_over_zeroshot.png and summary.json.
    """
    from coopipe.jobs.age_report import find_age_metrics, run_age_report
    from coopipe.jobs.report import run_report

    with _errors():
        if not runs.is_dir():
            raise FileNotFoundError(f"no runs folder at {runs}; run `coopipe train`/`eval` or scripts/paper_grid.sh first")
        summary = run_report(runs, out_dir=out, gain_method=gain_method, gain_shots=gain_shots)
        typer.echo(f"{summary['n_records']} result(s) from {runs}: {len(summary['fewshot'])} few-shot cell(s), "
                   f"{len(summary['base2new'])} base-to-new row(s), {len(summary['transfer'])} transfer cell(s)")
        for name in summary["files"].values():
            typer.echo(f"  wrote {name}")
        if find_age_metrics(runs, exclude=[out or runs / "report"]):  # age runs: the MAE table and figures too
            for dataset, age in run_age_report(runs).items():
                typer.echo(f"  age estimation ({dataset}, {age['runs']} runs): wrote {runs / 'age_report'}")


@app.command()
def ridge(
    features: Annotated[Path, typer.Option(help="Cache directory.")],
    dataset: Annotated[str, typer.Option(help="An age dataset (utkface, morph, agemanifest).")],
    shots: Annotated[int, typer.Option(help="K images per age.")],
    seed: Annotated[int, typer.Option(help="Few-shot seed.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default runs/<dataset>/ridge/shotsK_seedS).")] = None,
) -> None:
    """Ridge regression of age on the cached features (alpha chosen on validation): the plain age baseline."""
    from coopipe.jobs.age_eval import run_ridge_probe
    from coopipe.lookup import run_name

    with _errors():
        folder = out or Path(PathsConfig.runs) / dataset / "ridge" / run_name(shots, seed)
        _print_metrics(run_ridge_probe(cache_dir=features, dataset=dataset, shots=shots, seed=seed, out_dir=folder))


def _note_random_weights(weights: object) -> None:
    """Say so whenever a result comes from random-weight features (they carry no class signal)."""
    if str(weights or "").startswith("random-init"):
        typer.echo("  note: random weights (pretrained=none): these numbers only check that the pipeline runs")


def _print_metrics(m: dict[str, Any]) -> None:
    shots = f" {m['shots']}-shot" if m.get("shots") else ""
    seed = f" seed {m['seed']}" if m.get("seed") is not None else ""
    classes = f" ({m['classes']} classes)" if m.get("classes", "all") != "all" else ""
    source = f" (trained on {m['source_dataset']})" if m.get("source_dataset") else ""
    typer.echo(f"{m['method']} on {m.get('dataset')}{classes}{source}{shots}{seed}: accuracy {100 * m['accuracy']:.2f}%  "
               f"macro-F1 {100 * m['macro_f1']:.2f}%  (n={m['n']})")
    from coopipe.jobs.age_eval import describe_age_metrics

    for line in describe_age_metrics(m):
        typer.echo(line)
    _note_random_weights(m.get("weights"))
    worst = sorted((v, k) for k, v in m["per_class_accuracy"].items() if v is not None)[:3]
    if worst:
        typer.echo("  lowest per-class accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for v, k in worst))



def _name_list(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.replace(" ", "").split(",") if x]


@app.command()
def sweep(
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", "--datasets", help="Dataset name(s), comma-separated or repeated.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="CoOp-style $DATA folder (not needed with --no-encode).")] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", "--methods", help="Method labels (coop, coop_csc_middle, coop_m8, cocoop, rank) or variant names of tokens joined by _ (coop, csc, end|middle|front, m<N>, init, age); default: coop, or the variant flags (age datasets: coop_age, cocoop, rank).")] = None,
    csc: Annotated[bool, typer.Option("--csc", help="One variant by flags: class-specific context.")] = False,
    position: Annotated[Optional[str], typer.Option("--position", "--class-token-position", help="One variant by flags: class token position end, middle, front.")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="One variant by flags: context length M.")] = None,
    ctx_init: Annotated[Optional[str], typer.Option(help="One variant by flags: context from words, e.g. 'a photo of a'.")] = None,
    shots: Annotated[str, typer.Option(help="Shots per class.")] = _csv(FewShotConfig.shots),
    seeds: Annotated[str, typer.Option(help="Seeds.")] = _csv(FewShotConfig.seeds),
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
    cache: Annotated[Path, typer.Option(help="Feature cache.")] = Path(PathsConfig.cache),
    runs: Annotated[Optional[Path], typer.Option(help="Runs folder (default runs; runs-ep<N> with --epochs N).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override CoOp's epochs for quick tries (results go to runs-ep<N>).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    train_args: Annotated[Optional[str], typer.Option(help="Extra `coopipe train` options, e.g. '--bf16 --batch-size 32'.")] = None,
    encode_shots: Annotated[Optional[str], typer.Option(help="Shots to encode for (default: the grid's plus the paper's up to the largest).")] = None,
    encode_args: Annotated[Optional[str], typer.Option(help="Extra `coopipe encode` options, e.g. '--workers 4 --batch-size 128'.")] = None,
    encode: Annotated[bool, typer.Option("--encode/--no-encode", help="Encode the datasets with missing runs first.")] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write RUNS/report when a result changed.")] = True,
    jobs: Annotated[str, typer.Option("--jobs", "-j", help="Runs at once: auto (1-thread runs, up to 2 per core, 1 per 2 GiB) or N.")] = "auto",
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

    from coopipe.errors import CoopipeError
    from coopipe.method import MethodSpec
    from coopipe.sweep import RunResult, SweepSpec, parse_variant, plan_sweep, run_sweep
    from coopipe.sweep.options import encode_args as parse_encode_args, train_args as parse_train_args
    from coopipe.sweep.plan import RunSettings

    try:
        if jobs != "auto" and not (jobs.isdigit() and int(jobs) > 0):
            raise typer.BadParameter(f"--jobs must be a positive integer or auto, got {jobs!r}")
        methods: tuple[MethodSpec, ...] | None = None  # each dataset's default (age datasets: AGE_METHODS)
        if variants:
            methods = tuple(parse_variant(v) for v in _name_list([variants]))
        elif csc or position or n_ctx or ctx_init:
            methods = (MethodSpec.from_options("coop", csc=csc or None, class_token_position=position, n_ctx=n_ctx,
                                               ctx_init=ctx_init),)
        options = parse_train_args(train_args)
        settings = RunSettings(cache=str(cache), model=model, pretrained=pretrained, device=device,
                               epochs=epochs or options.pop("max_epoch", None), train_options=options, ensemble=ensemble)
        spec = SweepSpec(
            datasets=tuple(_name_list(dataset)), data_root=str(data_root) if data_root else None, methods=methods,
            shots=tuple(_int_list(shots)), seeds=tuple(_int_list(seeds)), fewshot=fewshot, zeroshot=zeroshot,
            linear_probe=linear_probe, ridge=ridge, base2new=base2new, targets=tuple(_name_list([targets] if targets else [])),
            skip_missing=skip_missing, views=views, encode_shots=tuple(_int_list(encode_shots)), encode=encode,
            encode_options=parse_encode_args(encode_args), runs=str(runs) if runs else None, settings=settings,
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
                        progress=progress, on_result=show)
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
            with _errors():
                for line in write_reports(Path(plan.runs_dir)):
                    typer.echo(f"== {line}")
    raise typer.Exit(code=status)

@app.command()
def datasets() -> None:
    """List the registered datasets and where each expects its files."""
    from coopipe.datasets import default_registry

    for info in default_registry().infos():
        typer.echo(f"{info.name:<16} {info.description}")


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="A store directory (*.zarr) or a cache folder to list.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a store's provenance and shape (or list the stores under a folder, and any partial ones)."""
    from coopipe.encode import describe_store
    from coopipe.store import find_partials, open_store

    with _errors():
        stores = [path] if path.suffix == ".zarr" else sorted(path.rglob("*.zarr"))
        partials = [] if path.suffix == ".zarr" else find_partials(path)
        if not stores and not partials:
            raise FileNotFoundError(f"no *.zarr store at or under {path}; run `coopipe encode` first")
        infos = [describe_store(open_store(p)) for p in stores]
        if as_json:
            payload: Any = infos if len(infos) > 1 or partials else (infos[0] if infos else [])
            if partials:
                payload = {"stores": infos, "partial": [str(p) for p in partials]}
            typer.echo(json.dumps(payload, indent=1))
            return
        for info in infos:
            prov = info["provenance"]
            typer.echo(f"{info['path']}")
            typer.echo(f"  shape {tuple(info['shape'])} {info['dtype']}, chunks {tuple(info['chunks'])}, valid rows {info['n_valid']}")
            typer.echo(f"  dataset {prov['dataset']}/{prov['split']} ({len(prov['classnames'])} classes), rows {json.dumps(prov['rows'])}")
            typer.echo(f"  model {prov['model']}  weights {prov['weights']}  precision {prov['precision']}")
            typer.echo(f"  views {json.dumps(prov['views'])}")
            typer.echo(f"  preprocess {json.dumps(prov['preprocess'])}")
            typer.echo(f"  file list sha256 {prov['file_list_sha256'][:16]}…  coopipe {prov['coopipe_version']}  open_clip {prov['open_clip_version']}")
        for partial in partials:
            typer.echo(f"{partial}  [partial: an interrupted encode; re-run it to resume, or `coopipe cache clean {path}`]")


@cache_app.command("clean")
def cache_clean(
    path: Annotated[Path, typer.Argument(help="Cache folder whose partial (*.zarr.partial) stores to remove.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
) -> None:
    """Remove the partial stores that interrupted encodes left under a cache folder (complete ones are kept)."""
    import shutil

    from coopipe.store import find_partials, store_lock

    with _errors():
        partials = find_partials(path)
        if not partials:
            typer.echo(f"no partial stores under {path}")
            return
        for partial in partials:
            typer.echo(f"  {partial}")
        if not yes and not typer.confirm(f"remove these {len(partials)} partial store(s)?", default=False):
            raise typer.Exit(code=1)
        for partial in partials:
            with store_lock(partial.with_name(partial.name.removesuffix(".partial"))):  # never under a running encode
                shutil.rmtree(partial)
        typer.echo(f"removed {len(partials)} partial store(s)")


@cache_app.command("verify")
def cache_verify(
    path: Annotated[Path, typer.Argument(help="A store directory (*.zarr) or a cache folder.")],
) -> None:
    """Check every chunk of every store against the checksums recorded when it was written."""
    from coopipe.errors import StoreError
    from coopipe.store import open_store

    with _errors():
        stores = [path] if path.suffix == ".zarr" else sorted(path.rglob("*.zarr"))
        if not stores:
            raise FileNotFoundError(f"no *.zarr store at or under {path}; run `coopipe encode` first")
        bad = 0
        for store in stores:
            try:
                open_store(store, checksums=True)
                typer.echo(f"ok       {store}")
            except StoreError as exc:
                bad += 1
                typer.echo(f"DAMAGED  {exc}")
        if bad:
            typer.echo(f"error: {bad} of {len(stores)} store(s) damaged", err=True)
            raise typer.Exit(code=1)


@cache_app.command("export")
def cache_export(
    store: Annotated[Path, typer.Argument(help="Store directory (*.zarr).")],
    out: Annotated[Path, typer.Argument(help="HDF5 file to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Export a store to HDF5 (features, labels, ids, provenance attributes)."""
    from coopipe.hdf5io import export_hdf5
    from coopipe.store import open_store

    with _errors():
        typer.echo(str(export_hdf5(open_store(store), out, overwrite=overwrite)))


@cache_app.command("import")
def cache_import(
    src: Annotated[Path, typer.Argument(help="HDF5 file written by `coopipe cache export`.")],
    cache: Annotated[Path, typer.Option(help="Cache directory.")] = Path(PathsConfig.cache),
) -> None:
    """Import an exported HDF5 file back into a zarr store under --cache."""
    from coopipe.hdf5io import import_hdf5

    with _errors():
        typer.echo(str(import_hdf5(src, cache)))


@app.command()
def interpret(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `coopipe train`.")],
    topk: Annotated[int, typer.Option(help="Nearest vocabulary tokens shown per context vector.")] = InterpretConfig.topk,
    metric: Annotated[str, typer.Option(help="l2 (Euclidean, as in CoOp) or cosine.")] = InterpretConfig.metric,
    cache: Annotated[Path, typer.Option(help="Cache directory: vocabulary indexes (<cache>/vocab) and test stores.")] = Path(PathsConfig.cache),
    test_store: Annotated[Optional[Path], typer.Option(help="Test store for the accuracy (default: the test store of the checkpoint's dataset, model and weights under --cache).")] = None,
    accuracy: Annotated[bool, typer.Option(help="Measure the test accuracy of the learned and the nearest-word prompt when a test store is found.")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full result as JSON here.")] = None,
    tsv_out: Annotated[Optional[Path], typer.Option("--tsv", help="Also write the neighbours as TSV here.")] = None,
    max_classes: Annotated[Optional[int], typer.Option(help="Print at most this many classes of a class-specific context (files hold all).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Where to load the checkpoint's weights from, if not where it records (identity must match).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (text encoder for the accuracy).")] = "cpu",
) -> None:
    """Read a learned prompt as words: the nearest vocabulary tokens of each context vector (FAISS, exact)."""
    from coopipe.errors import MissingFileError
    from coopipe.interpret import METRICS, format_table
    from coopipe.jobs.interpret import run_interpret

    with _errors():
        if metric not in METRICS:
            raise typer.BadParameter(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if topk < 1:
            raise typer.BadParameter(f"--topk must be >= 1, got {topk}")
        if not checkpoint.exists():
            raise MissingFileError(f"no checkpoint at {checkpoint}; train one with `coopipe train`")
        if test_store is not None and not test_store.exists():
            raise MissingFileError(f"no test store at {test_store}; see `coopipe cache info {cache}`")
        result = run_interpret(
            checkpoint=checkpoint, cache_dir=cache, topk=topk, metric=metric, test_store=test_store,
            accuracy=(True if test_store is not None else None) if accuracy else False, device=device,
            pretrained=pretrained, json_out=json_out, tsv_out=tsv_out,
        )
        typer.echo(format_table(result, max_classes=max_classes))
        for path in (json_out, tsv_out):
            if path is not None:
                typer.echo(f"wrote {path}", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
