"""Scale-out encoding over a dask.distributed cluster.

The driver splits the store's pending chunks into chunk-aligned blocks and submits one task per block. Each
worker loads the model and builds its image tower once (the :class:`ModelCache` worker plugin keeps them for the
worker's lifetime; an ONNX Runtime tower loads the export the driver cached, see :mod:`coopipe.engines`),
encodes its blocks with the same code as the in-process path and writes the chunks straight into the shared
partial store; the driver then publishes the store. Views are seeded per (image, view), so the result equals
the in-process store. The store directory must be on a filesystem every worker can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, WorkerPlugin, as_completed, get_worker

from coopipe.encode import EncodeJob, EncodeOptions, encode_chunks, make_tower
from coopipe.engines import Tower
from coopipe.models import LoadedClip, load_clip
from coopipe.store_writer import StoreWriter

logger = logging.getLogger(__name__)

PLUGIN_NAME = "coopipe-model-cache"


class ModelCache(WorkerPlugin):
    """Worker plugin: one loaded model per (model, weights, device) and one built tower per (model, weights,
    engine, precision, device), for the lifetime of the worker (an ONNX Runtime session is built once)."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.models: dict[tuple[str, str, str], LoadedClip] = {}
        self.towers: dict[tuple[str, str, str, str, str], Tower] = {}

    def setup(self, worker: Any) -> None:
        self.models = {}
        self.towers = {}

    def get(self, model: str, pretrained: str, device: str) -> LoadedClip:
        key = (model, pretrained, device)
        if key not in self.models:
            self.models[key] = load_clip(model, pretrained, device=device)
        return self.models[key]

    def tower(self, model: str, pretrained: str, options: EncodeOptions) -> tuple[LoadedClip, Tower]:
        """The model and its tower for resolved ``options`` (the engine the store records: never a fallback)."""
        clip = self.get(model, pretrained, options.device)
        key = (model, pretrained, options.engine, options.precision, options.device)
        if key not in self.towers:
            self.towers[key] = make_tower(clip, options)
        return clip, self.towers[key]


def _encode_block(store: str, job: EncodeJob, chunks: list[int]) -> tuple[list[int], list[dict[str, str]]]:
    """Task body run on a worker: encode ``chunks`` of the partial store at ``store``."""
    from pathlib import Path

    plugin: ModelCache = get_worker().plugins[PLUGIN_NAME]  # type: ignore[assignment]
    clip, tower = plugin.tower(job.model, job.pretrained, job.options)
    writer = StoreWriter(Path(store))
    skipped = encode_chunks(clip, job, writer, chunks, num_workers=0, tower=tower)  # the worker is the parallelism
    return chunks, skipped


def _blocks(chunks: Sequence[int], n_workers: int) -> list[list[int]]:
    """Contiguous blocks, several per worker so a slow worker does not hold up the end."""
    n_blocks = max(1, min(len(chunks), 4 * max(1, n_workers)))
    size = -(-len(chunks) // n_blocks)
    return [list(chunks[i : i + size]) for i in range(0, len(chunks), size)]


def encode_chunks_distributed(
    scheduler: str,
    job: EncodeJob,
    writer: StoreWriter,
    chunks: Sequence[int],
    *,
    on_rows: Callable[[int], None] | None = None,
) -> list[dict[str, str]]:
    """Encode ``chunks`` on the cluster at ``scheduler``; returns skipped images like :func:`encode_chunks`."""
    if not chunks:
        return []
    with Client(scheduler) as client:  # as_completed needs it as the default client
        client.register_plugin(ModelCache(), name=PLUGIN_NAME)
        n_workers = len(client.scheduler_info().get("workers", {}))
        logger.info("encoding %d chunks on %d dask workers at %s", len(chunks), n_workers, scheduler)
        futures = [
            client.submit(_encode_block, str(writer.path), job, block, pure=False)
            for block in _blocks(chunks, n_workers)
        ]
        skipped: list[dict[str, str]] = []
        for future in as_completed(futures):
            done, block_skipped = future.result()  # re-raises a worker's BadImageError here
            skipped += block_skipped
            if on_rows is not None:
                on_rows(sum(len(writer.chunk_rows_range(c)) for c in done))
    return skipped
