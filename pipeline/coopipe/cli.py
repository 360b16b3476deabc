"""The `coopipe` command line: a thin typer layer over the job functions in ``coopipe.jobs``.

Every option default is read from the library's config dataclasses (``coopipe.config``, ``EncodeOptions``,
``TrainConfig``), never written here: ``tests/test_defaults.py`` checks that they agree with params.yaml.

Every command validates its paths at the boundary, turns coopipe's errors into a one-line message on stderr
with exit code 1, and leaves the work to the stage scripts (which do the file I/O) and the library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coopipe.cli_cache import cache_app
from coopipe.cli_export import export, models
from coopipe.cli_common import (
    NoNulArguments,
    check_classes,
    csv_list,
    errors,
    int_list,
    note_random_weights,
    print_metrics,
)
from coopipe.cli_sweep import sweep

from coopipe.methods import method_names
from coopipe.config import EncodeConfig, FewShotConfig, InterpretConfig, ModelSpec, PathsConfig, ReportConfig
from coopipe.encode import EncodeOptions
from coopipe.jobs.train import CHECKPOINT_EVERY_S
from coopipe.train_config import TrainConfig

_ENC_OPTS = EncodeOptions()
_TRAIN = TrainConfig()
_CROP = ",".join(str(x) for x in EncodeConfig.crop_scale)

app = typer.Typer(
    name="coopipe",
    help="Prompt learning (CoOp, CoCoOp, rank prompts) for CLIP models on cached image features: encode once, train many times.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=NoNulArguments,
)


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
    model: Annotated[str, typer.Option(help="open_clip model name (RN50, ViT-B-32, ViT-B-16, ...: see `coopipe models`), hf-hub:ORG/REPO or local-dir:PATH (a folder saved by open_clip's save_for_hf).")] = ModelSpec.name,
    pretrained: Annotated[str, typer.Option(help="open_clip tag (downloads, e.g. openai; built with the activation the tag was trained with: QuickGELU for openai), local checkpoint file (the model name decides the activation: ViT-B-32-quickgelu for OpenAI's weights), or none (random weights: only to check the pipeline runs). hf-hub: and local-dir: models bring their own weights (any value but none).")] = ModelSpec.pretrained,
    views: Annotated[int, typer.Option(help="Augmented views per train image (random resized crop + flip) beside the centre view.")] = EncodeConfig.views,
    crop_scale: Annotated[str, typer.Option(help="Random-resized-crop scale range, 'lo,hi'.")] = _CROP,
    aug_seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = EncodeConfig.aug_seed,
    augment: Annotated[str, typer.Option(help="Augmentation of the views: coop (random resized crop + flip, CoOp's) or ordinalclip (resize to 256x256, random 224 crop, flip: OrdinalCLIP's, the age datasets' paper setting). Recorded in the store; another augmentation is another store.")] = EncodeConfig.augment,
    shots: Annotated[str, typer.Option(help="Few-shot K values: train/val encode only the images these draws use; 'all' encodes the whole splits.")] = csv_list(FewShotConfig.shots),
    seeds: Annotated[str, typer.Option(help="Few-shot seeds (with --shots).")] = csv_list(FewShotConfig.seeds),
    cache: Annotated[Path, typer.Option(help="Cache directory for feature stores.")] = Path(PathsConfig.cache),
    batch_size: Annotated[int, typer.Option(help="Model batch size (images x views).")] = _ENC_OPTS.batch_size,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = _ENC_OPTS.num_workers,
    precision: Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU computes bf16 natively, fp16 on older CUDA, else fp32; the resolved choice is logged and recorded in the store), bf16, fp16 or fp32.")] = _ENC_OPTS.precision,
    engine: Annotated[str, typer.Option(help="Image-tower engine: auto (ONNX Runtime for fp32 on the CPU where `pip install 'coopipe\\[onnx]'` put it, else eager; the engine that ran is recorded in the store), eager or onnxruntime.")] = _ENC_OPTS.engine,
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: float16 or float32.")] = _ENC_OPTS.dtype,
    chunk_rows: Annotated[int, typer.Option(help="Rows per zarr chunk (the resume granularity).")] = _ENC_OPTS.chunk_rows,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = _ENC_OPTS.device,
    on_bad_image: Annotated[str, typer.Option(help="fail: stop at an unreadable image; skip: skip it and write a report.")] = _ENC_OPTS.on_bad_image,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (default: in-process).")] = EncodeConfig.scheduler,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    dataset_option: Annotated[Optional[list[str]], typer.Option("--dataset-option", help="A dataset builder option KEY=VALUE, repeatable: an age dataset's rank range (min_age=1, max_age=116), split file, split ratios and seed, prompt template.")] = None,
    confine_paths: Annotated[bool, typer.Option("--confine-paths", help="Refuse image paths in split files/manifests that resolve outside the data root (for untrusted lists).")] = EncodeConfig.confine_paths,
) -> None:
    """Encode a dataset's images once into chunked zarr feature stores under --cache."""
    from coopipe.datasets.base import parse_dataset_options
    from coopipe.encode import EncodeOptions
    from coopipe.jobs.encode import ALL_SPLITS, run_encode

    with errors():
        splits = ALL_SPLITS if split == "all" else (split,)
        if any(s not in ALL_SPLITS for s in splits):
            raise typer.BadParameter(f"--split must be train, val, test or all, got {split!r}")
        lo, hi = _crop_scale(crop_scale)
        if views < 0:  # refused before any store is created
            raise typer.BadParameter(f"must be >= 0 (augmented views per image), got {views}", param_hint="--views")
        results = run_encode(
            dataset=dataset, data_root=data_root, splits=splits, cache_dir=cache, model=model,
            pretrained=pretrained, views=views, crop_scale=(lo, hi), aug_seed=aug_seed, augment=augment,
            confine_paths=confine_paths,
            shots=(few := int_list(shots)), seeds=int_list(seeds) if few else [], scheduler=scheduler,
            dataset_options=parse_dataset_options(dataset_option or []),
            options=EncodeOptions(
                batch_size=batch_size, num_workers=workers, dtype=dtype, precision=precision, engine=engine,
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


@app.command()
def train(
    features: Annotated[Path, typer.Option(help="Cache directory holding the encoded stores (e.g. cache/).")],
    dataset: Annotated[str, typer.Option(help="Dataset name, as encoded.")],
    shots: Annotated[int, typer.Option(help="K images per class (1, 2, 4, 8, 16 in the paper).")],
    seed: Annotated[int, typer.Option(help="Few-shot draw and training seed (1, 2, 3 in the paper).")],
    out: Annotated[Path, typer.Option(help="Run folder for the checkpoint, classifier and history.")],
    method: Annotated[str, typer.Option(help=f"A registered method ({', '.join(method_names())}: coop; cocoop, Meta-Net, image-conditional, its paper setting M=4 from 'a photo of a', 10 epochs, batch 1; rank, OrdinalCLIP rank prompts for age datasets, its paper setting the context from 'age estimation: the age of the person is', RAdam 1e-4, 100 epochs; ordcoop, OrdinalCLIP's CoOp row: learned rank names, CE + KL; kgcoop, prograd, taskres, clipadapter, tipadapter, tipadapterf, lpp, clap: see docs/usage.md), or a method label such as coop_csc_middle or rank_b5.")] = _TRAIN.method.method,
    n_ctx: Annotated[Optional[int], typer.Option(help="Number of context tokens M (default: the method's paper setting, CoOp 16, CoCoOp 4 from words).")] = None,
    csc: Annotated[Optional[bool], typer.Option("--csc", help="Class-specific context (one context per class; CoOp).")] = None,
    class_token_position: Annotated[Optional[str], typer.Option(help="end, middle or front (CoOp; default: end).")] = None,
    ctx_init: Annotated[Optional[str], typer.Option(help="Initialise the context from words, e.g. 'a photo of a' (sets M; default: the method's paper setting).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--max-epoch", "--epochs", help="Epochs (default: the paper's; CoOp 50/100/100/200/200 by shots, ImageNet 50; CoCoOp 10).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate, cosine decay per epoch (default: the method's paper setting: CoOp and CoCoOp SGD 0.002 after one warm-up epoch at 1e-5; rank and ordcoop RAdam 1e-4, no warm-up; Tip-Adapter-F 0.001; CLAP 0.1; LP++ sets its own step sizes).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: the method's paper setting, CoOp 32, CoCoOp 1; CoCoOp above 1 departs from the paper).")] = None,
    views: Annotated[str, typer.Option(help="augmented: one cached augmented view per image per epoch; center; all.")] = _TRAIN.views,
    bf16: Annotated[bool, typer.Option("--bf16", help="Run the text transformer under bf16 autocast.")] = False,
    class_chunk: Annotated[Optional[int], typer.Option(help="Encode classes in chunks of this size (large K).")] = _TRAIN.class_chunk,
    select_every: Annotated[int, typer.Option(help="Model selection: 0 keeps the last epoch (the papers' CoOp protocol); N scores the few-shot validation split every N epochs and after the last, and keeps the epoch of best validation accuracy (never the test split). A departure the metrics list.")] = _TRAIN.select_every,
    classes: Annotated[str, typer.Option(help="all, or base/new: train on the first ceil(K/2) sorted classes or the rest (CoCoOp's base-to-new).")] = "all",
    model: Annotated[Optional[str], typer.Option(help="Model (default: the one the features were encoded with).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights (default: inferred from the features; a path for local files).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between resume checkpoints (0: every epoch).")] = CHECKPOINT_EVERY_S,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a prompt (CoOp, CoCoOp or rank prompts) on cached features: only the prompt moves, the image encoder never runs."""
    from coopipe.jobs.train import run_train

    with errors():
        check_classes(classes)
        overrides = {
            "n_ctx": n_ctx, "csc": csc, "class_token_position": class_token_position, "ctx_init": ctx_init,
            "max_epoch": epochs, "lr": lr, "batch_size": batch_size, "views": views, "autocast_bf16": bf16,
            "class_chunk": class_chunk, "method": method, "select_every": select_every,
        }
        summary = run_train(cache_dir=features, dataset=dataset, shots=shots, seed=seed, out_dir=out, model=model,
                            pretrained=pretrained, overrides=overrides, device=device, progress=progress,
                            classes=classes, checkpoint_every=checkpoint_every)
        state = "already complete (skipped)" if summary["skipped"] else f"trained in {summary['train_seconds']:.1f}s"
        val, loss = summary.get("final_val_acc"), summary.get("final_loss")
        typer.echo(f"{out}: {summary['method']} {shots}-shot seed {seed} {state}"
                   + (f"; final loss {loss:.4f}" if loss is not None else "; training-free (0 epochs)")
                   + (f", val acc {100 * val:.2f}%" if val is not None else "")
                   + (f"; kept epoch {kept['epoch']} (best validation accuracy {100 * kept['val_acc']:.2f}%)"
                      if (kept := summary.get("selection") or {}).get("epoch") else ""))
        note_random_weights(summary.get("weights"))


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
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help="Evaluate a run whose training did not finish (killed or diverged); its metrics are marked incomplete.")] = False,
) -> None:
    """Evaluate a trained prompt on cached features: accuracy, macro-F1, per-class accuracy.

    --classes base|new (base-to-new) and --dataset D --transfer (cross-dataset) use other class names.

    Then the classifier is built from the learned context with those names (unified context only).
    """
    from coopipe.jobs.evaluate import run_eval

    with errors():
        if classes is not None:
            check_classes(classes)
        print_metrics(run_eval(run, cache_dir=features, dataset=dataset, store=store, split=split, out=out,
                                classes=classes, transfer=transfer, pretrained=pretrained, device=device,
                                allow_incomplete=allow_incomplete))


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

    with errors():
        check_classes(classes)
        folder = out or Path(PathsConfig.runs) / dataset / ("zeroshot_ensemble" if ensemble else "zeroshot")
        print_metrics(run_zeroshot(cache_dir=features, dataset=dataset, out_dir=folder, model=model,
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
    from coopipe.jobs.evaluate import run_fit
    from coopipe.lookup import run_name
    from coopipe.methods import MethodSpec

    with errors():
        folder = out or Path(PathsConfig.runs) / dataset / "linear_probe" / run_name(shots, seed)
        print_metrics(run_fit(MethodSpec("linear_probe"), cache_dir=features, dataset=dataset, shots=shots,
                              seed=seed, out_dir=folder, model=model, pretrained=pretrained))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `coopipe train`, or a folder written by `coopipe export`.")],
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

    with errors():
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
    from coopipe.jobs.report import run_reports

    with errors():
        if not runs.is_dir():
            raise FileNotFoundError(f"no runs folder at {runs}; run `coopipe train`/`eval` or scripts/paper_grid.sh first")
        summary, ages = run_reports(runs, out_dir=out, gain_method=gain_method, gain_shots=gain_shots)
        typer.echo(f"{summary['n_records']} result(s) from {runs}: {len(summary['fewshot'])} few-shot cell(s), "
                   f"{len(summary['base2new'])} base-to-new row(s), {len(summary['transfer'])} transfer cell(s)")
        for name in summary["files"].values():
            typer.echo(f"  wrote {name}")
        for dataset, age in ages.items():  # age runs: the MAE table and figures too
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
    from coopipe.jobs.evaluate import run_fit
    from coopipe.lookup import run_name
    from coopipe.methods import MethodSpec

    with errors():
        folder = out or Path(PathsConfig.runs) / dataset / "ridge" / run_name(shots, seed)
        print_metrics(run_fit(MethodSpec("ridge"), cache_dir=features, dataset=dataset, shots=shots, seed=seed,
                              out_dir=folder))


@app.command()
def datasets() -> None:
    """List the registered datasets and where each expects its files."""
    from coopipe.datasets import default_registry

    for info in default_registry().infos():
        typer.echo(f"{info.name:<16} {info.description}")


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

    with errors():
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


app.command("sweep")(sweep)
app.command("export")(export)
app.command("models")(models)
app.add_typer(cache_app, name="cache")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
