"""The method registry and the method record: what a prompt-learning method is, and which one a run trains.

Why: a method used to be defined three times (a record with every method's fields, mirrored fields in the
training config, and the report's own reading of run labels), and the copies drifted. Now a method is one module
(:mod:`coopipe.methods.coop`, :mod:`coopipe.methods.cocoop`, :mod:`coopipe.methods.rank`, or a file of your own)
defining a :class:`Method` and registering it with :func:`register`; everything else (the run label, the report's
readable names, the sweep's plan, the CLI's ``--method`` choices, checkpoints) asks the registry.

A :class:`MethodSpec` is a method's name plus its typed options (a frozen dataclass whose defaults are the
paper's setting). Its label names the method and only what departs from that setting (``coop``, ``coop_csc``,
``cocoop_m16``, ``rank_b5``); :meth:`MethodSpec.parse` reads a label back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from coopipe.errors import ParamsError

if TYPE_CHECKING:
    from torch import nn

    from coopipe.learners import FitData, Learner
    from coopipe.models import LoadedClip

__all__ = [
    "EPOCHS_BY_SHOTS",
    "IMAGENET_EPOCHS",
    "Method",
    "MethodSpec",
    "Optimization",
    "epochs_for",
    "get_method",
    "method_names",
    "register",
    "unregister",
]

EPOCHS_BY_SHOTS: dict[int, int] = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp's configs
IMAGENET_EPOCHS = 50  # CoOp trains ImageNet for 50 epochs at every number of shots
LABEL_SEP = "_"


def epochs_for(shots: int, dataset: str | None = None) -> int:
    """CoOp's number of epochs for ``shots`` images per class: 50 / 100 / 100 / 200 / 200; ImageNet 50.

    Shots between the listed values take the value of the next smaller listed one (e.g. 3 -> 100, 32 -> 200).
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ParamsError(f"shots must be a positive integer (CoOp uses 1, 2, 4, 8, 16), got {shots!r}")
    if dataset is not None and dataset.lower() == "imagenet":
        return IMAGENET_EPOCHS
    return EPOCHS_BY_SHOTS[max(k for k in EPOCHS_BY_SHOTS if k <= shots)]


@dataclasses.dataclass(frozen=True)
class Optimization:
    """The optimiser hyper-parameters a run gives its method (from :class:`coopipe.train_config.TrainConfig`)."""

    lr: float
    momentum: float
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


