"""Export a trained run as a self-contained classifier folder that needs neither coopipe's cache nor its run layout.

An exported folder holds::

    classifier.safetensors  (CoOp, rank prompts) the (K, D) normalised class text features of the learned prompt,
                            CLIP's logit scale and the class names: the whole head, one matrix product
    prompt.safetensors      (image-conditional methods: CoCoOp, CLIP-Adapter, Tip-Adapter, LP++) the learner's
                            tensors: such a head has no fixed matrix (CoCoOp: context and Meta-Net, one pass of
                            CLIP's text tower over all K classes per image); the method describes its own
                            inference (:attr:`coopipe.methods.Method.inference`)
    model.onnx              (optional) image tower + head (CoCoOp: + Meta-Net and text tower, see
                            :mod:`coopipe.export_onnx`): a preprocessed image batch -> class probabilities
    export.json             the record: model name, weights identity and how to load them, the text tower's
                            activation, preprocessing, how the training features were encoded (precision, stored
                            dtype), classes, logit scale, method, what inference computes, sha256 of every file
    README.md               a model card with the metadata block the Hugging Face Hub reads (see
                            :mod:`coopipe.model_card`)

Why this way: the question users of prompt-learning code ask most is how to run a learned prompt on their own
images, and bare ``text_features.pt`` files carry no record of the model, weights, activation or preprocessing
they belong to, so they are silently misused. Every file is written atomically and ``export.json`` last, holding
the hash of each file: a reader never takes a half-written or mixed folder for an export
(:func:`load_export` checks the hashes). ``coopipe predict`` reads an exported folder into the same
:class:`~coopipe.head.Head` as its run, so both predict the same.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import coopipe
from coopipe.atomic import atomic_write, write_json, write_text
from coopipe.checkpoint import Checkpoint, load_checkpoint
from coopipe.checkpoint_files import CLASSIFIER_FILE
from coopipe.classifier import load_classifier
from coopipe.errors import CheckpointError, MissingFileError, ParamsError
from coopipe.json_records import fields_of, read_folder_record
from coopipe.head import TEXT_PATH_OPTIONS, Head, ImagePrompt, head_of_run
from coopipe.departures import checkpoint_departures
from coopipe.methods import MethodSpec
from coopipe.model_card import model_card
from coopipe.models import LoadedClip, activation_of, open_clip_version, sha256_file

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMAT", "ONNX_FILE", "PROMPT_FILE", "RECORD_FILE", "ExportResult", "export_run", "is_export",
           "load_export", "read_record"]

EXPORT_FORMAT = "coopipe.export/1"
RECORD_FILE = "export.json"
CARD_FILE = "README.md"
PROMPT_FILE = "prompt.safetensors"
ONNX_FILE = "model.onnx"
METRICS_FILES = ("metrics.json", "metrics_base.json", "metrics_new.json")

_FIXED = (
    "logits = exp(logit_scale) * normalize(image_features) @ text_features.T; probabilities = softmax(logits). "
    "image_features are the raw outputs of the model's image tower (encode_image) on images preprocessed as "
    "recorded; text_features (K x D, normalised) and logit_scale (CLIP's log scale) are in classifier.safetensors."
)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote: the folder and its files."""

    path: Path
    files: tuple[str, ...]


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an exported folder (holds ``export.json``) rather than a run folder."""
    path = Path(path)
    return (path / RECORD_FILE).is_file() or (path.name == RECORD_FILE and path.is_file())


def _run_metrics(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """The run's evaluation files by name (``metrics.json``, base/new), as ``coopipe eval`` wrote them."""
    found: dict[str, dict[str, Any]] = {}
    for name in METRICS_FILES:
        path = ckpt.path / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
                logger.warning("run %s: cannot read %s (%s); the model card leaves it out", ckpt.path, name, exc)
    return found


