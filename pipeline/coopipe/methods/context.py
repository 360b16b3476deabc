"""The learned context every prompt method shares: M tokens drawn at random, or initialised from words.

Why one module: CoOp, CoCoOp and the rank prompts all take the options ``n_ctx`` (M) and ``ctx_init`` (init
words), label them the same way (``m8``, ``init-a-photo-of-a``) and count M the same way: they subclass
:class:`ContextMethod`. M is counted in
**tokens** everywhere: with init words it is their token count under the model's tokenizer (what the learner
learns), filled in by :func:`resolve_n_ctx` once per run, so the checkpoint's method record, its training config
and the learner's record hold one number ("age estimation: the age of the person is" is 10 tokens, 8 words).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Protocol

from coopipe.methods.registry import Method
from coopipe.models import LoadedClip
from coopipe.prompt import _tokenize
from coopipe.text_tower import resolve_text_tower

__all__ = ["ContextMethod", "ContextOptions", "context_parts", "context_problems", "normalize_init", "parse_context_part",
           "readable_context_parts", "resolve_n_ctx", "tie_context"]

PAPER_N_CTX = 16  # CoOp's default M
INIT = "init"
_INIT_SEP = "-"


class ContextOptions(Protocol):
    @property
    def n_ctx(self) -> int | None: ...

    @property
    def ctx_init(self) -> str | None: ...


def normalize_init(words: str | None) -> str | None:
    """Init words with ``_`` read as spaces and runs of white space as one (equal prompts, equal records)."""
    return None if words is None else " ".join(str(words).replace("_", " ").split())


def context_problems(options: ContextOptions) -> list[str]:
    problems = []
    n = options.n_ctx
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        problems.append(f"n_ctx must be a positive integer (got {n!r})")
    if options.ctx_init is not None and not options.ctx_init:
        problems.append("ctx_init is empty; give words such as 'a photo of a', or leave it out for random init")
    if n is None and options.ctx_init is None:
        problems.append("give n_ctx (random init) or ctx_init (init words)")
    return problems


def tie_context(given: Mapping[str, Any]) -> dict[str, Any]:
    """An explicit M alone means random init of that length; init words alone set M (their token count)."""
    given = dict(given)
    if "n_ctx" in given and "ctx_init" not in given:
        given["ctx_init"] = None
    if given.get("ctx_init") is not None and "n_ctx" not in given:
        given["n_ctx"] = None
    return given


def context_parts(options: ContextOptions, paper: ContextOptions) -> list[str]:
    """``init-<words>`` or ``m<M>`` when the context departs from the paper's."""
    if options.ctx_init != paper.ctx_init:
        if options.ctx_init:
            return [INIT + _INIT_SEP + _INIT_SEP.join(options.ctx_init.split())]
        return [f"m{options.n_ctx}"]
    if options.ctx_init is None and options.n_ctx != paper.n_ctx:
        return [f"m{options.n_ctx}"]
    return []


def parse_context_part(part: str) -> dict[str, Any] | None:
    if part.startswith(INIT + _INIT_SEP):
        return {"ctx_init": " ".join(part.split(_INIT_SEP)[1:])}
    if re.fullmatch(r"m[1-9][0-9]*", part):
        return {"n_ctx": int(part[1:]), "ctx_init": None}
    return None


def readable_context_parts(options: ContextOptions, paper: ContextOptions) -> list[str]:
    if options.ctx_init and options.ctx_init != paper.ctx_init:
        return [f'init "{options.ctx_init}"']
    if not options.ctx_init and (options.n_ctx != paper.n_ctx or paper.ctx_init):
        return [f"M={options.n_ctx}"]
    return []


def resolve_n_ctx(options: ContextOptions, clip: LoadedClip) -> int | None:
    """M in tokens: the init words' token count under ``clip``'s tokenizer, else ``n_ctx``."""
    if not options.ctx_init:
        return options.n_ctx
    tower = resolve_text_tower(clip.model)
    tokens = _tokenize(clip.tokenizer, [options.ctx_init], tower.context_length)  # (1, L)
    return int(tower.eos_positions(tokens)[0]) - 1


class ContextMethod(Method):
    """A method whose options include a learned context (``n_ctx``, ``ctx_init``): their checks, ties, label
    parts and token count. Subclasses add their own options' parts around ``super()``'s."""

    def check(self, options: Any) -> list[str]:
        return context_problems(options)

    def normalize(self, options: Any) -> Any:
        return dataclasses.replace(options, ctx_init=normalize_init(options.ctx_init))

    def with_options(self, base: Any, given: Mapping[str, Any]) -> Any:
        return dataclasses.replace(base, **tie_context(given))

    def resolve(self, options: Any, clip: LoadedClip) -> Any:
        return dataclasses.replace(options, n_ctx=resolve_n_ctx(options, clip))

    def label_parts(self, options: Any) -> list[str]:
        return context_parts(options, self.options())

    def parse_part(self, part: str) -> dict[str, Any]:
        return parse_context_part(part) or super().parse_part(part)

    def readable_parts(self, options: Any) -> list[str]:
        return readable_context_parts(options, self.options())
