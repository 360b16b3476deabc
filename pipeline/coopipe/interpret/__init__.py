"""Interpret a learned CoOp context: the nearest vocabulary tokens of every context vector, found with FAISS.

CoOp (Zhou et al.) reads a learned context by the vocabulary words nearest to each context vector in the
token-embedding space. One module a job:

- :mod:`coopipe.interpret.tokens`: CLIP BPE ids decoded to readable text;
- :mod:`coopipe.interpret.vocab_index`: the cached, exact FAISS index over one model's token embeddings;
- :mod:`coopipe.interpret.reading`: a context read as its nearest tokens (:func:`interpret_prompt`);
- :mod:`coopipe.interpret.projection`: test accuracy of the nearest-word prompt;
- :mod:`coopipe.interpret.render`: TSV and the terminal table.

The names below are the package's public API, re-exported (as open_clip does) so callers may import them from
``coopipe.interpret``; the library itself imports each from its module.
"""

from coopipe.interpret.projection import evaluate_projection, nearest_prompt_tokens, projected_context
from coopipe.interpret.reading import (
    ContextReading,
    ContextSlot,
    Interpretation,
    Neighbour,
    ProjectionAccuracy,
    interpret_prompt,
)
from coopipe.interpret.render import TSV_COLUMNS, format_table, format_tsv
from coopipe.interpret.tokens import CONTINUES, Token, decode_token, join_tokens, readable_bytes
from coopipe.interpret.vocab_index import (
    METRICS,
    VocabIndex,
    build_flat_index,
    gpu_available,
    index_vectors,
    load_vocab_index,
    vocab_embeddings,
    vocab_index_path,
)

__all__ = [
    "CONTINUES",
    "METRICS",
    "TSV_COLUMNS",
    "ContextReading",
    "ContextSlot",
    "Interpretation",
    "Neighbour",
    "ProjectionAccuracy",
    "Token",
    "VocabIndex",
    "build_flat_index",
    "decode_token",
    "evaluate_projection",
    "format_table",
    "format_tsv",
    "gpu_available",
    "index_vectors",
    "interpret_prompt",
    "join_tokens",
    "load_vocab_index",
    "nearest_prompt_tokens",
    "projected_context",
    "readable_bytes",
    "vocab_embeddings",
    "vocab_index_path",
]
