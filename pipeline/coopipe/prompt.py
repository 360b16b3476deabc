"""CoOp's prompt learner: learned context vectors spliced into frozen class-name token embeddings.

Why this shape: CoOp (Zhou et al.) learns only M context vectors and runs ``[SOS] [V]1..[V]M [CLASS] . [EOS]``
through the frozen text transformer. Like CoOp's reference ``trainers/coop.py``, the prompts are tokenised once
with placeholder words (``"X X ... X {classname}."``) so that every class's [EOS] lands where it will be at
training time; the token embeddings of [SOS] (the *prefix*) and of the class name, '.', [EOS] and padding (the
*suffix*) are kept as frozen buffers and the context is spliced in between on every forward pass.

The class token can sit at the end (default), in the middle (``[V]1..[V]M/2 [CLASS] [V]M/2+1..[V]M``) or at the
front, exactly as CoOp arranges them. Instead of CoOp's per-class Python loop, each class gets a precomputed
index ``order`` that rearranges the end-layout sequence ``[prefix, ctx, suffix]`` into its layout with a single
``gather``; the result is the same tensor.

Only ``ctx`` is a parameter (and the only entry of ``state_dict``); the buffers are rebuilt from the model and
the class names, which :meth:`PromptLearner.config` records. With ``learn_names`` (OrdinalCLIP's CoOp row, whose
``PlainPromptLearner`` learns each rank's name tokens from their word embeddings) the class-name token embeddings
are a second parameter, ``name_embeds`` (n_cls, longest name, width), read in place of the frozen name rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from coopipe.errors import ParamsError
from coopipe.models import LoadedClip
from coopipe.text_tower import resolve_text_tower

logger = logging.getLogger(__name__)

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
CTX_INIT_STD = 0.02
_PLACEHOLDER = "X"


def _tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Tokenise with the model's own tokenizer and check its context length matches the model's."""
    tokens = torch.as_tensor(tokenizer(list(texts)), dtype=torch.long)  # (n, L)
    if tokens.ndim != 2 or tokens.shape[1] != context_length:
        raise ParamsError(
            f"tokenizer gives sequences of shape {tuple(tokens.shape)}, but the text tower expects length "
            f"{context_length}; use the tokenizer that belongs to the model"
        )
    return tokens


def _layout_order(position: str, n_ctx: int, name_len: int, length: int) -> list[int]:
    """Where each output position reads from in the end-layout bank ``[prefix (1), ctx (n_ctx), suffix]``."""
    ctx = list(range(1, 1 + n_ctx))
    start = 1 + n_ctx  # first suffix position: the class name tokens, then '.', [EOS], padding
    name = list(range(start, start + name_len))
    rest = list(range(start + name_len, length))
    if position == "end":
        return [0, *ctx, *name, *rest]
    if position == "middle":
        half = n_ctx // 2
        return [0, *ctx[:half], *name, *ctx[half:], *rest]
    return [0, *name, *ctx, *rest]  # front


