"""The model card (``README.md``) of an exported classifier: the metadata block the Hugging Face Hub reads, then what
the prompt is, how it was trained, what it scored, how it departs from the paper's setting and how to use it.

Why generated from the records only: a card is read as a claim. Every figure and every departure in it comes from
the run's own files (``prompt.json`` through the export record, ``metrics*.json`` as ``coopipe eval`` wrote them),
so a card never states more than the run shows; a run that was never evaluated says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from coopipe.methods import MethodSpec
from coopipe.report.records import departures

__all__ = ["card_departures", "model_card"]


def card_departures(record: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """How the run departs from its method's paper setting, as far as its records state it: what `coopipe eval`
    wrote into the metrics (:mod:`coopipe.departures`), else what the export computed from the checkpoint, plus the
    prompt variant and the class subset."""
    model, source = record["model"], record["source"]
    spec = MethodSpec.from_dict(record["method"])
    named = [d for data in metrics.values() for d in [*departures(data), *(data.get("departures") or ())]]
    named += departures({"weights": model["weights"], "epochs": source.get("max_epoch"),
                         "paper_epochs": source.get("paper_epochs")})
    found = list(dict.fromkeys([*named, *(source.get("departures") or ())]))  # each once, in order
    paper = MethodSpec.of(spec.method).label()
    if spec.label() != paper:
        found.append(f"prompt variant {spec.label()} (paper default {paper})")
    if source.get("classes") not in (None, "all"):
        found.append(f"trained on the {source['classes']} half of the classes (base-to-new protocol)")
    return found


def _front_matter(record: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]]) -> str:
    source = record["source"]
    dataset = source.get("dataset") or "unknown"
    spec = MethodSpec.from_dict(record["method"])
    results = []
    for name, data in metrics.items():
        values = [{"type": "accuracy", "value": round(float(data["accuracy"]), 6), "name": f"accuracy ({name})"}] \
            if "accuracy" in data else []
        if "mae_exp" in data:
            values.append({"type": "mae", "value": round(float(data["mae_exp"]), 6), "name": "MAE (expectation)"})
        if values:
            results.append({"task": {"type": "image-classification"},
                            "dataset": {"name": str(data.get("dataset", dataset)), "type": str(data.get("dataset", dataset)),
                                        "split": str(data.get("split", "test"))},
                            "metrics": values})
    meta: dict[str, Any] = {
        "library_name": "coopipe",
        "pipeline_tag": "image-classification",
        "tags": ["clip", "open_clip", "prompt-learning", spec.method],
        "datasets": [dataset],
        "metrics": ["accuracy"],
    }
    if results:
        meta["model-index"] = [{"name": f"{spec.label()}-{record['model']['name']}-{dataset}", "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _create_args(model: Mapping[str, Any]) -> str:
    """The arguments of ``open_clip.create_model`` that rebuild the recorded model: its weights, and QuickGELU
    where the export ran it (open_clip builds a non ``-quickgelu`` name with GELU unless forced)."""
    name, pretrained = str(model["name"]), model.get("pretrained")
    args = [repr(name)]
    if pretrained not in (None, "none", "bundled") and not name.startswith(("hf-hub:", "local-dir:")):
        args.append(f"pretrained={pretrained!r}")
    if pretrained == "none":
        args.append("load_weights=False")
    if model.get("activation") == "QuickGELU":
        args.append("force_quick_gelu=True")
    return ", ".join(args)


def _metrics_lines(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not metrics:
        return ["The run was not evaluated (no metrics.json): run `coopipe eval RUN` before exporting to record "
                "its test metrics here."]
    lines = ["| file | split | classes | n | accuracy | macro-F1 | MAE (exp.) |", "|---|---|---|---|---|---|---|"]
    for name, data in metrics.items():
        def fmt(key: str, scale: float = 100.0, digits: int = 2) -> str:
            value = data.get(key)
            return f"{scale * float(value):.{digits}f}" if isinstance(value, (int, float)) else "-"

        lines.append(f"| {name} | {data.get('split', '-')} | {data.get('classes', 'all')} | {data.get('n', '-')} | "
                     f"{fmt('accuracy')}% | {fmt('macro_f1')}% | {fmt('mae_exp', 1.0)} |")
    return lines


def model_card(record: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]], *, onnx: bool = False) -> str:
    """The card's Markdown for an export ``record`` (see :func:`coopipe.export.build_record`) and the run's metrics."""
    model, source, features = record["model"], record["source"], record["features"]
    spec = MethodSpec.from_dict(record["method"])
    classes = record["classnames"]
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    found = card_departures(record, metrics)
    method = spec.definition  # the method's own words: its paper, what it learns, what its head holds
    head = f"`prompt.safetensors` ({method.head_tensors}: image-conditional, no fixed class matrix)" \
        if record["image_conditional"] else "`classifier.safetensors` (K x D class text features and logit scale)"
    lines = [
        _front_matter(record, metrics),
        f"# {spec.label()} {method.learned} for {model['name']} on {source.get('dataset')}",
        "",
        f"A {method.learned} {'learned' if method.trains else 'fitted'} with {method.paper or method.title} by coopipe, exported from `{source['run']}`.",
        "",
        "## What it is",
        "",
        f"- method and variant: `{spec.label()}` ({', '.join(f'{k}={v}' for k, v in spec.to_dict().items() if v is not None)})"
        + (f"; setting of {source['variant']['setting']}" if "setting" in (source.get("variant") or {}) else ""),
        f"- model: `{model['name']}`, weights `{model['weights']}` (load with pretrained=`{model['pretrained']}`), "
        f"text activation {model['activation']}",
        f"- dataset: {source.get('dataset')}, "
        + (f"{source.get('shots')} shots per class, seed {source.get('seed')}, " if method.fewshot else "")
        + f"classes: {source.get('classes')}; "
        + (f"trained {source.get('epoch')} epochs" if method.trains else "training-free (fitted once to the few-shot splits)"
           if method.fewshot else "training-free (no training image: the class names alone)"),
        f"- classes ({len(classes)}): {shown}",
        f"- head: {head}",
        f"- preprocessing: {record['preprocess']['view']}; image_size {record['preprocess']['image_size']}, "
        f"{record['preprocess']['interpolation']} resize, mean {record['preprocess']['mean']}, "
        f"std {record['preprocess']['std']}",
        f"- features: the image tower at {features['precision']}, stored as {features['dtype']} (as the training "
        f"features were)",
        "",
        "## Metrics",
        "",
        *_metrics_lines(metrics),
        "",
        "## Departures from the paper's setting",
        "",
        *([f"- {d}" for d in found] or ["None recorded."]),
        "",
        "## How to use it",
        "",
        "```bash",
        "coopipe predict THIS_FOLDER photos/ --topk 3            # files, folders or a CSV/JSON manifest",
        "coopipe predict THIS_FOLDER photos/ --out predictions.csv",
        "```",
        "",
        record["inference"],
    ]
    if not record["image_conditional"]:
        lines += [
            "",
            "```python",
            "import open_clip, torch",
            "from safetensors.torch import load_file",
            "head = load_file('classifier.safetensors')  # text_features (K, D), logit_scale",
            f"model = open_clip.create_model({_create_args(model)})",
            "feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # images preprocessed as above",
            "probs = (head['logit_scale'].exp() * feats @ head['text_features'].T).softmax(dim=-1)",
            "```",
            "",
            "Class names are in `export.json` (`classnames`) and in the safetensors metadata.",
        ]
    if onnx:
        lines += [
            "",
            "Without PyTorch: `model.onnx` maps a preprocessed float32 batch `x` (B, 3, S, S) to class "
            "probabilities `probs` (B, K), image tower at fp32"
            + (f" (the whole image-conditional head: {method.head_tensors})" if record["image_conditional"] else "")
            + ":",
            "",
            "```python",
            "import onnxruntime",
            "probs = onnxruntime.InferenceSession('model.onnx').run(['probs'], {'x': batch})[0]",
            "```",
        ]
    return "\n".join(lines) + "\n"
