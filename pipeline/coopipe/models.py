"""Load CLIP-style open_clip models and pin down the identity of their weights.

``pretrained`` is one of:
- an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...): downloaded through open_clip exactly as open_clip
  does (its hub cache included); identity ``open_clip:<model>/<tag>``, built with the activation the weights were
  trained with (see :func:`tag_forces_quick_gelu`);
- a path to a local checkpoint file: loaded by open_clip's own checkpoint loader; identity ``sha256:<hex>``; the
  model name decides the activation (``ViT-B-32-quickgelu`` for OpenAI's weights). A TorchScript archive (OpenAI's
  released ``.pt`` files) is refused with how to convert it, detected without running its code;
- ``none``: random weights drawn from a fixed init seed, so every process (dask workers included) builds the
  same model; identity ``random-init:seed=<seed>``. Only useful for pipeline checks and tests.

A model name is an open_clip architecture (``RN50``, ``ViT-B-32``, ...) or, as open_clip defines them, a name that
carries its own config and weights: ``hf-hub:org/repo`` (the Hugging Face Hub; identity
``hf-hub:org/repo@<revision>``, the commit of the cached snapshot) or ``local-dir:/path`` (a folder written by
open_clip's ``save_for_hf``; identity ``local-dir:<weights file>@sha256:<hex>``). For those, ``pretrained`` is
``none`` (random weights of their config) or anything else for the weights that come with the name (recorded as
``bundled``). Offline, a Hub name that is not in the local Hub cache fails in seconds with one line.

Everything built from a model records :attr:`LoadedClip.weights_id`, so a store or checkpoint made with one set
of weights is never silently reused with another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coopipe.compat import import_open_clip
from coopipe.errors import ParamsError, WeightsError
from coopipe.model_support import config_activation, text_path_support, unsupported_reason

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
_HUB_HOST = ("huggingface.co", 443)
SCHEMES = ("hf-hub", "local-dir")  # open_clip's model-name schemes (``open_clip.factory.parse_model_name``)
BUNDLED = "bundled"  # ``pretrained`` of a scheme name whose weights come with it
_CONFIG_FILE = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order on the Hub
QUICK_GELU_MARK = "+quickgelu"


@dataclass(frozen=True)
class WeightsRef:
    """Where weights come from: ``kind`` is ``tag``, ``file``, ``none``, ``hf-hub`` or ``local-dir``."""

    kind: str
    value: str
    identity: str


@dataclass(frozen=True)
class PreprocessConfig:
    """The image preprocessing a model expects (recorded in every store)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


@dataclass(frozen=True)
class ClipIdentity:
    """What a feature store records of a model (name, weights identity, preprocessing), plus whether its image tower
    is convolutional (the precision rule needs it): enough to find a finished store without building the model."""

    name: str
    weights_id: str
    preprocess: PreprocessConfig
    conv_tower: bool


def is_conv_model(model_name: str) -> bool:
    """Whether open_clip's ``model_name`` has a non-transformer image tower (ModifiedResNet or timm), from its config
    alone: the same answer as ``not hasattr(model.visual, "transformer")`` on the built model."""
    config = model_config(model_name) or {}
    vision = config.get("vision_cfg", {})
    return isinstance(vision.get("layers"), (list, tuple)) or bool(vision.get("timm_model_name"))


@dataclass
class LoadedClip:
    """A frozen open_clip model plus what is needed to use and identify it."""

    model: Any  # open_clip.model.CLIP (or CustomTextCLIP)
    name: str
    weights: WeightsRef
    preprocess: PreprocessConfig
    tokenizer: Any = field(repr=False)

    @property
    def weights_id(self) -> str:
        return self.weights.identity

    @property
    def identity(self) -> ClipIdentity:
        conv = not hasattr(self.model.visual, "transformer")
        return ClipIdentity(self.name, self.weights_id, self.preprocess, conv)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])