class Method:
    """One prompt-learning method. Subclass it in one module and :func:`register` an instance.

    Class attributes: ``name`` (the run label's head, ``[a-z0-9]+`` words joined by ``_``), ``title`` (the report's readable name),
    ``options`` (a frozen dataclass; its defaults are the paper's setting), ``image_conditional`` (the
    prompt depends on the image: no single K x D classifier), ``stackable`` (runs that differ in seed and shots
    may share one text pass: the learner implements the packed prompt interface), ``ordered_labels`` (the classes
    must be ranks, e.g. ages: training refuses other datasets), ``batch_size`` (the paper's), ``trains`` (False:
    a training-free method, e.g. Tip-Adapter, whose :meth:`prepare` fits everything: its runs have 0 epochs and no
    optimiser, and are saved, evaluated and reported like any other), ``fewshot`` (False: the method reads no
    training images, e.g. zero-shot CLIP: one run per dataset whatever the shots and seeds, needing only the class
    names), ``predicts_ages`` (the learner's ``predict_ages(features)`` gives ages in years directly, e.g. the ridge
    probe: age metrics come from them rather than from decoding the logits over ranks), ``paper``, ``learned``,
    ``head_tensors`` and ``inference`` (what an export's record and model card say the method is and computes).
    Override what differs from CoOp: :meth:`epochs`, :meth:`train_setting`, :meth:`optimizer`, the label parts,
    :meth:`build_learner`.
    The learner brings its loss (``learner.loss(logits, labels, step)``, which may read the batch's image features
    and the step's class text features) and its classifier export (``learner.class_text_features(encoder)``, see
    :mod:`coopipe.learners`). A method that starts from the data (a cache of the few-shot features, zero-shot
    text features for its loss) overrides :meth:`prepare`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    options: ClassVar[type] = NoOptions
    image_conditional: ClassVar[bool] = False
    stackable: ClassVar[bool] = False
    ordered_labels: ClassVar[bool] = False
    batch_size: ClassVar[int] = 32
    trains: ClassVar[bool] = True
    fewshot: ClassVar[bool] = True
    predicts_ages: ClassVar[bool] = False
    class_derived: ClassVar[tuple[str, ...]] = ()  # learner parameters computed from the class names (for_classes)
    # How an export describes the method (coopipe.export, coopipe.model_card): the method owns its words, so that a
    # card never describes one method's head with another's.
    paper: ClassVar[str] = ""  # the paper the model card credits ("": the title alone, e.g. a method of your own)
    learned: ClassVar[str] = "prompt"  # what a run learns, in the card's words ("adapter", "linear probe")
    head_tensors: ClassVar[str] = "the learner's tensors by name"  # an image-conditional export's prompt.safetensors
    inference: ClassVar[str] = (  # how an image-conditional export computes its logits (export.json, the card)
        "Image-conditional head: there is no fixed class matrix. prompt.safetensors holds the learner's tensors by "
        "name (learned and fitted); coopipe predict rebuilds the method's learner from them and the recorded model "
        "and computes the logits of each image's raw feature as the method's own code does."
    )

    # ---------------------------------------------------------------- the paper's setting
    def epochs(self, shots: int, dataset: str | None = None) -> int:
        """Epochs of the paper's setting for ``shots`` images per class (default: CoOp's schedule; 0 for a method
        that trains nothing)."""
        epochs = epochs_for(shots, dataset)  # validates shots
        return epochs if self.trains else 0

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        """The training options of the paper's setting (:class:`coopipe.train_config.TrainConfig` fields) that
        differ by method: epochs and batch size here; a method with its own optimiser settings adds them
        (``lr``, ``momentum``, ``weight_decay``, ``warmup_epoch``, ``warmup_lr``: e.g. CLAP's lr 0.1, OrdinalCLIP's
        no warm-up). The user's options override these."""
        setting: dict[str, Any] = {"max_epoch": self.epochs(shots, dataset), "batch_size": self.batch_size}
        return setting if self.trains else {**setting, "warmup_epoch": 0}

    def optimizer(self, params: Mapping[str, nn.Parameter], opt: Optimization) -> torch.optim.Optimizer:
        """The optimiser over the learner's named parameters (default: CoOp's SGD). The loop sets each group's
        ``lr`` every epoch from the run's schedule."""
        return torch.optim.SGD(list(params.values()), lr=opt.lr, momentum=opt.momentum,
                               weight_decay=opt.weight_decay, dampening=0.0, nesterov=False)

    def learner_optimizer(self, learner: Learner, opt: Optimization) -> torch.optim.Optimizer:
        """The optimiser of a prepared ``learner`` (called after :meth:`prepare`; default: :meth:`optimizer` over
        its trainable parameters by name). Override when the optimiser needs what :meth:`prepare` computed from
        the data (LP++'s step sizes)."""
        return self.optimizer({name: p for name, p in learner.named_parameters() if p.requires_grad}, opt)

    # ---------------------------------------------------------------- options
    def check(self, options: Any) -> list[str]:
        """Problems of ``options`` (one phrase each; empty when valid)."""
        return []

    def normalize(self, options: Any) -> Any:
        """The canonical form of ``options`` (equal prompts get equal records)."""
        return options

    def with_options(self, base: Any, given: Mapping[str, Any]) -> Any:
        """``base`` with the ``given`` options replaced (a method may tie options together, e.g. M and init words)."""
        return dataclasses.replace(base, **given)

    def resolve(self, options: Any, clip: LoadedClip) -> Any:
        """``options`` with what only the model knows filled in (default: unchanged). Called once per run before
        training, so that every record of the run holds the same numbers."""
        return options

    def transferable(self, options: Any) -> bool:
        """Whether a learned prompt can serve other class names (base-to-new, cross-dataset)."""
        return not self.image_conditional

    def transfer_refusal(self, options: Any) -> str:
        """Why ``options``' learned tensors cannot score other classes (asked only when :meth:`transferable` is
        False): the reason in the one-line error of base-to-new and cross-dataset runs."""
        return "its learned tensors are one per training class"

    # ---------------------------------------------------------------- labels
    def label_parts(self, options: Any) -> list[str]:
        """The label parts after the name: what departs from the paper's setting (inverse of :meth:`parse_part`)."""
        return []

    def parse_part(self, part: str) -> dict[str, Any]:
        """The options one label part names; :class:`ParamsError` when it names none."""
        raise ParamsError(f"{self.name} has no option written {part!r}")

    def readable_parts(self, options: Any) -> list[str]:
        """The report's words for what departs from the paper's setting (``CSC``, ``M=8``)."""
        return self.label_parts(options)

    # ---------------------------------------------------------------- the learner
    def prepare(self, learner: Learner, data: FitData) -> None:
        """Set ``learner`` up from the run's data, once per run before the first step (default: nothing).

        Called at every start of a run, a resumed one included, BEFORE the checkpoint's tensors are loaded: what it
        puts in parameters is overwritten by a resume, what it keeps elsewhere (zero-shot text features for a loss)
        must therefore be a deterministic function of ``data``. It sees the training and few-shot validation
        splits only, never the test split.
        """

    def for_classes(self, learner: Learner, clip: LoadedClip, template: str) -> None:
        """Fill the parameters listed in ``class_derived`` (computed from the class names, e.g. a zero-shot head) of
        ``learner`` rebuilt for classes it did not train on (base-to-new, transfer), with the target dataset's
        hand-crafted ``template`` (default: nothing)."""

    def record_fields(self, options: Any, tensors: Mapping[str, torch.Tensor], template: str) -> dict[str, Any]:
        """What a run's metrics record of what the method fitted or used, from its saved ``tensors`` by name and the
        evaluated dataset's hand-crafted ``template`` (default: nothing; the linear probe's C, zero-shot's
        prompts)."""
        return {}

    def finish(self, learner: Learner, data: FitData) -> None:
        """Complete ``learner`` after its last epoch, before it is saved (default: nothing): what a method fits on the
        trained learner (Tip-Adapter's alpha and beta, searched on the few-shot validation split). Sees what
        :meth:`prepare` sees; runs once per finished run (a training-free run: right after :meth:`prepare`)."""

    def departures(self, options: Any, dataset: str | None) -> list[str]:
        """How ``options`` on ``dataset`` depart from the paper's setting beyond the training config (default: not
        at all): a setting the paper publishes per dataset and not for this one (Tip-Adapter's search grid)."""
        return []

    def build_learner(
        self, options: Any, clip: LoadedClip, classnames: Sequence[str], *, generator: torch.Generator | None
    ) -> Learner:
        raise NotImplementedError