def _check_destination(out: Path, run: Path) -> None:
    """Refuse to write into the run itself or into a non-empty folder that is not an earlier export."""
    if out.resolve() == run.resolve():
        raise ParamsError(f"export folder {out} is the run folder; give another folder")
    if out.is_file():
        raise ParamsError(f"export folder {out} is a file; give a folder")
    ours = {CLASSIFIER_FILE, PROMPT_FILE, ONNX_FILE, CARD_FILE, RECORD_FILE}
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")] \
        if out.is_dir() else []
    if foreign:  # an interrupted export (no record yet) holds only its own files and may be written again
        raise ParamsError(f"{out} holds files that are not a coopipe export ({', '.join(sorted(foreign)[:3])}); give "
                          f"a new or empty folder")


def export_run(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    onnx: bool = False,
    pretrained: str | None = None,
    clip: LoadedClip | None = None,
    device: str = "cpu",
) -> ExportResult:
    """Write the exported folder of ``run`` (a finished run folder) into ``out``; see the module docstring.

    The model is loaded (``pretrained``: where from, if the run's local weights file moved) to read the
    activation and preprocessing it actually runs with, and for ``onnx``.
    """
    ckpt = load_checkpoint(run)
    out = Path(out)
    _check_destination(out, ckpt.path)
    if not ckpt.complete:
        raise CheckpointError(
            f"run {ckpt.path} is not finished (epoch {ckpt.epoch} of {ckpt.meta.get('max_epoch')}); finish it with "
            f"`coopipe train` (same options) before exporting"
        )
    head = head_of_run(ckpt, pretrained)
    clip = clip or head.load_model(device=device)
    head.check_clip(clip)
    spec = ckpt.method
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD_FILE).unlink(missing_ok=True)  # a re-export: the folder is no export until its record is back
    files: dict[str, str] = {}
    if head.classifier is not None:
        # the run's classifier file byte for byte (checked against the run by head_of_run): written again, its
        # normalised rows would be normalised once more, which can move an element by one float32 rounding step, and
        # the export's probabilities would differ from the run's and from `coopipe eval`'s in their last digit
        clf = head.classifier
        written = atomic_write(out / CLASSIFIER_FILE, lambda tmp: shutil.copyfile(clf.path, tmp))
        logit_scale = clf.logit_scale
    else:
        assert head.prompt is not None
        written = _write_prompt(out / PROMPT_FILE, head.prompt.tensors, spec)
        logit_scale = float(clip.model.logit_scale.detach())
    files[written.name] = sha256_file(written)
    for stale in (CLASSIFIER_FILE, PROMPT_FILE):  # the other kind's file, left by an earlier export
        if stale not in files:
            (out / stale).unlink(missing_ok=True)
    if onnx:
        from coopipe.export_onnx import export_onnx  # torch.onnx only when asked for

        graph = export_onnx(clip, head, out / ONNX_FILE)
        files[graph.name] = sha256_file(graph)
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)
    record = build_record(ckpt, clip, head, spec, logit_scale=logit_scale, files=files)
    metrics = _run_metrics(ckpt)
    write_text(out / CARD_FILE, model_card(record, metrics, onnx=onnx))
    files[CARD_FILE] = sha256_file(out / CARD_FILE)
    record["files"] = files
    write_json(out / RECORD_FILE, record)  # last: it vouches for the files above
    logger.info("exported %s (%s) to %s: %s", ckpt.path, spec.label(), out, ", ".join(files))
    return ExportResult(out, tuple([*files, RECORD_FILE]))


def _write_prompt(path: Path, tensors: Mapping[str, torch.Tensor], spec: MethodSpec) -> Path:
    # at least float32; a float64 fit (the probes') stays float64, so the export scores as the run does
    clean = {name: t.detach().to(torch.promote_types(t.dtype, torch.float32)).cpu().contiguous().clone()
             for name, t in tensors.items()}
    meta = {"format": EXPORT_FORMAT, "method": json.dumps(spec.to_dict())}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


