"""`coopipe cache ...`: inspect feature stores (info, verify), clean interrupted ones, move them to and from HDF5."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from coopipe.cli_common import errors
from coopipe.config import PathsConfig

cache_app = typer.Typer(help="Inspect feature stores and move them to/from HDF5.", no_args_is_help=True)


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="A store directory (*.zarr) or a cache folder to list.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a store's provenance and shape (or list the stores under a folder, and any partial ones)."""
    from coopipe.encode import describe_store
    from coopipe.store import find_partials, open_store

    with errors():
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
            typer.echo(f"  dataset {prov['dataset']}/{prov['split']} ({len(prov['classnames'])} classes), rows {json.dumps(prov.get('rows', 'all'))}")
            typer.echo(f"  model {prov['model']}  weights {prov['weights']}  precision {prov.get('precision', '?')}  engine {prov.get('engine', 'eager')}")
            typer.echo(f"  views {json.dumps(prov['views'])}")
            typer.echo(f"  preprocess {json.dumps(prov.get('preprocess'))}")
            typer.echo(f"  file list sha256 {str(prov.get('file_list_sha256'))[:16]}…  coopipe {prov.get('coopipe_version')}  open_clip {prov.get('open_clip_version')}")
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

    with errors():
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
    """Check every chunk, array metadata and provenance of every store against the checksums recorded when it was
    written."""
    from coopipe.errors import StoreError
    from coopipe.store import open_store

    with errors():
        stores = [path] if path.suffix == ".zarr" else sorted(path.rglob("*.zarr"))
        if not stores:
            raise FileNotFoundError(f"no *.zarr store at or under {path}; run `coopipe encode` first")
        bad = 0
        for store in stores:
            try:
                opened = open_store(store, checksums=True)
                note = "" if opened.attrs.get("integrity", 0) >= 2 else (
                    "  (chunks and array metadata checked; provenance not covered: written before metadata "
                    "checksums, re-encode to cover it)")
                typer.echo(f"ok       {store}{note}")
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

    with errors():
        typer.echo(str(export_hdf5(open_store(store), out, overwrite=overwrite)))


@cache_app.command("import")
def cache_import(
    src: Annotated[Path, typer.Argument(help="HDF5 file written by `coopipe cache export`.")],
    cache: Annotated[Path, typer.Option(help="Cache directory.")] = Path(PathsConfig.cache),
) -> None:
    """Import an exported HDF5 file back into a zarr store under --cache."""
    from coopipe.hdf5io import import_hdf5

    with errors():
        typer.echo(str(import_hdf5(src, cache)))