class _Registry:
    """Registered methods by name, in registration order (the report's order of methods)."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}


_REGISTRY = _Registry()


def register(method: Method) -> Method:
    """Make ``method`` known by its name (to labels, the CLI, the sweep and the report); returns it."""
    name = getattr(method, "name", "")
    if not isinstance(name, str) or not all(w.isalnum() and w.isascii() for w in name.split(LABEL_SEP)) \
            or name != name.lower():
        raise ParamsError(f"a method name must be lower-case letters and digits (words joined by '_'), got {name!r}")
    known = _REGISTRY.methods.get(name)
    if known is not None and type(known) is not type(method):
        raise ParamsError(f"method {name!r} is registered already ({type(known).__name__})")
    if not (dataclasses.is_dataclass(method.options) and method.options.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise ParamsError(f"method {name!r}: its options must be a frozen dataclass")
    _REGISTRY.methods[name] = method
    return method


def unregister(name: str) -> None:
    """Forget method ``name`` (a test's method, once the test is done)."""
    _REGISTRY.methods.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY.methods)


def get_method(name: str) -> Method:
    """The registered method ``name``; :class:`ParamsError` naming the known ones otherwise."""
    try:
        return _REGISTRY.methods[name]
    except KeyError:
        raise ParamsError(f"unknown method {name!r}; available: {', '.join(method_names())}") from None


