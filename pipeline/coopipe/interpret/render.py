"""An interpretation as text: TSV rows for files and a readable table for the terminal."""

from __future__ import annotations

from typing import Any

from coopipe.interpret.reading import Interpretation
from coopipe.interpret.tokens import CONTINUES


TSV_COLUMNS = ("class", "position", "rank", "token_id", "token", "bpe", "distance", "init_token", "init_distance")


def _tsv_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def format_tsv(interpretation: Interpretation) -> str:
    """The neighbours as tab-separated text with a header (tabs/newlines inside fields escaped)."""
    lines = ["\t".join(TSV_COLUMNS)]
    for row in interpretation.rows():
        lines.append("\t".join(_tsv_field(row[c]) for c in TSV_COLUMNS))
    return "\n".join(lines) + "\n"


def _cell(text: str, width: int) -> str:
    return text if len(text) >= width else text + " " * (width - len(text))


def format_table(interpretation: Interpretation, *, max_classes: int | None = None) -> str:
    """A readable terminal table: per context, one line per vector with its nearest tokens and distances."""
    it = interpretation
    distance = "Euclidean distance" if it.metric == "l2" else "cosine distance (1 - cos)"
    v = it.variant
    lines = [
        f"{it.model} ({it.weights_id}): nearest vocabulary tokens of each context vector, top {it.topk} by {distance}",
        f"context: n_ctx={v.get('n_ctx')}, {'class-specific' if v.get('csc') else 'unified'}, class token at the "
        f"{v.get('class_token_position')}, init {v.get('ctx_init')!r}" if v.get("ctx_init") else
        f"context: n_ctx={v.get('n_ctx')}, {'class-specific' if v.get('csc') else 'unified'}, class token at the "
        f"{v.get('class_token_position')}, random init",
    ]
    has_init = any(s.init_token is not None for r in it.contexts for s in r.slots)
    shown = it.contexts if max_classes is None else it.contexts[:max_classes]
    for reading in shown:
        lines.append("")
        if reading.classname is not None:
            lines.append(f"class {reading.classname!r}")
        cells = [[f"{n.token.display} {n.distance:.3f}" for n in s.neighbours] for s in reading.slots]
        widths = [max(len(row[r]) for row in cells) for r in range(it.topk)]
        init_w = max([len(s.init_token.display) for s in reading.slots if s.init_token is not None] + [4])
        header = "  pos  " + (_cell("init", init_w) + "  d(init)  " if has_init else "")
        header += "  ".join(_cell(f"#{r + 1}", widths[r]) for r in range(it.topk))
        lines.append(header.rstrip())
        for slot, row in zip(reading.slots, cells):
            line = f"  {slot.position:>3}  "
            if has_init:
                init_text = slot.init_token.display if slot.init_token is not None else "-"
                init_d = f"{slot.init_distance:.3f}" if slot.init_distance is not None else "-"
                line += _cell(init_text, init_w) + f"  {init_d:>7}  "
            line += "  ".join(_cell(c, widths[r]) for r, c in enumerate(row))
            lines.append(line.rstrip())
        lines.append(f"  nearest-word prompt, token by token: {reading.tokens_template or reading.template}")
        if reading.tokens_template and reading.tokens_template != reading.template:
            lines.append(f"  the same typed as text:              \"{reading.template}\"")
    pieces = any(not s.nearest.end_of_word and not s.nearest.special for r in shown for s in r.slots)
    if pieces:
        lines += ["", f"  {CONTINUES} marks a word piece (a BPE token without CLIP's end-of-word mark): typed as text it "
                      f"joins the next token, so the text tokenises into other tokens than the nearest ones."]
    if len(shown) < len(it.contexts):
        lines.append(f"\n{len(it.contexts) - len(shown)} more classes: see the JSON/TSV output")
    acc = it.accuracy
    if acc is not None:
        lines.append("")
        lines += [
            f"test accuracy ({acc.n_images} images):",
            f"  learned context (the trained vectors):                   {100 * acc.learned:6.2f}%",
            f"  nearest tokens (each vector replaced by its nearest one): {100 * acc.nearest_tokens:6.2f}% "
            f"({100 * (acc.nearest_tokens - acc.learned):+.2f} pts)",
        ]
        if not acc.text_roundtrip:
            lines.append(f"  nearest-word prompt typed as text (tokenised anew):      {100 * acc.nearest_text:6.2f}%")
    return "\n".join(lines)