def sha256_file(path: str | os.PathLike[str], *, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def model_scheme(model_name: str) -> tuple[str | None, str]:
    """(``hf-hub``, ``local-dir`` or None, the rest of the name), as open_clip parses a model name."""
    for scheme in SCHEMES:
        if model_name.startswith(scheme + ":"):
            return scheme, model_name[len(scheme) + 1 :]
    return None, model_name


def _hub_file(repo: str, filename: str) -> Path:
    """A file of Hub repo ``repo`` from the local Hub cache (offline) or the Hub, in seconds or a one-line error."""
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        raise WeightsError(
            f"model hf-hub:{repo} needs the Hugging Face Hub, which is unreachable (no network); set HF_HUB_OFFLINE=1 "
            f"if it is in the local Hub cache, or save it into a folder and use local-dir:PATH"
        )
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (not cached, no such repo, HTTP)
        where = "in the local Hub cache (HF_HUB_OFFLINE=1)" if offline else "on the Hub"
        raise WeightsError(
            f"model hf-hub:{repo}: {filename} is not {where} ({type(exc).__name__}); download it once online, or "
            f"use local-dir:PATH"
        ) from None


def _scheme_weights(model_name: str, pretrained: str) -> WeightsRef:
    """The weights of an ``hf-hub:`` or ``local-dir:`` name: random (``none``) or the ones that come with it."""
    scheme, rest = model_scheme(model_name)
    random = pretrained.lower() in {"none", "random", ""}
    if scheme == "local-dir":
        folder = Path(rest).expanduser()
        if not (folder / _CONFIG_FILE).is_file():
            raise WeightsError(
                f"model {model_name}: {folder} holds no {_CONFIG_FILE}; give a folder written by open_clip's "
                f"save_for_hf (open_clip.push_to_hf_hub), or an open_clip model name"
            )
        if random:
            return WeightsRef("none", "none", f"random-init:seed={RANDOM_INIT_SEED}")
        from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself loads from the folder

        found = _find_checkpoint_in_dir(folder)
        if found is None:
            raise WeightsError(f"model {model_name}: no weights file (*.safetensors, *.bin, *.pth) in {folder}; "
                               f"save the model with its weights, or pass --pretrained none for random weights")
        return WeightsRef("local-dir", BUNDLED, f"local-dir:{Path(found).name}@sha256:{sha256_file(found)}")
    _hub_file(rest, _CONFIG_FILE)
    if random:
        return WeightsRef("none", "none", f"random-init:seed={RANDOM_INIT_SEED}")
    problems = []
    for name in _HUB_WEIGHTS:
        try:
            path = _hub_file(rest, name)
        except WeightsError as exc:
            problems.append(str(exc))
            continue
        return WeightsRef("hf-hub", BUNDLED, f"hf-hub:{rest}@{path.parent.name}")  # .../snapshots/<revision>/file
    raise WeightsError(problems[0])


def model_config(model_name: str) -> dict[str, Any] | None:
    """open_clip's model config of ``model_name`` (a scheme name's from its ``open_clip_config.json``), or None."""
    scheme, rest = model_scheme(model_name)
    if scheme is None:
        return import_open_clip().get_model_config(model_name)  # type: ignore[no-any-return]
    path = Path(rest).expanduser() / _CONFIG_FILE if scheme == "local-dir" else _hub_file(rest, _CONFIG_FILE)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8 or not JSON
        raise WeightsError(f"model {model_name}: cannot read {path} ({exc}); save the model again") from exc
    return dict(config.get("model_cfg", config)) if isinstance(config, dict) else None


def check_model_name(model_name: str) -> None:
    """Raise one line unless ``model_name`` names a model: an open_clip architecture, an existing ``local-dir:``
    folder or an ``hf-hub:org/repo`` name; then unless the exact prompt text path supports it."""
    scheme, rest = model_scheme(model_name)
    if scheme is None and model_name not in import_open_clip().list_models():
        raise WeightsError(
            f"unknown open_clip model {model_name!r}; pick one of `coopipe models` (e.g. RN50, ViT-B-32, ViT-B-16), "
            f"or hf-hub:ORG/REPO, or local-dir:PATH"
        )
    if scheme == "local-dir" and not Path(rest).expanduser().is_dir():
        raise WeightsError(f"model {model_name}: folder {rest} does not exist; give a folder written by open_clip's "
                           f"save_for_hf")
    if scheme == "hf-hub" and rest.count("/") != 1:
        raise WeightsError(f"model {model_name}: expected hf-hub:ORG/REPO")
    reason = unsupported_reason(model_name, model_config(model_name))
    if reason is not None:
        raise ParamsError(reason)


def describe_model(model_name: str) -> str:
    """One line on ``model_name`` (an architecture or a scheme name): supported or why not, and its activation."""
    scheme, _ = model_scheme(model_name)
    if scheme is None and model_name not in import_open_clip().list_models():
        return f"{model_name}: unknown; `coopipe models` lists the open_clip architectures"
    config = model_config(model_name)
    support = text_path_support(config)
    mark = "yes" if support.supported else f"no: {support.reason}"
    return f"{model_name}: {mark}; text activation {config_activation(config)} (as configured)"


def resolve_weights(model_name: str, pretrained: str | None) -> WeightsRef:
    """Classify ``pretrained`` as tag, file or none and compute its identity (without loading anything)."""
    value = (pretrained or "none").strip()
    if model_scheme(model_name)[0] is not None:
        return _scheme_weights(model_name, value)
    if value.lower() in {"none", "random", ""}:
        return WeightsRef("none", "none", f"random-init:seed={RANDOM_INIT_SEED}")
    path = Path(value).expanduser()
    looks_like_path = path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or os.sep in value
    if path.is_file():
        refuse_torchscript(path, model_name)
        return WeightsRef("file", str(path.resolve()), f"sha256:{sha256_file(path)}")
    if looks_like_path:
        raise WeightsError(
            f"checkpoint file {value} does not exist; give an existing local checkpoint path, an open_clip "
            f"pretrained tag (e.g. 'openai'), or 'none' for random weights"
        )
    open_clip = import_open_clip()
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if value not in tags:
        raise WeightsError(
            f"open_clip has no pretrained tag {value!r} for model {model_name}; known tags: "
            f"{', '.join(tags) or '(none)'}; or give a local checkpoint path, or 'none'"
        )
    return WeightsRef("tag", value, tag_identity(model_name, value))


# ---------------------------------------------------------------- the activation the weights were trained with
def tag_forces_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether ``model_name`` must be built with QuickGELU to match the weights of ``tag``.

    Why: OpenAI trained CLIP with QuickGELU (``x * sigmoid(1.702 x)``); open_clip's ``RN50``, ``ViT-B-32``, ...
    configs use ``nn.GELU`` and, given the ``openai`` tag, only warn about the mismatch, so the model they build is
    not CLIP (image features of ViT models and text features of every model drift). open_clip's own pretrained
    table says which tags were trained with QuickGELU; a ``-quickgelu`` model name already builds it.
    """
    open_clip = import_open_clip()
    tag_quick = bool((open_clip.get_pretrained_cfg(model_name, tag) or {}).get("quick_gelu", False))
    name_quick = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    return tag_quick and not name_quick


def tag_identity(model_name: str, tag: str) -> str:
    """``open_clip:<model>/<tag>``, marked ``+quickgelu`` when the tag forces QuickGELU onto a GELU model name.

    The mark keeps features encoded before the activation was fixed (same model name and tag, built with GELU) from
    ever matching those of the model built now: store keys, checkpoints and engines all compare this identity.
    """
    mark = QUICK_GELU_MARK if tag_forces_quick_gelu(model_name, tag) else ""
    return f"open_clip:{model_name}/{tag}{mark}"


def tag_of_identity(weights_id: str) -> str | None:
    """The open_clip tag an ``open_clip:<model>/<tag>[+quickgelu]`` identity was loaded from (None for others)."""
    kind, _, rest = weights_id.partition(":")
    if kind != "open_clip" or "/" not in rest:
        return None
    return rest.split("/", 1)[1].removesuffix(QUICK_GELU_MARK)


def activation_of(model: Any) -> str:
    """``QuickGELU`` or ``GELU``: the activation the built model's text transformer runs (what the weights must
    match), read from its modules; ``unknown`` for a tower with neither."""
    tower = getattr(model, "transformer", None)
    if tower is None and hasattr(model, "text"):
        tower = getattr(model.text, "transformer", None)
    for module in (tower.modules() if isinstance(tower, torch.nn.Module) else ()):
        if type(module).__name__ == "QuickGELU":
            return "QuickGELU"
        if isinstance(module, torch.nn.GELU):
            return "GELU"
    return "unknown"


# ---------------------------------------------------------------- TorchScript archives
def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript zip (it holds ``code/`` or ``constants.pkl``), read from the zip's table of
    contents only: its code is never run (``torch.jit.load`` would execute it)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def refuse_torchscript(path: Path, model_name: str) -> None:
    """One line saying how to use a TorchScript archive (OpenAI's released ``.pt`` files are TorchScript)."""
    if not is_torchscript_archive(path):
        return
    quick = model_name if model_name.endswith("-quickgelu") else f"{model_name}-quickgelu"
    raise WeightsError(
        f"checkpoint file {path} is a TorchScript archive (as OpenAI's released CLIP files are); coopipe does not run "
        f"code from files: use --pretrained openai (the same weights as a state dict), or convert it once with "
        f"`torch.save(open_clip.load_openai_model('{path}', device='cpu').state_dict(), 'clip.pt')` and pass "
        f"--model {quick} --pretrained clip.pt (OpenAI's weights need QuickGELU)"
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _preprocess_config(model: Any) -> PreprocessConfig:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        size = size[0]
    mean = tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    return PreprocessConfig(
        image_size=int(size),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def check_weights_available(model_name: str, pretrained: str | None) -> WeightsRef:
    """Check the model name (known, supported by the text path), resolve ``pretrained`` and fail fast (seconds,
    never a hang) if a tag or Hub name would need an unreachable hub."""
    check_model_name(model_name)
    ref = resolve_weights(model_name, pretrained)
    if ref.kind == "tag" and os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_reachable():
        raise WeightsError(
            f"pretrained weights {model_name}/{ref.value} must be downloaded but the model hub is unreachable "
            f"(no network). Set `pretrained` to a local checkpoint file, or `pretrained: none` for a "
            f"random-weights pipeline check (or HF_HUB_OFFLINE=1 if the weights are already in the hub cache)"
        )
    return ref


def load_clip(model_name: str = "RN50", pretrained: str | None = "none", *, device: str = "cpu") -> LoadedClip:
    """Build ``model_name`` with the given weights, frozen and in eval mode.

    Raises :class:`WeightsError` quickly (never hangs) when a pretrained tag needs a download and the model hub is
    unreachable, saying what to set instead.
    """
    open_clip = import_open_clip()
    ref = check_weights_available(model_name, pretrained)
    scheme = model_scheme(model_name)[0]
    try:
        if ref.kind == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(model_name, pretrained=None, device=device, load_weights=False)
        else:  # a scheme name loads the weights that come with it; an openai tag loads with QuickGELU
            quick = ref.kind == "tag" and tag_forces_quick_gelu(model_name, ref.value)
            model = open_clip.create_model(
                model_name, pretrained=None if scheme else ref.value, device=device, force_quick_gelu=quick
            )
    except Exception as exc:  # noqa: BLE001 - torch.load of a non-checkpoint raises anything (IndexError, ...)
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if reason.startswith("Weights only load failed"):
            reason = "the file holds objects other than tensors"
        raise WeightsError(
            f"could not load weights {ref.value!r} into {model_name}: not a usable checkpoint ({reason[:120]}); "
            f"pass an open_clip {model_name} checkpoint (a state dict), a pretrained tag, or none"
        ) from exc
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    if ref.kind == "none":
        logger.warning(
            "%s has RANDOM weights (pretrained=none): its features carry no class signal, so accuracies only check "
            "that the pipeline runs; use --pretrained openai (or a checkpoint file) for real numbers", model_name
        )
    logger.info("loaded %s (%s, %s)", model_name, ref.identity, activation_of(model))
    return LoadedClip(model=model, name=model_name, weights=ref, preprocess=_preprocess_config(model), tokenizer=tokenizer)


def open_clip_version() -> str:
    return str(import_open_clip().__version__)
