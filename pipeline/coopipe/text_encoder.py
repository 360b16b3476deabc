"""The frozen CLIP text tower, run on tokenised prompts or on prompt learners' prompts, exactly and fast.

The one text path of every prompt method (:meth:`PromptTextEncoder.encode_prompts`): G *groups* of K prompts of
one layout, each group its own first P positions (its prefix) and its class rows: one group for CoOp, KgCoOp,
ProGrad, OrdinalCLIP's CoOp row and the rank prompts (whose rank tokens are class rows), one per run for stacked
runs (:mod:`coopipe.stacked_text`), one per image for CoCoOp (:mod:`coopipe.cocoop_text`). What it reads of a
learner is :class:`PromptRows`.

Why the shortcuts are exact (see the project's CoOp notes): the text transformer is causal and pooled at [EOS], so
the output at [EOS] never depends on later positions, and the first positions of every prompt never depend on
what follows them.

- ``share_prefix`` (the packed path, the default for prompt learners): the first P positions are the same for
  every class (``[SOS] [V]1..[V]M`` with the class token at the end, ``[SOS] [V]1..[V]M/2`` in the middle, only
  ``[SOS]`` with class-specific context or the class token at the front). Each class chunk becomes ONE flat
  sequence per group: the group's P prefix rows, then every class's own positions P..[EOS] back to back (nothing
  after [EOS], no padding), each with the positional embedding of its position inside its own prompt. Every layer
  runs ``ln_1``, the packed q/k/v in-projection, ``out_proj`` and the MLP once over all rows of all groups (the
  GEMMs are ~80% of the time, so rows saved are time saved); prefix rows attend causally among themselves, a
  class's rows attend to the prefix and to their own earlier rows (one SDPA call over the groups' bins of
  consecutive classes, see :class:`_Packing`: the groups share the layout).
  With P = 1 (class-specific context, class token at the front) this still removes all padding and is ~25-35%
  faster than ``cut`` alone, so every layout uses it. The last layer computes keys/values for all rows but queries,
  ``out_proj`` and the MLP only for the K [EOS] rows, the only ones pooled. The blocks are re-implemented by
  hand from open_clip's ``ResidualAttentionBlock`` (``ln_1`` -> packed in-projection -> attention ->
  ``out_proj`` -> ``ls_1`` residual; ``ln_2`` -> ``mlp`` -> ``ls_2`` residual) with
  ``scaled_dot_product_attention``; ``cut`` does not apply (the packed path never computes a padded position).
- ``cut``: for token ids, ``share_prefix=False`` or towers with custom blocks, open_clip's own transformer runs
  each chunk only up to its longest real prompt (largest [EOS] index + 1) instead of all 77 positions; the
  positional embedding and the causal mask are sliced to match.
- ``class_chunk``: classes are processed in chunks (1000-class datasets fit); each packed chunk recomputes the P
  prefix rows (small next to its suffix rows). With ``checkpoint_chunks`` each chunk's activations are
  recomputed in the backward pass instead of stored.

The plain path (``cut=False, share_prefix=False``) runs the full sequence through open_clip's own transformer
with the model's ``attn_mask`` passed at call time, like ``encode_text``; it is the reference the shortcuts are
tested against.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from coopipe.errors import ParamsError
from coopipe.frozen_gemm import FrozenGemm
from coopipe.models import LoadedClip
from coopipe.text_tower import TextTower, resolve_text_tower

logger = logging.getLogger(__name__)

BIN_ROWS = 64  # class rows per attention bin: big enough for efficient SDPA tiles, small enough to waste little


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    step = n if size is None else size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


@dataclass(frozen=True)
class _Packing:
    """Where the rows of one packed chunk sit: P prefix rows, then each class's rows up to its [EOS] (N in all).

    Why attention runs on "bins" while the GEMMs run on the flat rows: the GEMMs (in-projection, out_proj, MLP:
    ~all the work) see only the N real rows. Attention is block-diagonal (a class's rows see the prefix and their
    own earlier rows); one dense (N, N) mask would grow quadratically with the number of classes, and one padded
    row per class wastes most of the attention on padding (ImageNet: longest class 13 rows, mean 4) and copies
    the prefix keys per class. So runs of consecutive classes are packed into bins of about ``BIN_ROWS`` rows;
    each bin is laid out as [the P prefix rows, its classes' rows, padding] (S = P + B slots), one SDPA call
    attends all bins under a mask (causal among the prefix; a class row sees the prefix and its own class
    causally), and the real rows are gathered back (the prefix rows from bin 0). Padding slots repeat a real row
    (never NaN), are never visible as keys to a real row, and their outputs are never read.
    """

    positions: torch.Tensor  # (N,) each row's position inside its own prompt
    to_padded: torch.Tensor  # (bins * S,) row of x read into each bin slot
    from_padded: torch.Tensor  # (N,) bin slot whose output is each row's output
    mask: torch.Tensor  # (bins, 1, S, S) bool: which slots (keys) each slot (query) sees
    eos: torch.Tensor  # (n,) row of each class's [EOS]
    eos_to_padded: torch.Tensor  # (bins * E,) [EOS] row used as each last-layer query slot (E: most classes in a bin)
    eos_from_padded: torch.Tensor  # (n,) query slot of each class's [EOS]
    eos_mask: torch.Tensor  # (bins, 1, E, S) bool: a class's [EOS] sees the prefix and all its own rows

    @property
    def bins(self) -> int:
        return int(self.mask.shape[0])

    @staticmethod
    def build(n_prefix: int, positions: torch.Tensor, lengths: torch.Tensor, bin_rows: int) -> _Packing:
        """From the suffix rows' positions (N - P,) and each class's row count (n,), as the learner packs them.

        Classes are binned greedily in order (a class longer than ``bin_rows`` gets a bin of its own), so each bin
        is a contiguous run of rows and the output keeps the class order.
        """
        device = lengths.device
        sizes: list[int] = []  # rows per bin
        counts: list[int] = []  # classes per bin
        for length in lengths.tolist():
            if counts and sizes[-1] + length <= bin_rows:
                sizes[-1] += length
                counts[-1] += 1
            else:
                sizes.append(length)
                counts.append(1)
        size = torch.tensor(sizes, device=device).unsqueeze(1)  # (bins, 1)
        count = torch.tensor(counts, device=device).unsqueeze(1)  # (bins, 1)
        n_slots = n_prefix + max(sizes)  # S
        slot = torch.arange(n_slots, device=device)  # (S,)
        is_prefix = slot < n_prefix  # (S,)
        offset = slot - n_prefix  # (S,) slot's offset among its bin's rows
        bin_start = n_prefix + size.cumsum(0) - size  # (bins, 1) first row of each bin
        to_padded = torch.where(is_prefix, slot, bin_start + offset.clamp(min=0).minimum(size - 1))  # (bins, S)
        real_row = (offset >= 0) & (offset < size)  # (bins, S)
        classes = torch.arange(len(lengths), device=device)  # (n,)
        prefix_class = torch.full((n_prefix,), -2, device=device)  # (P,)
        row_class = torch.cat([prefix_class, classes.repeat_interleave(lengths)])  # (N,) class of each row
        slot_class = torch.where(real_row | is_prefix, row_class[to_padded], -1)  # (bins, S), -1 for padding
        own_class = (slot_class.unsqueeze(2) == slot_class.unsqueeze(1)) & (slot_class.unsqueeze(2) >= 0)
        causal = torch.ones(n_slots, n_slots, dtype=torch.bool, device=device).tril()  # (S, S)
        mask = (is_prefix | own_class) & causal  # (bins, S, S): [bin, query slot, key slot]

        eos = n_prefix + lengths.cumsum(0) - 1  # (n,)
        first_class = count.cumsum(0) - count  # (bins, 1)
        query = torch.arange(max(counts), device=device)  # (E,)
        eos_class = first_class + query.minimum(count - 1)  # (bins, E); padding repeats the bin's last class
        eos_mask = is_prefix | (slot_class.unsqueeze(1) == eos_class.unsqueeze(2))  # (bins, E, S)
        return _Packing(
            positions=torch.cat([torch.arange(n_prefix, device=device), positions]),
            to_padded=to_padded.flatten(),
            from_padded=torch.cat(
                [torch.arange(n_prefix, device=device), real_row.flatten().nonzero().squeeze(1)]
            ),
            mask=mask.unsqueeze(1),
            eos=eos,
            eos_to_padded=eos[eos_class].flatten(),
            eos_from_padded=(query < count).flatten().nonzero().squeeze(1),
            eos_mask=eos_mask.unsqueeze(1),
        )


def _heads(rows: torch.Tensor, batch: int, parts: int, heads: int) -> torch.Tensor:
    """Rows (batch * T, parts * width), e.g. packed q|k|v, -> (parts, batch, heads, T, head_dim)."""
    head_dim = rows.shape[-1] // (parts * heads)
    return rows.view(batch, -1, parts, heads, head_dim).permute(2, 0, 3, 1, 4)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, T, head_dim) -> rows (batch * T, heads * head_dim)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads * head_dim)


def _in_projection(block: Any, x: torch.Tensor, first: int, count: int, gemm: FrozenGemm) -> torch.Tensor:
    """``count`` parts from part ``first`` (q=0, k=1, v=2) of ``nn.MultiheadAttention``'s packed in-projection.

    x (T, width) -> (T, count * width); slicing the weight rows gives the same dot products as the full GEMM.
    """
    attn = block.attn
    rows = slice(first * x.shape[-1], (first + count) * x.shape[-1])
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[rows]
    return gemm.linear(x, attn.in_proj_weight[rows], bias)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over (G * bins) bins, the packing's (bins, 1, Q, S) mask repeated for each of the G groups."""
    groups = q.shape[0] // mask.shape[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if groups == 1 else mask.repeat(groups, 1, 1, 1))


def _packed_block(block: Any, x: torch.Tensor, packing: _Packing, gemm: FrozenGemm) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on G packed sequences of one layout: x (G, N, width) -> (G, N, width).

    ``block`` is a plain ``ResidualAttentionBlock`` (checked by ``TextTower.supports_manual_blocks``). Every GEMM
    runs once over the G x N rows; attention runs on the G x bins bins.
    """
    groups, _, width = x.shape
    heads = block.attn.num_heads
    qkv = _in_projection(block, block.ln_1(x), 0, 3, gemm)  # (G, N, 3 * width), packed q|k|v as in torch
    padded = qkv.index_select(1, packing.to_padded).reshape(-1, 3 * width)  # (G * bins * S, 3 * width)
    q, k, v = _heads(padded, groups * packing.bins, 3, heads)  # (G * bins, heads, S, head_dim) each
    attended = _merge(_attend(q, k, v, packing.mask)).view(groups, -1, width)  # (G, bins * S, width)
    x = x + block.ls_1(gemm.layer(block.attn.out_proj, attended.index_select(1, packing.from_padded)))  # (G, N, width)
    return x + block.ls_2(gemm.mlp(block.mlp, block.ln_2(x)))


def _packed_last_block(block: Any, x: torch.Tensor, packing: _Packing, gemm: FrozenGemm) -> torch.Tensor:
    """The last block, output only at each class's [EOS]: x (G, N, width) -> (G, n, width).

    Keys/values are needed for every row, but queries, ``out_proj`` and the MLP only for the n pooled rows.
    """
    groups, _, width = x.shape
    heads = block.attn.num_heads
    normed = block.ln_1(x)  # (G, N, width)
    kv = _in_projection(block, normed, 1, 2, gemm)  # (G, N, 2 * width), packed k|v
    k, v = _heads(kv.index_select(1, packing.to_padded).reshape(-1, 2 * width), groups * packing.bins, 2, heads)
    q = _in_projection(block, normed.index_select(1, packing.eos_to_padded), 0, 1, gemm)  # (G, bins * E, width)
    (q,) = _heads(q.reshape(-1, width), groups * packing.bins, 1, heads)  # (G * bins, heads, E, head_dim)
    attended = _merge(_attend(q, k, v, packing.eos_mask)).view(groups, -1, width)  # (G, bins * E, width)
    x = x.index_select(1, packing.eos)  # (G, n, width)
    x = x + block.ls_1(gemm.layer(block.attn.out_proj, attended.index_select(1, packing.eos_from_padded)))
    return x + block.ls_2(gemm.mlp(block.mlp, block.ln_2(x)))


@runtime_checkable
class PromptRows(Protocol):
    """What the text path reads of a prompt learner (CoOp's, CoCoOp's, the rank prompts'): declared, not guessed.

    Why these members: the packed path needs the positions every class shares (``shared_length`` and their
    embeddings, ``shared_prefix_embeddings``) and each class's own rows up to its [EOS] (``packed_embeddings``);
    the plain path needs the padded prompts (``prompt_embeddings``) and where each is pooled (``eos_index``).
    """

    n_cls: int
    context_length: int  # the tower's L the prompts were tokenised for
    eos_index: torch.Tensor  # (n_cls,) position of each class's [EOS]

    @property
    def shared_length(self) -> int:
        """P: the leading positions identical for every class ([SOS] and the context before the class token)."""
        ...

    def shared_prefix_embeddings(self) -> torch.Tensor:
        """(1, P, width): the shared positions' embeddings (no positional embedding)."""
        ...

    def packed_embeddings(self, classes: slice, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions ``start .. eos`` of each class of ``classes``, class after class: rows (N, width), each row's
        position in its prompt (N,), rows per class (n,)."""
        ...

    def prompt_embeddings(self, classes: slice = slice(None), *, length: int | None = None) -> torch.Tensor:
        """The prompts of ``classes`` padded to ``length`` (L when None): (n, length, width)."""
        ...


class PromptTextEncoder:
    """Runs the frozen text tower of ``clip`` on token ids (:meth:`encode_tokens`) or on prompt learners' prompts
    (:meth:`encode_prompts`; calling the encoder on one learner is its one group).

    Options (keyword-only): ``cut`` and ``share_prefix`` (the exact shortcuts, both on by default),
    ``class_chunk`` (classes per chunk, None = all at once), ``checkpoint_chunks`` (recompute each chunk in the
    backward pass), ``autocast_bf16`` (``torch.autocast`` to bfloat16 on the tower's device), ``gemm`` (the
    library for the shared-prefix path's products with the frozen weights, :class:`~coopipe.frozen_gemm.FrozenGemm`:
    ``auto``, ``onednn`` or ``blas``). Computation happens on
    the device of the model's weights; token ids are moved there, a prompt learner must already live there.
    """

    def __init__(
        self,
        clip: LoadedClip,
        *,
        cut: bool = True,
        share_prefix: bool = True,
        class_chunk: int | None = None,
        checkpoint_chunks: bool = False,
        autocast_bf16: bool = False,
        gemm: str = "auto",
    ) -> None:
        if class_chunk is not None and class_chunk < 1:
            raise ParamsError(f"class_chunk must be a positive number of classes or None, got {class_chunk}")
        self.tower: TextTower = resolve_text_tower(clip.model)
        self.tokenizer = clip.tokenizer
        self.cut = cut
        self.share_prefix = share_prefix
        self.class_chunk = class_chunk
        self.checkpoint_chunks = checkpoint_chunks
        self.autocast_bf16 = autocast_bf16
        self.gemm = FrozenGemm(gemm)
        self._manual_blocks = self.tower.supports_manual_blocks()
        if share_prefix and not self._manual_blocks:
            logger.info("text blocks are not plain ResidualAttentionBlocks: prefix sharing disabled")

    @property
    def device(self) -> torch.device:
        return self.tower.device

    # ---------------------------------------------------------------- shared pieces
    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _run_chunk(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        if self.checkpoint_chunks and wants_grad:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """ln_final -> text projection -> L2 normalisation of the pooled [EOS] rows: (n, width) -> (n, embed_dim)."""
        return F.normalize(self.tower.project(self.tower.ln_final(pooled)), dim=-1)

    def _forward_full(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """open_clip's own transformer on (n, T, width) embeddings with the model's causal mask sliced to T."""
        tower = self.tower
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(x.dtype)  # (n, T, width)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])  # (n, T, width)
        return self._head(x[torch.arange(x.shape[0], device=x.device), eos])  # (n, embed_dim)

    @property
    def packs(self) -> bool:
        """Whether prompts take the packed path (``share_prefix`` on a tower of plain blocks) or the plain one."""
        return self.share_prefix and self._manual_blocks

    def _forward_packed(self, packing: _Packing, prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """G groups' prefixes (G, P, width) and their class rows (G, N_s, width), or (1, N_s, width) shared by
        every group, packed as ``packing`` says -> (G, n, embed_dim) normalised."""
        if rows.shape[0] != prefix.shape[0]:
            rows = rows.expand(prefix.shape[0], -1, -1)  # (G, N_s, width)
        x = torch.cat([prefix, rows], dim=1)  # (G, N, width)
        x = x + self.tower.positional_embedding[packing.positions].to(x.dtype)  # (G, N, width)
        *blocks, last = self.tower.blocks
        for block in blocks:
            x = _packed_block(block, x, packing, self.gemm)  # (G, N, width)
        return self._head(_packed_last_block(last, x, packing, self.gemm))  # (G, n, embed_dim)

    def _forward_plain(self, eos: torch.Tensor, prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """G groups' prefixes (G, P, width) and their classes' prompt positions P..T-1 (G or 1, n, T - P, width):
        the G x n padded prompts through open_clip's own transformer, pooled at ``eos`` (n,) -> (G, n, embed_dim)."""
        groups, n = prefix.shape[0], rows.shape[1]
        prompts = torch.cat(
            [prefix.unsqueeze(1).expand(-1, n, -1, -1), rows.expand(groups, -1, -1, -1)], dim=2
        )  # (G, n, T, width)
        return self._forward_full(prompts.flatten(0, 1), eos.repeat(groups)).view(groups, n, -1)

    def _class_passes(
        self, prompts: Sequence[PromptRows], n_prefix: int
    ) -> Iterator[tuple[Callable[..., torch.Tensor], torch.Tensor]]:
        """For each class chunk: its forward (a function of the groups' prefixes and the rows) and its class rows
        (R, ..., width), one learner's each (R = 1: shared by every group)."""
        layout, dtype = prompts[0], self.tower.dtype
        for classes in _chunks(layout.n_cls, self.class_chunk):
            if self.packs:
                packed = [p.packed_embeddings(classes, n_prefix) for p in prompts]  # (N_s, width), (N_s,), (n,) each
                _, positions, lengths = packed[0]  # one layout: the same for every learner
                packing = _Packing.build(n_prefix, positions, lengths, BIN_ROWS)
                yield functools.partial(self._forward_packed, packing), _stack([r for r, _, _ in packed]).to(dtype)
            else:
                eos = layout.eos_index[classes]  # (n,)
                length = int(eos.max()) + 1 if self.cut else layout.context_length
                rows = [p.prompt_embeddings(classes, length=length)[:, n_prefix:] for p in prompts]  # (n, T - P, width)
                yield functools.partial(self._forward_plain, eos), _stack(rows).to(dtype)

    def check_prompts(self, prompts: PromptRows) -> None:
        """Raise :class:`ParamsError` unless ``prompts`` live on the tower's device and fit its context length."""
        device = prompts.eos_index.device
        if device != self.device:
            raise ParamsError(f"prompt learner is on {device} but the text tower on {self.device}; move one of them")
        if prompts.context_length != self.tower.context_length:
            raise ParamsError("prompt learner was built for another model (context lengths differ)")

    # ---------------------------------------------------------------- public API
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of token ids (n, L) -> (n, embed_dim); equals ``encode_text(normalize=True)``.

        Uses ``cut`` and ``class_chunk`` (rows per chunk); for zero-shot prompts and prompt ensembles.
        """
        tower = self.tower
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ParamsError(f"expected token ids of shape (n >= 1, context_length), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        outputs = []
        with self._autocast():
            for rows in _chunks(tokens.shape[0], self.class_chunk):
                chunk = tokens[rows]  # (n, L)
                eos = tower.eos_positions(chunk)  # (n,)
                length = int(eos.max()) + 1 if self.cut else chunk.shape[1]
                x = tower.token_embedding(chunk[:, :length]).to(tower.dtype)  # (n, T, width)
                outputs.append(self._forward_full(x, eos))
        return torch.cat(outputs).to(tower.dtype)  # (n, embed_dim)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise ``texts`` with the model's tokenizer and encode them: (n, embed_dim)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_tokens(torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long))

    def encode_prompts(
        self, prompts: Sequence[PromptRows], prefix: torch.Tensor | None = None, *, group_chunk: int | None = None
    ) -> torch.Tensor:
        """L2-normalised text features (G, K, embed_dim) of G groups of K class prompts of one layout, differentiable
        in every learned row: the one text path of every prompt method.

        A group is K prompts sharing their first P = ``shared_length`` positions: ``prefix`` (G, P, width) gives
        each group's (default: each learner's own, ``shared_prefix_embeddings``), ``prompts`` the class rows from
        P on: one learner per group (stacked runs), or one learner whose rows every group shares (CoCoOp: a group
        per image, its prefix ``[SOS] [V]1(x)..[V]M(x)``). CoOp, KgCoOp, ProGrad and the rank prompts are one group.
        Classes run in chunks of ``class_chunk``, groups in chunks of ``group_chunk`` (None: all at once).
        """
        layout = prompts[0]
        self.check_prompts(layout)
        if prefix is None:
            prefix = _stack([p.shared_prefix_embeddings()[0] for p in prompts])  # (R, P, width)
        if len(prompts) not in (1, prefix.shape[0]) or prefix.shape[1] != layout.shared_length:
            raise ParamsError(f"{len(prompts)} prompt learners for prefixes of shape {tuple(prefix.shape)}: give one "
                              f"learner, or one per group, and P = {layout.shared_length} prefix positions")
        chunks = list(_chunks(prefix.shape[0], group_chunk))
        outputs = []
        with self._autocast():
            prefix = prefix.to(self.tower.dtype)
            passes: Iterable[tuple[Callable[..., torch.Tensor], torch.Tensor]] = self._class_passes(
                prompts, layout.shared_length)
            if len(chunks) > 1:
                passes = list(passes)  # built once, run for every group chunk
            for groups in chunks:
                row = [self._run_chunk(forward, prefix[groups], rows) for forward, rows in passes]
                outputs.append(torch.cat(row, dim=1))  # (g, K, embed_dim)
        return torch.cat(outputs).to(self.tower.dtype)  # (G, K, embed_dim)

    def __call__(self, learner: PromptRows) -> torch.Tensor:
        """L2-normalised text features of every class of ``learner``: (n_cls, embed_dim), differentiable in its
        learned rows (one group: :meth:`encode_prompts`)."""
        return self.encode_prompts([learner])[0]


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` on a new leading axis; one tensor is only unsqueezed (a view, no copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def coop_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP/CoOp logits: ``logit_scale.exp()`` times the cosine of image (B, D) and text (K, D) features -> (B, K).

    ``logit_scale`` is CLIP's log-scale parameter (``model.logit_scale``); image features are normalised here
    (cached features are stored unnormalised), text features come normalised from :class:`PromptTextEncoder`.
    """
    image = F.normalize(image_features.to(text_features.dtype), dim=-1)  # (B, D)
    return logit_scale.exp().to(text_features.dtype) * image @ text_features.t()  # (B, K)
