"""Stage `evaluate` and the baselines: accuracy, macro-F1 and per-class accuracy on cached test features.

- ``run_eval``: a trained run (its exported classifier, so no text encoder is needed) on the test store of
  its dataset, model and weights (or any compatible store given explicitly);
- ``run_fit``: a training-free method's run and its evaluation in one call, for the baselines, which are methods
  (:mod:`coopipe.methods.zeroshot`, :mod:`coopipe.methods.probes`): ``run_fit(MethodSpec("linear_probe"), ...)``
  is the linear probe, ``run_fit(MethodSpec("ridge"), ...)`` the ridge probe; ``run_zeroshot`` is it for zero-shot
  CLIP with the dataset's hand-crafted prompt, prompt ensembling or given templates.
Each writes ``metrics.json`` (method, dataset, shots, seed + metrics) into its run folder.

Age datasets (:func:`coopipe.datasets.is_age_dataset`) branch into :mod:`coopipe.jobs.age_eval`: the same
files gain MAE (both decodings), CS(1..10), within +-1/3/5 years and the constant predictor's MAE, plus a
``predictions.csv``; zero-shot defaults to the age prompt (ensembling: the age prompts); the linear probe is the
rank probe decoded by expectation; the ridge probe's ages are its own predictions.

Class lists other than the training one (see :mod:`coopipe.transfer`): ``classes='base'|'new'`` evaluates on
that half of the sorted classes (CoCoOp's base-to-new protocol; written to ``metrics_<classes>.json``), and
``transfer=True`` evaluates a prompt trained on one dataset on another dataset's store (written to
``<run>/transfer/<dataset>/metrics.json``). Whenever the evaluated class list differs from the trained one, the
classifier is built from the learned context with the evaluated class names through the text encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from coopipe.atomic import write_json
from coopipe.baselines import dataset_template
from coopipe.checkpoint import Checkpoint, load_checkpoint
from coopipe.trained_learner import load_learner
from coopipe.datasets import is_age_dataset
from coopipe.departures import checkpoint_departures, training_record
from coopipe.errors import CheckpointError, StoreError
from coopipe.cost import measure_inference, read_training_cost
from coopipe.evaluate import check_finite_logits, classifier_logits, evaluate_predictions
from coopipe.features import SplitFeatures, read_split, select_store
from coopipe.learners import predict_logits
from coopipe.hardware import check_device
from coopipe.jobs import age_eval
from coopipe.lookup import checkpoint_pretrained, resolve_model
from coopipe.methods import MethodSpec
from coopipe.methods.zeroshot import TEMPLATE_SEP
from coopipe.models import LoadedClip, load_clip
from coopipe.report.records import departures
from coopipe.store import open_store
from coopipe.transfer import ClassSubset, check_same_encoder

logger = logging.getLogger(__name__)


def _metrics(evaluation: Any, classnames: Sequence[str], **info: Any) -> dict[str, Any]:
    """A metrics file's content; it always says how the result departs from the paper's setting (random weights,
    other epochs), so that no reader takes a pipeline check for a result."""
    data = evaluation.to_dict(classnames)
    if len(classnames) > 100:  # a 1000 x 1000 confusion matrix does not belong in a metrics file
        data.pop("confusion", None)
    out = {**info, **data}
    out["departures"] = departures(out)
    return out


def metrics_filename(classes: str) -> str:
    """``metrics.json`` for all classes, ``metrics_base.json`` / ``metrics_new.json`` for a class subset."""
    return "metrics.json" if classes == "all" else f"metrics_{classes}.json"


def run_eval(
    run: str | Path,
    *,
    cache_dir: str | Path = "cache",
    dataset: str | None = None,
    store: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    classes: str | None = None,
    transfer: bool = False,
    pretrained: str | None = None,
    device: str = "cpu",
    clip: LoadedClip | None = None,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Evaluate a run folder (or checkpoint) on the ``split`` store; writes ``<run>/metrics.json`` by default.

    A run whose training did not finish (killed, stopped, diverged) is refused: its metrics would read as the
    run's result and a sweep would take the run as finished. ``allow_incomplete`` evaluates it anyway and
    marks the metrics ``"incomplete": true`` (a sweep never counts such a file as finished).

    ``classes``: ``all``, ``base`` or ``new`` (default: the classes the run was trained on, ``all`` on another
    dataset). ``transfer``: allow a store of another dataset (another class list). ``pretrained`` says where to
    load the weights from when the text encoder is needed and the checkpoint's weights came from a local file
    (or pass the loaded ``clip``).
    """
    check_device(device)
    ckpt = load_checkpoint(run)
    if not ckpt.complete and not allow_incomplete:
        raise CheckpointError(
            f"run {ckpt.path} is incomplete (trained {ckpt.epoch} of {ckpt.config.max_epoch} epochs: killed, "
            f"stopped or diverged); re-run the same `coopipe train` to finish it, or pass --allow-incomplete to "
            f"evaluate it as it is (its metrics are marked incomplete)"
        )
    record = ckpt.run
    source = ckpt.dataset
    dataset = dataset or source
    trained_classes = record.classes
    if store is not None:
        feature_store = open_store(store)
        if transfer or dataset is None:
            dataset = feature_store.provenance.get("dataset")
    else:
        if dataset is None:
            raise StoreError(f"checkpoint {ckpt.path} records no dataset; pass --dataset")
        feature_store = select_store(cache_dir, dataset, split, model=ckpt.model, weights=ckpt.weights)
    other_dataset = dataset != source
    if classes is None:
        classes = "all" if other_dataset else trained_classes
    check_same_encoder(ckpt, feature_store)
    test = ClassSubset.of(feature_store.classnames(), classes).apply(read_split(feature_store, all_views=False))
    if test.classnames == ckpt.classnames and classes == "all":
        ckpt.check_store(feature_store)
    if test.classnames != ckpt.classnames and not transfer and (other_dataset or classes == "all"):
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained for {len(ckpt.classnames)} classes of {source}, store "
            f"{feature_store.path} holds {len(test.classnames)} other classes of {dataset}; pass --transfer to "
            f"evaluate the learned context with the store's class names, or use a store of the checkpoint's dataset"
        )
    exported = test.classnames == ckpt.classnames and not ckpt.method.image_conditional  # the CPU classifier
    if not exported and clip is None:  # loaded before the inference is timed: loading a model is not inference
        clip = load_clip(ckpt.model, pretrained or checkpoint_pretrained(ckpt), device=device)
    logits, inference = measure_inference(
        len(test.labels), lambda: _prompt_logits(ckpt, test, clip=clip, pretrained=pretrained, device=device,
                                         template=dataset_template(str(dataset))),
        device="cpu" if exported else device)
    y = torch.as_tensor(test.labels)
    ages = ckpt.method.definition.predicts_ages  # the ridge probe: ages in years, its logits only pick the nearest rank
    evaluation = evaluate_predictions(y, logits.argmax(dim=-1), logits.shape[1],
                                      loss=float(F.cross_entropy(logits, y)) if len(y) and not ages else None)
    info: dict[str, Any] = {"classes": classes, "train_classes": trained_classes}
    if not ckpt.complete:
        info["incomplete"] = True
    if dataset != source:
        info["source_dataset"] = source
    metrics = _metrics(
        evaluation, test.classnames, method=ckpt.method.label(), dataset=dataset, shots=record.shots,
        seed=record.seed, model=ckpt.model, weights=ckpt.weights, variant=ckpt.variant, method_spec=ckpt.method.to_dict(),
        epochs=ckpt.epoch, paper_epochs=ckpt.method.paper_epochs(record.shots or 16, record.dataset),
        split=split, store=str(feature_store.path), **training_record(ckpt), **info,
    )
    metrics.update(ckpt.method.definition.record_fields(ckpt.method.options, ckpt.learner_tensors,
                                                        dataset_template(str(dataset))))
    metrics["departures"] += [d for d in checkpoint_departures(ckpt, feature_store.provenance)
                              if d not in metrics["departures"]]
    metrics["cost"] = {**(read_training_cost(ckpt.path) or {}), **inference.to_dict()}
    if out is None:
        folder = ckpt.path / "transfer" / str(dataset) if dataset != source else ckpt.path
        out = folder / metrics_filename(classes)
    if is_age_dataset(str(dataset)) and classes == "all":
        predicted = _predicted_ages(ckpt, test, clip=clip, pretrained=pretrained, device=device) if ages else None
        fields, age_evaluation, paths = age_eval.trained_run_age_metrics(
            cache_dir=cache_dir, dataset=str(dataset), shots=record.shots, seed=record.seed, logits=logits,
            test=test, model=ckpt.model, weights=ckpt.weights, predicted=predicted)
        metrics.update(fields)
        age_eval.write_predictions(Path(out).parent / age_eval.PREDICTIONS_FILE, paths, age_evaluation)
    write_json(Path(out), metrics)
    return metrics