def _label_head(label: str) -> str:
    """The registered method a label starts with: the longest name equal to the label or followed by ``_``
    (``linear_probe`` before a method ``linear``, whose label parts would follow it the same way)."""
    heads = [n for n in method_names() if label == n or label.startswith(n + LABEL_SEP)]
    if not heads:
        raise ParamsError(f"{label!r} is not a method label (it must start with one of {', '.join(method_names())})")
    return max(heads, key=len)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method and its options: with a model and class names, everything needed to build its learner."""

    method: str = "coop"
    options: Any = None  # the method's options dataclass; None: its paper setting

    def __post_init__(self) -> None:
        definition = get_method(self.method)
        options = definition.options() if self.options is None else self.options
        if not isinstance(options, definition.options):
            raise ParamsError(f"{self.method} options must be {definition.options.__name__}, got {options!r}")
        options = definition.normalize(options)
        problems = definition.check(options)
        if problems:
            raise ParamsError(f"invalid {self.method} method: " + "; ".join(problems))
        object.__setattr__(self, "options", options)

    def __getattr__(self, name: str) -> Any:
        """The method's options read as attributes: ``spec.n_ctx``, ``spec.csc``."""
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        try:
            return getattr(self.options, name)
        except AttributeError:
            raise AttributeError(f"{self.method} has no option {name!r}") from None

    # ---------------------------------------------------------------- construction
    @classmethod
    def of(cls, method: str = "coop", **options: Any) -> MethodSpec:
        """``method``'s paper setting with the given options (``None`` values keep the setting)."""
        definition = get_method(method)
        given = {k: v for k, v in options.items() if v is not None}
        known = {f.name for f in dataclasses.fields(definition.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ParamsError(f"{method} has no option(s) {', '.join(unknown)}; its options: "
                              f"{', '.join(sorted(known)) or 'none'}")
        return cls(method, definition.with_options(definition.options(), given))

    def with_options(self, **options: Any) -> MethodSpec:
        """This spec with the given options changed (``None`` values keep them)."""
        given = {k: v for k, v in options.items() if v is not None}
        known = {f.name for f in dataclasses.fields(self.definition.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ParamsError(f"{self.method} has no option(s) {', '.join(unknown)}; its options: "
                              f"{', '.join(sorted(known)) or 'none'}")
        return MethodSpec(self.method, self.definition.with_options(self.options, given))

    @property
    def definition(self) -> Method:
        return get_method(self.method)

    @property
    def image_conditional(self) -> bool:
        """Whether the prompt depends on the image (CoCoOp): then no single K x D classifier exists."""
        return self.definition.image_conditional

    @property
    def transferable(self) -> bool:
        """Whether the learned prompt can serve other class names."""
        return self.definition.transferable(self.options)

    def transfer_refusal(self) -> str:
        """Why it cannot (see :meth:`Method.transfer_refusal`)."""
        return self.definition.transfer_refusal(self.options)

    def paper_epochs(self, shots: int, dataset: str | None = None) -> int:
        return self.definition.epochs(shots, dataset)

    def resolve(self, clip: LoadedClip) -> MethodSpec:
        return MethodSpec(self.method, self.definition.resolve(self.options, clip))

    def build_learner(
        self, clip: LoadedClip, classnames: Sequence[str], *, generator: torch.Generator | None = None
    ) -> Learner:
        """A fresh learner for this spec on ``clip``'s text tower device, initialised from ``generator``."""
        return self.definition.build_learner(self.options, clip, classnames, generator=generator)

    # ---------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodSpec:
        """Read a record written by :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, Mapping) or "method" not in data:
            raise ParamsError(f"a method record must be a mapping with a 'method' key, got {data!r}")
        definition = get_method(str(data["method"]))
        values = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(definition.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParamsError(f"{data['method']} has no option(s) {', '.join(unknown)}")
        return cls(definition.name, definition.options(**values))

    def label(self) -> str:
        """The run-folder label: the method, then only what departs from its paper setting."""
        return LABEL_SEP.join([self.method, *self.definition.label_parts(self.options)])

    @classmethod
    def parse(cls, label: str) -> MethodSpec:
        """The spec a label names (the inverse of :meth:`label`)."""
        head = _label_head(label)
        rest = label[len(head) + 1:].split(LABEL_SEP) if len(label) > len(head) else []
        definition = get_method(head)
        given: dict[str, Any] = {}
        for part in rest:
            try:
                given.update(definition.parse_part(part))
            except ParamsError:
                raise ParamsError(f"cannot read {part!r} in method label {label!r}") from None
        spec = cls(head, definition.with_options(definition.options(), given))
        if spec.label() != label:
            raise ParamsError(f"{label!r} is not a canonical method label (that spec is labelled {spec.label()!r})")
        return spec

    def readable(self) -> str:
        """The report's name: ``CoOp (CSC, middle)``, ``Rank prompts (OrdinalCLIP) (5 base ranks)``."""
        parts = self.definition.readable_parts(self.options)
        return f"{self.definition.title} ({', '.join(parts)})" if parts else self.definition.title

    def __str__(self) -> str:
        return self.label()