def build_record(
    ckpt: Checkpoint, clip: LoadedClip, head: Head, spec: MethodSpec, *, logit_scale: float, files: Mapping[str, str]
) -> dict[str, Any]:
    """``export.json``'s content: everything needed to apply the head correctly, and where it came from."""
    run = ckpt.run
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "method": spec.to_dict(),
        "method_label": spec.label(),
        "image_conditional": spec.image_conditional,
        "model": {
            "name": clip.name,
            "weights": clip.weights_id,
            "pretrained": head.pretrained,
            "activation": activation_of(clip.model),
            "embed_dim": clip.embed_dim,
            "open_clip_version": open_clip_version(),
        },
        "preprocess": {
            **clip.preprocess.to_dict(),
            "view": "resize the shorter side to image_size, centre crop image_size x image_size, RGB scaled to "
                    "[0, 1], minus mean, divided by std",
        },
        "features": {
            "precision": head.precision,
            "dtype": head.dtype,
            "normalized": False,
            "note": "the head was trained on image-tower outputs computed at this precision and stored in this dtype; "
                    "coopipe predict encodes new images the same way",
        },
        "classnames": list(head.classnames),
        "logit_scale": logit_scale,
        "inference": spec.definition.inference if spec.image_conditional else _FIXED,  # the method's words
        "source": {
            "run": str(ckpt.path),
            "epoch": ckpt.epoch,
            "max_epoch": ckpt.meta.get("max_epoch"),
            "paper_epochs": spec.paper_epochs(run.shots or 16, run.dataset),
            "dataset": ckpt.dataset,
            "shots": run.shots,
            "seed": run.seed,
            "classes": run.classes,
            "variant": ckpt.variant,  # what the learner recorded of itself (Tip-Adapter: the published config used)
            "config": ckpt.meta.get("config"),
            "stores": ckpt.meta.get("stores"),
            "departures": checkpoint_departures(ckpt, {}),  # the training's; the features' are in the metrics
        },
        "files": dict(files),
        "coopipe_version": coopipe.__version__,
    }
    if spec.image_conditional:
        assert head.prompt is not None
        record["text_path"] = dict(head.prompt.text_options)
        record["text_tower"] = (
            f"the text tower of {clip.name} with weights {clip.weights_id} (not included: load it with open_clip, "
            f"pretrained={head.pretrained!r})"
        )
    return record


# ---------------------------------------------------------------- reading
def read_record(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(folder, record) of an exported folder, its format and every file's hash checked."""
    folder, record = read_folder_record(path, RECORD_FILE, missing="not an export; write one with `coopipe export "
                                        "RUN DIR`", fix="export the run again")
    record_path = folder / RECORD_FILE
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise CheckpointError(f"{record_path} is not a coopipe export (format {found!r}, expected {EXPORT_FORMAT!r})")
    with fields_of(record_path, what="export record", fix="export the run again", error=CheckpointError):
        for name, want in dict(record.get("files") or {}).items():
            file = folder / name
            if not file.is_file():
                raise MissingFileError(f"{file} is missing from export {folder}; export the run again")
            if sha256_file(file) != want:
                raise CheckpointError(f"{file} does not match {record_path} (sha256 differs: modified or from another "
                                      f"export); export the run again")
    return folder, record


def load_export(path: str | os.PathLike[str]) -> Head:
    """The head of an exported folder (its files checked against the record)."""
    folder, record = read_record(path)
    with fields_of(folder / RECORD_FILE, what="export record", fix="export the run again", error=CheckpointError):
        model = record["model"]
        features = record["features"]
        common: dict[str, Any] = {"path": folder, "model": model["name"], "weights": model["weights"],
                                  "pretrained": model.get("pretrained"), "classnames": list(record["classnames"]),
                                  "precision": features["precision"], "dtype": features["dtype"]}
        if not record.get("image_conditional"):
            clf = load_classifier(folder / CLASSIFIER_FILE)
            if (clf.model, clf.weights, clf.classnames) != (common["model"], common["weights"], common["classnames"]):
                raise CheckpointError(f"{clf.path} does not match {folder / RECORD_FILE} (model, weights or classes); "
                                      f"export the run again")
            return Head(classifier=clf, **common)
        try:
            tensors = load_file(str(folder / PROMPT_FILE))
            spec = MethodSpec.from_dict(record["method"])
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"export {folder}: unreadable prompt ({exc}); export the run again") from exc
        options = {k: v for k, v in dict(record.get("text_path") or {}).items() if k in TEXT_PATH_OPTIONS}
        return Head(prompt=ImagePrompt(spec, tensors, options), **common)