def _predicted_ages(ckpt: Checkpoint, test: SplitFeatures, *, clip: LoadedClip | None, pretrained: str | None,
                    device: str) -> Any:
    """Ages (N,) of a method that predicts them (``predicts_ages``: the ridge probe), from its rebuilt learner."""
    clip = clip or load_clip(ckpt.model, pretrained or checkpoint_pretrained(ckpt), device=device)
    learner: Any = load_learner(ckpt, clip, test.classnames)
    return learner.predict_ages(test.center)


def _prompt_logits(ckpt: Checkpoint, test: SplitFeatures, *, clip: LoadedClip | None, pretrained: str | None,
                   device: str, template: str) -> torch.Tensor:
    """Logits (N, K) of the run's prompt on ``test`` (its class names): the exported classifier when the classes
    are the trained ones and the prompt is image-independent (no text encoder needed), else the learner rebuilt
    from the checkpoint (other class names: base-to-new, transfer; CoCoOp: one K-class text pass per image,
    batched, with a progress bar)."""
    if test.classnames == ckpt.classnames and not ckpt.method.image_conditional:
        classifier = ckpt.classifier()
        text, scale = classifier.text_features, classifier.logit_scale
        logits = classifier_logits(text, test.center, scale)
        check_finite_logits(logits, scale, f"the classifier of run {ckpt.path}")
        return logits
    clip = clip or load_clip(ckpt.model, pretrained or checkpoint_pretrained(ckpt), device=device)
    learner = load_learner(ckpt, clip, test.classnames, template=template)  # template: a zero-shot head for new classes
    if test.classnames != ckpt.classnames:
        logger.info("building a %d-class prompt from %s", len(test.classnames), ckpt.path)
    encoder = ckpt.config.text_encoder(clip)
    n = test.center.shape[0]
    with tqdm(total=n, unit="img", desc=f"eval {ckpt.method.label()}", disable=n < 64, dynamic_ncols=True) as bar:
        logits = predict_logits(learner, encoder, test.center, clip.model.logit_scale.detach(), progress=bar.update)
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"the prompt of {ckpt.path} gives non-finite logits (its training diverged); "
                              f"re-train with a lower --lr")
    return logits


