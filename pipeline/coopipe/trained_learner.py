"""The one way to rebuild a trained learner from its checkpoint, for its own classes or (where the method allows)
for others.

Why apart from the checkpoint's format: evaluation, prediction, transfer and interpretation all rebuild learners;
the rules (the checkpoint's model and weights only, a class-bound prompt never for other classes, a head derived
from class names rebuilt with the target dataset's template) are written once here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from coopipe.errors import CheckpointError, ParamsError
from coopipe.learners import Learner, restore_learner
from coopipe.models import LoadedClip

if TYPE_CHECKING:
    from coopipe.checkpoint import Checkpoint


def load_learner(ckpt: Checkpoint, clip: LoadedClip, classnames: Sequence[str] | None = None, *,
                 template: str | None = None) -> Learner:
    """The one way to rebuild a trained prompt: ``ckpt``'s method and variant, for ``classnames`` (default: the
    trained classes), on ``clip`` (checked to be the checkpoint's model and weights), holding the learned tensors
    (the context, and CoCoOp's Meta-Net).

    Other class names need a prompt that does not belong to its classes (:attr:`MethodSpec.transferable`); what a
    learner derives from its class names (CLIP-Adapter's zero-shot head) is then built for them with ``template``,
    the target dataset's hand-crafted prompt (:meth:`coopipe.methods.Method.for_classes`).
    """
    ckpt.check_clip(clip)
    spec = ckpt.method
    names = list(ckpt.classnames if classnames is None else classnames)
    if names != ckpt.classnames and not spec.transferable:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds a {spec.label()} prompt tied to its {len(ckpt.classnames)} training classes, "
            f"which cannot serve other classes ({spec.transfer_refusal()}); train a method that can (coop without "
            f"--csc, or cocoop) for base-to-new or cross-dataset evaluation"
        )
    derived = spec.definition.class_derived if names != ckpt.classnames else ()
    if derived and template is None:
        raise CheckpointError(f"checkpoint {ckpt.path}: a {spec.label()} prompt for other classes needs the target "
                              f"dataset's prompt template to build its zero-shot head; evaluate through coopipe eval")
    try:
        learner = restore_learner(spec, clip, names, {k: t for k, t in ckpt.learner_tensors.items() if k not in derived})
        if derived:
            spec.definition.for_classes(learner, clip, str(template))
        return learner
    except ParamsError as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: its prompt {spec.label()} cannot be rebuilt ({exc})") from exc
    except CheckpointError as exc:  # a tensor missing or of another shape: name the run it came from
        raise CheckpointError(f"checkpoint {ckpt.path}: {exc}") from exc

