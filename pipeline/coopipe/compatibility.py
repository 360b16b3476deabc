"""Whether a trained prompt or an exported classifier fits a feature store: same model, weights and class list.

Why: features of another model, other weights or another class order give a classifier's logits that look like
results and are garbage; the check names both files, the difference and the fix in one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from coopipe.errors import CheckpointError
from coopipe.store import FeatureStore


def check_compatible(
    *,
    what: str,
    model: str,
    weights: str,
    classnames: Sequence[str],
    store: FeatureStore,
) -> None:
    """Raise :class:`CheckpointError` (one line: both files, the difference, the fix) unless ``store`` holds
    features of the same model, weights and class list as ``what`` (a checkpoint or classifier path)."""
    prov = store.provenance
    problems = []
    if prov.get("model") != model:
        problems.append(f"model {model} vs {prov.get('model')}")
    if prov.get("weights") != weights:
        problems.append(f"weights {weights} vs {prov.get('weights')}")
    theirs = list(prov.get("classnames", []))
    if theirs != list(classnames):
        if len(theirs) != len(classnames):
            problems.append(f"{len(classnames)} classes vs {len(theirs)}")
        else:
            i = next(i for i, (a, b) in enumerate(zip(classnames, theirs)) if a != b)
            problems.append(f"class {i} is {classnames[i]!r} vs {theirs[i]!r}")
    if problems:
        raise CheckpointError(
            f"{what} does not fit store {store.path}: {'; '.join(problems)} (checkpoint vs store); evaluate it on "
            f"a store encoded with the checkpoint's model, weights and dataset (coopipe encode --model {model} "
            f"--pretrained ...), or retrain on this store"
        )