def run_fit(
    method: MethodSpec,
    *,
    cache_dir: str | Path,
    dataset: str,
    out_dir: str | Path,
    shots: int = 0,
    seed: int = 0,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "cpu",
    clip: LoadedClip | None = None,
    classes: str = "all",
) -> dict[str, Any]:
    """Run a training-free method (zero-shot CLIP, a probe) into ``out_dir`` and evaluate it on the test store: the
    same run folder, checkpoint and metrics as ``coopipe train`` + ``coopipe eval``, in one call.

    ``classes='base'|'new'`` evaluates on that half (``metrics_<classes>.json``); the run is made on the base half,
    so one folder holds both halves (a method that scores any class list: zero-shot CLIP). A method that reads no
    training image needs only the test store.
    """
    from coopipe.jobs.train import run_train

    check_device(device)
    clip = clip or resolve_model(Path(cache_dir), dataset, model, pretrained, device,
                                 split="train" if method.definition.fewshot else "test")
    run_train(cache_dir=cache_dir, dataset=dataset, shots=shots, seed=seed, out_dir=out_dir,
              overrides={"method": method}, device=device, progress=False, clip=clip,
              classes="all" if classes == "all" else "base", params_record={"cli": f"coopipe {method.method}"})
    return run_eval(out_dir, cache_dir=cache_dir, classes=classes, out=Path(out_dir) / metrics_filename(classes),
                    device=device, clip=clip)


def run_zeroshot(
    *,
    cache_dir: str | Path,
    dataset: str,
    out_dir: str | Path,
    model: str | None = None,
    pretrained: str | None = None,
    ensemble: bool = False,
    templates: Sequence[str] | None = None,
    device: str = "cpu",
    clip: LoadedClip | None = None,
    classes: str = "all",
) -> dict[str, Any]:
    """Zero-shot CLIP (the dataset's hand-crafted prompt), prompt ensembling, or the given ``templates`` on the test
    store (:mod:`coopipe.methods.zeroshot`); ``classes='base'|'new'``: that half of the classes."""
    method = MethodSpec.of("zeroshot", ensemble=ensemble, templates=TEMPLATE_SEP.join(templates) if templates else None)
    return run_fit(method, cache_dir=cache_dir, dataset=dataset, out_dir=out_dir, model=model, pretrained=pretrained,
                   device=device, clip=clip, classes=classes)
