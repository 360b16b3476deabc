"""Stage `interpret`: read a learned CoOp context as its nearest vocabulary words (CoOp's interpretation).

For the checkpoint's own model (name and weights identity from the checkpoint's metadata) a FAISS index over the
token-embedding table is loaded from ``<cache>/vocab`` (built and cached the first time); every context vector
(per class under class-specific context) is looked up; the result is written as JSON and TSV. When a test store
of the same dataset, model and weights is in the cache, the test accuracy of the learned prompt and of its
nearest-word projection are measured too.

Run by DVC as ``python stages/interpret.py --checkpoint ... --json ... --tsv ...`` (topk/metric/device from the
``interpret`` section of params.yaml) and by ``coopipe interpret``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


from coopipe.atomic import write_json, write_text
from coopipe.checkpoint import Checkpoint, load_checkpoint
from coopipe.trained_learner import load_learner
from coopipe.errors import ParamsError, StoreError
from coopipe.features import read_split, select_store
from coopipe.interpret.projection import evaluate_projection
from coopipe.interpret.reading import Interpretation, interpret_prompt
from coopipe.interpret.render import format_tsv
from coopipe.interpret.vocab_index import METRICS, load_vocab_index
from coopipe.models import LoadedClip, load_clip
from coopipe.prompt import PromptLearner
from coopipe.lookup import checkpoint_pretrained
from coopipe.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- checkpoint -> model
def load_for_interpretation(
    ckpt: Checkpoint, *, device: str = "cpu", pretrained: str | None = None
) -> tuple[LoadedClip, PromptLearner]:
    """The checkpoint's own model (weights identity checked) and a prompt learner holding the learned context."""
    clip = load_clip(ckpt.model, pretrained or checkpoint_pretrained(ckpt), device=device)
    learner = load_learner(ckpt, clip)
    if not isinstance(learner, PromptLearner):
        raise ParamsError(f"interpretation reads learned contexts of CoOp/CoCoOp prompts, not {ckpt.method.label()}")
    return clip, learner


# ---------------------------------------------------------------------------------------------- test features
def find_test_store(
    ckpt: Checkpoint, cache_dir: str | os.PathLike[str], test_store: str | os.PathLike[str] | None = None
) -> FeatureStore | None:
    """``test_store`` if given, else the full test store of the checkpoint's dataset, model and weights under
    ``cache_dir`` (None when there is none). Raises if the store does not fit the checkpoint."""
    if test_store is not None:
        store = open_store(test_store)
    else:
        dataset = ckpt.dataset
        if dataset is None:
            logger.warning("checkpoint %s records no dataset: cannot look for its test store", ckpt.path)
            return None
        try:
            store = select_store(cache_dir, dataset, "test", model=ckpt.model, weights=ckpt.weights)
        except StoreError as exc:
            logger.warning("%s", exc)
            return None
    ckpt.check_store(store)
    return store


# ---------------------------------------------------------------------------------------------- the stage
def run_interpret(
    *,
    checkpoint: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] = "cache",
    topk: int = 5,
    metric: str = "l2",
    test_store: str | os.PathLike[str] | None = None,
    accuracy: bool | None = None,
    device: str = "cpu",
    gpu: bool | None = None,
    pretrained: str | None = None,
    json_out: str | os.PathLike[str] | None = None,
    tsv_out: str | os.PathLike[str] | None = None,
) -> Interpretation:
    """Interpret ``checkpoint``'s context: nearest tokens of each vector, the nearest-word prompt, its accuracy.

    ``accuracy``: None measures it when a test store is found (``test_store``, else the full test store of the
    checkpoint's dataset, model and weights under ``cache_dir``), True requires it, False skips it.
    ``pretrained`` overrides where the weights are loaded from (their identity must still match). ``gpu``: see
    :func:`coopipe.interpret.vocab_index.load_vocab_index`.
    Writes ``json_out``/``tsv_out`` when given (atomically).
    """
    if metric not in METRICS:
        raise ParamsError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ParamsError(f"topk must be a positive integer, got {topk!r}")
    ckpt = load_checkpoint(checkpoint)
    clip, learner = load_for_interpretation(ckpt, device=device, pretrained=pretrained)
    index = load_vocab_index(clip, metric=metric, cache_dir=cache_dir, gpu=gpu)
    result = interpret_prompt(learner, clip, index, topk=topk)
    store = None
    if accuracy is not False:
        store = find_test_store(ckpt, cache_dir, test_store)
        if store is None and accuracy:
            raise StoreError(
                f"no test store of {ckpt.dataset} for {ckpt.model} ({ckpt.weights}) under {cache_dir}; "
                f"run `coopipe encode --split test` with the checkpoint's model and weights, or pass a test store"
            )
        if store is None:
            logger.warning("no test store found for checkpoint %s: accuracy not measured", ckpt.path)
    if store is not None:
        test = read_split(store, all_views=False)
        result.accuracy = evaluate_projection(result, learner, clip, test.center, test.labels, source=str(store.path))
    if json_out is not None:
        data = {"checkpoint": str(Path(checkpoint)), **result.to_dict()}
        write_json(json_out, data, ensure_ascii=False)
    if tsv_out is not None:
        write_text(tsv_out, format_tsv(result))
    return result
