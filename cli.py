"""The `coopipe` command line: a thin typer layer over the stage functions in ``coopipe.stages``.

Every command validates its paths at the boundary, turns coopipe's errors into a one-line message on stderr
with exit code 1, and leaves the work to the stage scripts (which do the file I/O) and the library.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

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


def _int_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.", envvar="COOPIPE_LOG")] = "INFO",
) -> None:
    from coopipe.stages.logs import setup_logging

    setup_logging(log_level)


@app.command()
def encode(
    dataset: Annotated[str, typer.Option(help="Registered dataset name (see `coopipe datasets`).")],
    data_root: Annotated[Path, typer.Option(help="CoOp-style $DATA folder; for imagefolder the class folder; for manifest the file.")],
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "all",
    model: Annotated[str, typer.Option(help="open_clip model name: RN50, ViT-B-32, ViT-B-16, ...")] = "RN50",
    pretrained: Annotated[str, typer.Option(help="open_clip tag (e.g. openai), local checkpoint path, or none.")] = "none",
    views: Annotated[int, typer.Option(help="Augmented views per train image (random resized crop + flip) beside the centre view.")] = 0,
    crop_scale: Annotated[str, typer.Option(help="Random-resized-crop scale range, 'lo,hi'.")] = "0.08,1.0",
    aug_seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
    shots: Annotated[Optional[str], typer.Option(help="Few-shot K values, e.g. 1,2,4,8,16: train/val encode only the images these draws use.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Few-shot seeds, e.g. 1,2,3 (with --shots).")] = None,
    cache: Annotated[Path, typer.Option(help="Cache directory for feature stores.")] = Path("cache"),
    batch_size: Annotated[int, typer.Option(help="Model batch size (images x views).")] = 64,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 1,
    precision: Annotated[str, typer.Option(help="bf16 (autocast, default), fp16 (CUDA) or fp32.")] = "bf16",
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: float16 or float32.")] = "float16",
    chunk_rows: Annotated[int, typer.Option(help="Rows per zarr chunk (the resume granularity).")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    on_bad_image: Annotated[str, typer.Option(help="fail: stop at an unreadable image; skip: skip it and write a report.")] = "fail",
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (default: in-process).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Encode a dataset's images once into chunked zarr feature stores under --cache."""
    from coopipe.encode import EncodeOptions
    from coopipe.stages.encode import ALL_SPLITS, run_encode

    with _errors():
        splits = ALL_SPLITS if split == "all" else (split,)
        if any(s not in ALL_SPLITS for s in splits):
            raise typer.BadParameter(f"--split must be train, val, test or all, got {split!r}")
        lo, hi = (float(x) for x in crop_scale.split(","))
        results = run_encode(
            dataset=dataset, data_root=data_root, splits=splits, cache_dir=cache, model=model,
            pretrained=pretrained, views=views, crop_scale=(lo, hi), aug_seed=aug_seed,
            shots=_int_list(shots), seeds=_int_list(seeds), scheduler=scheduler,
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
    """Print a store's provenance and shape (or list the stores under a folder)."""
    from coopipe.encode import describe_store
    from coopipe.store import open_store

    with _errors():
        stores = [path] if path.suffix == ".zarr" else sorted(path.rglob("*.zarr"))
        if not stores:
            raise FileNotFoundError(f"no *.zarr store at or under {path}; run `coopipe encode` first")
        infos = [describe_store(open_store(p)) for p in stores]
        if as_json:
            typer.echo(json.dumps(infos if len(infos) > 1 else infos[0], indent=1))
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
    cache: Annotated[Path, typer.Option(help="Cache directory.")] = Path("cache"),
) -> None:
    """Import an exported HDF5 file back into a zarr store under --cache."""
    from coopipe.hdf5io import import_hdf5

    with _errors():
        typer.echo(str(import_hdf5(src, cache)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