class PromptLearner(nn.Module):
    """Learned CoOp context for ``classnames``, assembled into full prompt embeddings for the text tower.

    ``ctx`` is ``(n_ctx, width)`` (unified: one context shared by all classes) or ``(n_cls, n_ctx, width)``
    (``csc=True``: class-specific context). It is drawn from N(0, 0.02) with ``generator`` (the global RNG when
    None), or initialised from the token embeddings of ``ctx_init`` (e.g. ``"a photo of a"``); then ``n_ctx`` is
    the number of tokens of those words and the ``n_ctx`` argument is ignored.
    """

    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    tokenized_prompts: torch.Tensor
    eos_index: torch.Tensor
    order: torch.Tensor
    name_mask: torch.Tensor  # (n_cls, longest name) with learn_names: which rows are name tokens
    name_embeds: nn.Parameter  # with learn_names

    def __init__(
        self,
        clip: LoadedClip,
        classnames: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        learn_names: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ParamsError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {class_token_position!r}"
            )
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ParamsError("classnames must be a non-empty sequence of class names")
        tower = resolve_text_tower(clip.model)
        length = tower.context_length
        names = [" ".join(str(name).replace("_", " ").split()) for name in classnames]
        if any(not name for name in names):
            raise ParamsError(f"empty class name in {list(classnames)!r}")
        embedding = tower.token_embedding
        weight = embedding.weight  # (vocab, width)

        if ctx_init is not None and ctx_init.strip():
            prompt_prefix = " ".join(ctx_init.replace("_", " ").split())
            init_tokens = _tokenize(clip.tokenizer, [prompt_prefix], length)  # (1, L)
            n_ctx = int(tower.eos_positions(init_tokens)[0]) - 1
            if n_ctx < 1:
                raise ParamsError(f"ctx_init {ctx_init!r} gives no tokens; give words such as 'a photo of a'")
            with torch.no_grad():
                ctx_vectors = embedding(init_tokens.to(weight.device))[0, 1 : 1 + n_ctx].clone()  # (n_ctx, width)
            if csc:
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(len(names), 1, 1)  # (n_cls, n_ctx, width)
        else:
            if ctx_init is not None:
                raise ParamsError("ctx_init is empty; give words such as 'a photo of a', or None for random init")
            if n_ctx < 1:
                raise ParamsError(f"n_ctx must be >= 1, got {n_ctx}")
            prompt_prefix = " ".join([_PLACEHOLDER] * n_ctx)
            shape = (len(names), n_ctx, tower.width) if csc else (n_ctx, tower.width)
            # drawn in float32 on the CPU so a seed gives the same context on every device and dtype
            ctx_vectors = torch.empty(shape, dtype=torch.float32).normal_(0.0, CTX_INIT_STD, generator=generator)
        self.ctx = nn.Parameter(ctx_vectors.to(device=weight.device, dtype=weight.dtype))

        tokens = _tokenize(clip.tokenizer, [f"{prompt_prefix} {name}." for name in names], length)  # (n_cls, L)
        name_lens = [int(n) - 1 for n in tower.eos_positions(_tokenize(clip.tokenizer, names, length))]
        eos = tower.eos_positions(tokens)  # (n_cls,)
        self._check_lengths(names, name_lens, eos, n_ctx, length, class_token_position)
        with torch.no_grad():
            token_embeds = embedding(tokens.to(weight.device))  # (n_cls, L, width)
        self.register_buffer("token_prefix", token_embeds[:, :1].clone(), persistent=False)  # (n_cls, 1, width)
        self.register_buffer(
            "token_suffix", token_embeds[:, 1 + n_ctx :].clone(), persistent=False
        )  # (n_cls, L - 1 - n_ctx, width): class name, '.', [EOS], padding
        self.register_buffer("tokenized_prompts", tokens.to(weight.device), persistent=False)  # (n_cls, L)
        self.register_buffer("eos_index", eos.to(weight.device), persistent=False)  # (n_cls,)
        if learn_names:  # the name rows lead the suffix (end layout); padded to the longest name
            longest = max(name_lens)
            mask = torch.arange(longest).unsqueeze(0) < torch.tensor(name_lens).unsqueeze(1)  # (n_cls, longest)
            self.register_buffer("name_mask", mask.to(weight.device), persistent=False)
            self.name_embeds = nn.Parameter(self.token_suffix[:, :longest].clone())  # (n_cls, longest, width)
        order = [_layout_order(class_token_position, n_ctx, n, length) for n in name_lens]
        self.register_buffer(
            "order", torch.tensor(order, dtype=torch.long, device=weight.device), persistent=False
        )  # (n_cls, L)

        self.classnames: tuple[str, ...] = tuple(names)
        self.name_lens: tuple[int, ...] = tuple(name_lens)
        self.n_cls = len(names)
        self.n_ctx = n_ctx
        self.ctx_init = prompt_prefix if ctx_init is not None else None
        self.csc = csc
        self.class_token_position = class_token_position
        self.learn_names = learn_names
        self.context_length = length
        logger.debug(
            "prompt learner: %d classes, n_ctx=%d, csc=%s, position=%s, init=%s",
            self.n_cls,
            n_ctx,
            csc,
            class_token_position,
            self.ctx_init or "random",
        )

    @staticmethod
    def _check_lengths(
        names: Sequence[str], name_lens: Sequence[int], eos: torch.Tensor, n_ctx: int, length: int, position: str
    ) -> None:
        for name, name_len, eos_i in zip(names, name_lens, eos.tolist()):
            expected = 1 + n_ctx + name_len + 1  # [SOS] ctx name '.' -> [EOS] index
            if expected >= length:
                raise ParamsError(
                    f"prompt for class {name!r} needs {expected + 1} tokens with n_ctx={n_ctx}, more than the "
                    f"context length {length}; use a smaller n_ctx or a shorter class name"
                )
            if eos_i != expected and position != "end":
                logger.warning(
                    "class %r tokenises differently inside the prompt than alone; its %s layout follows CoOp's "
                    "name-length split",
                    name,
                    position,
                )

    @property
    def max_length(self) -> int:
        """Length of the longest real prompt (largest [EOS] index + 1): the exact cut for a causal tower."""
        return int(self.eos_index.max()) + 1

    @property
    def shared_length(self) -> int:
        """Number of leading positions identical for every class.

        [SOS] plus the context before the class token: ``1 + n_ctx`` at the end, ``1 + n_ctx // 2`` in the
        middle, 1 at the front or with class-specific context.
        """
        if self.csc or self.class_token_position == "front":
            return 1
        if self.class_token_position == "middle":
            return 1 + self.n_ctx // 2
        return 1 + self.n_ctx

    def _class_context(self, classes: slice) -> torch.Tensor:
        if self.csc:
            return self.ctx[classes]  # (n, n_ctx, width)
        n = len(range(self.n_cls)[classes])
        return self.ctx.unsqueeze(0).expand(n, -1, -1)  # (n, n_ctx, width)

    def prompt_embeddings(self, classes: slice = slice(None), *, length: int | None = None) -> torch.Tensor:
        """Prompt token embeddings (no positional embedding) of ``classes``: (n, length or L, width).

        Only the first ``length`` positions are built (the cut path asks for far fewer than L): the layouts only
        reorder the first ``1 + n_ctx + name_len`` positions, so that many bank positions are enough.
        """
        length = self.context_length if length is None else length
        bank_len = length if self.class_token_position == "end" else max(length, 1 + self.n_ctx + max(self.name_lens))
        prefix = self.token_prefix[classes]  # (n, 1, width)
        suffix = self.token_suffix[classes, : max(bank_len - 1 - self.n_ctx, 0)]  # (n, <= L - 1 - n_ctx, width)
        if self.learn_names:
            names = self.name_embeds[classes, : suffix.shape[1]]  # (n, <= longest, width)
            count = names.shape[1]
            spliced = torch.where(self.name_mask[classes, :count].unsqueeze(-1), names, suffix[:, :count])
            suffix = torch.cat([spliced, suffix[:, count:]], dim=1)
        bank = torch.cat([prefix, self._class_context(classes), suffix], dim=1)[:, :bank_len]  # end layout
        if self.class_token_position == "end":
            return bank  # (n, length, width)
        order = self.order[classes, :length]  # (n, length)
        return torch.gather(bank, 1, order.unsqueeze(-1).expand(-1, -1, bank.shape[-1]))  # (n, length, width)

    def packed_embeddings(self, classes: slice, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt positions ``start .. eos`` of every class of ``classes``, packed class after class, no padding.

        Why: a causal tower pooled at [EOS] never needs a position after [EOS], and the positions before ``start``
        (the shared prefix) are computed once, so the text encoder runs exactly these rows through its GEMMs.
        Each row is read straight from the frozen suffix bank or from ``ctx`` (per the layout's ``order``), so no
        (n, length, width) prompt tensor is built and ``ctx``'s gradient is a small scatter-add.

        Returns the embeddings (N, width) (no positional embedding), each row's position in its own prompt (N,),
        and the number of rows of each class (n,) = ``eos_index - start + 1``; N is their sum.
        """
        if not 1 <= start <= self.shared_length:
            raise ParamsError(f"packing must start after [SOS] and within the shared prefix, got start={start}")
        device = self.eos_index.device
        index = torch.arange(self.n_cls, device=device)[classes]  # (n,)
        eos = self.eos_index[classes]  # (n,)
        positions = torch.arange(start, int(eos.max()) + 1, device=device)  # (T,)
        rows, cols = (positions.unsqueeze(0) <= eos.unsqueeze(1)).nonzero(as_tuple=True)  # (N,) each, class-major
        cls, pos = index[rows], positions[cols]  # (N,)
        source = self.order[cls, pos]  # (N,) index into the end-layout bank [prefix (1), ctx (n_ctx), suffix]
        width = self.token_suffix.shape[-1]
        suffix_index = cls * self.token_suffix.shape[1] + (source - 1 - self.n_ctx).clamp(min=0)  # (N,)
        packed = self.token_suffix.reshape(-1, width).index_select(0, suffix_index)  # (N, width)
        if self.learn_names:  # rows of a class name come from the learned name embeddings
            longest = self.name_embeds.shape[1]
            offset = source - 1 - self.n_ctx  # (N,) position in the suffix
            name_index = cls * longest + offset.clamp(0, longest - 1)  # (N,)
            is_name = (offset >= 0) & (offset < longest) & self.name_mask.reshape(-1)[name_index]  # (N,)
            name_rows = self.name_embeds.reshape(-1, width).index_select(0, name_index)  # (N, width)
            packed = torch.where(is_name.unsqueeze(1), name_rows, packed)
        if self.class_token_position != "end" or start <= self.n_ctx:  # some packed rows may be context
            ctx_index = (source - 1).clamp(max=self.n_ctx - 1) + (cls * self.n_ctx if self.csc else 0)  # (N,)
            ctx_rows = self.ctx.reshape(-1, width).index_select(0, ctx_index)  # (N, width)
            packed = torch.where((source <= self.n_ctx).unsqueeze(1), ctx_rows, packed)  # (N, width)
        return packed, pos, eos - start + 1

    def shared_prefix_embeddings(self) -> torch.Tensor:
        """The first :attr:`shared_length` prompt embeddings, the same for every class: (1, P, width)."""
        n_shared_ctx = self.shared_length - 1
        if self.csc:
            return self.token_prefix[:1]  # (1, 1, width)
        return torch.cat([self.token_prefix[:1], self.ctx[:n_shared_ctx].unsqueeze(0)], dim=1)  # (1, P, width)

    def config(self) -> dict[str, Any]:
        """What is needed (with the same model) to rebuild this learner before loading its ``state_dict``."""
        return {
            "classnames": list(self.classnames),
            "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init,
            "csc": self.csc,
            "class_token_position": self.class_token_position,
            **({"learn_names": True} if self.learn_names else {}),
        }

    def extra_repr(self) -> str:
        return (
            f"n_cls={self.n_cls}, n_ctx={self.n_ctx}, csc={self.csc}, "
            f"class_token_position={self.class_token_position!r}, ctx_init={self.ctx_init!r}"
        )
