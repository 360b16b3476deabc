"""The method seam: one typed record of a prompt-learning method and its variant.

Every layer that needs to know *which* prompt was learned (training, checkpoints, evaluation, transfer,
interpretation, the report, the sweep and the shell scripts) goes through :class:`MethodSpec`: it is written
into each checkpoint, it gives a run folder its label (``coop``, ``coop_csc_middle``, ``cocoop_init-a-photo-of-a``,
...), and :meth:`MethodSpec.parse` reads a label back. Why: before this record existed, a variant was a free-form
dict rebuilt by hand in four places and its label was computed in Python, bash and the report separately.

Methods:

- ``coop`` (Zhou et al., IJCV 2022): learned context, unified or class-specific (CSC), class token at the end,
  middle or front; random init (M = ``n_ctx``) or from words (M = their token count).
- ``cocoop`` (Zhou et al., CVPR 2022): unified context plus a Meta-Net whose output is added to every context
  token; class token at the end.
- ``rank`` (OrdinalCLIP, Li et al., NeurIPS 2022): unified context plus ``n_base_ranks`` learned rank
  embeddings, linearly interpolated to every rank (class); class token at the end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from coopipe.errors import ParamsError

__all__ = ["CLASS_TOKEN_POSITIONS", "METHODS", "MethodSpec", "PAPER_N_CTX"]

METHODS = ("coop", "cocoop", "rank")
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PAPER_N_CTX = 16  # CoOp's default M; labels leave it out
COCOOP_CTX_INIT = "a photo of a"  # CoCoOp's reference setting (vit_b16_c4_ep10_batch1_ctxv1)
RANK_BASE_RANKS = 3  # OrdinalCLIP's config
PAPER_EPOCHS = {"cocoop": 10, "rank": 100}  # CoCoOp's vit_b16_c4_ep10 config; OrdinalCLIP's configs
_INIT_SEP = "-"


@dataclass(frozen=True)
class MethodSpec:
    """A prompt method and its variant: everything needed (with a model and class names) to rebuild a learner."""

    method: str = "coop"
    n_ctx: int = PAPER_N_CTX
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = "end"
    n_base_ranks: int = RANK_BASE_RANKS  # rank prompts only

    def __post_init__(self) -> None:
        if self.ctx_init is not None and str(self.ctx_init).strip():
            # M follows the init words (the learner counts their tokens); record the word count so that equal
            # prompts have equal records
            object.__setattr__(self, "ctx_init", " ".join(str(self.ctx_init).replace("_", " ").split()))
            object.__setattr__(self, "n_ctx", len(self.ctx_init.split()))
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            problems.append(f"n_ctx must be a positive integer (got {self.n_ctx!r})")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            problems.append(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS} (got {self.class_token_position!r})")
        if self.ctx_init is not None and not str(self.ctx_init).strip():
            problems.append("ctx_init is empty; give words such as 'a photo of a', or leave it out for random init")
        if self.method != "coop" and (self.csc or self.class_token_position != "end"):
            problems.append(f"{self.method} supports only a unified context with the class token at the end")
        if self.method == "rank" and self.n_base_ranks < 2:
            problems.append(f"n_base_ranks must be >= 2 (got {self.n_base_ranks})")
        if problems:
            raise ParamsError("invalid method: " + "; ".join(problems))

    # ---------------------------------------------------------------- construction
    @classmethod
    def default(cls, method: str) -> MethodSpec:
        """The paper's setting of ``method`` (CoCoOp: M = 4 from "a photo of a")."""
        if method == "cocoop":
            return cls(method="cocoop", n_ctx=4, ctx_init=COCOOP_CTX_INIT)
        return cls(method=method)

    @classmethod
    def from_options(cls, method: str = "coop", **options: Any) -> MethodSpec:
        """``method``'s paper setting with the given options (``None`` values keep the setting)."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ParamsError(f"unknown method option(s) {', '.join(sorted(unknown))}")
        base = cls.default(method)
        if "n_ctx" in given and "ctx_init" not in given and base.ctx_init is not None:
            given["ctx_init"] = None  # an explicit M means random init of that length
        return replace(base, **given)

    @property
    def unified(self) -> bool:
        return not self.csc

    @property
    def image_conditional(self) -> bool:
        """Whether the prompt depends on the image (CoCoOp): then no single K x D classifier exists."""
        return self.method == "cocoop"

    @property
    def transferable(self) -> bool:
        """Whether the learned prompt can serve other class names (CSC contexts belong to their classes)."""
        return not self.csc and self.method != "rank"

    def paper_epochs(self, shots: int, dataset: str | None = None) -> int:
        """The epochs of the method's paper setting: CoOp's 50/100/100/200/200 by shots (ImageNet 50), CoCoOp's 10,
        OrdinalCLIP's 100."""
        if self.method in PAPER_EPOCHS:
            return PAPER_EPOCHS[self.method]
        from coopipe.train import epochs_for  # the CoOp schedule lives with the training loop

        return epochs_for(shots, dataset)

    def normalized_init(self) -> str | None:
        return " ".join(self.ctx_init.replace("_", " ").split()) if self.ctx_init else None

    # ---------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodSpec:
        """Read a record written by :meth:`to_dict` (or a pre-seam checkpoint's ``variant``: CoOp)."""
        if not isinstance(data, Mapping):
            raise ParamsError(f"a method record must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values)

    def label(self) -> str:
        """The run-folder label: the method, then only what departs from its paper setting.

        ``coop``; ``coop_csc``; ``coop_middle``; ``coop_m8``; ``coop_init-a-photo-of-a``; ``cocoop``; ``cocoop_m16``;
        ``rank``; ``rank_b5``. :meth:`parse` reads it back.
        """
        base = MethodSpec.default(self.method)
        parts = [self.method]
        if self.csc:
            parts.append("csc")
        if self.class_token_position != "end":
            parts.append(self.class_token_position)
        init = self.normalized_init()
        if init != base.normalized_init():
            if init:
                parts.append("init" + _INIT_SEP + _INIT_SEP.join(init.split()))
            elif self.n_ctx != PAPER_N_CTX or base.ctx_init is not None:
                parts.append(f"m{self.n_ctx}")
        elif init is None and self.n_ctx != base.n_ctx:
            parts.append(f"m{self.n_ctx}")
        if self.method == "rank" and self.n_base_ranks != RANK_BASE_RANKS:
            parts.append(f"b{self.n_base_ranks}")
        return "_".join(parts)

    @classmethod
    def parse(cls, label: str) -> MethodSpec:
        """The spec a label names (the inverse of :meth:`label` for every spec; words of an init are kept)."""
        head, *rest = label.split("_")
        if head not in METHODS:
            raise ParamsError(f"{label!r} is not a method label (it must start with one of {', '.join(METHODS)})")
        options: dict[str, Any] = {}
        for part in rest:
            if part == "csc":
                options["csc"] = True
            elif part in CLASS_TOKEN_POSITIONS:
                options["class_token_position"] = part
            elif part.startswith("init" + _INIT_SEP):
                options["ctx_init"] = " ".join(part.split(_INIT_SEP)[1:])
            elif re.fullmatch(r"m[1-9][0-9]*", part):
                options["n_ctx"] = int(part[1:])
                options["ctx_init"] = None
            elif re.fullmatch(r"b[1-9][0-9]*", part):
                options["n_base_ranks"] = int(part[1:])
            else:
                raise ParamsError(f"cannot read {part!r} in method label {label!r}")
        spec = replace(cls.default(head), **options)
        if spec.label() != label:
            raise ParamsError(f"{label!r} is not a canonical method label (that spec is labelled {spec.label()!r})")
        return spec

    def __str__(self) -> str:
        return self.label()
