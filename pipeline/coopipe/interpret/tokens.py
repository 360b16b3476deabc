"""CLIP BPE tokens decoded for people: the words a learned context is read as.

Why: CoOp reads a context by its nearest vocabulary entries, and raw BPE strings are not readable. CLIP's
end-of-word marker ``</w>`` is removed (a piece without it continues into the next token and is shown with a
trailing ``…``), the byte-level alphabet is mapped back to bytes and decoded as UTF-8 (non-Latin scripts kept),
undecodable bytes and control characters are shown escaped (``\\xe2``), and ``<start_of_text>``/``<end_of_text>``
are flagged as special.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CONTINUES = "…"  # display suffix of a BPE piece that continues into the next token (no </w>)
_END_OF_WORD = "</w>"


@dataclass(frozen=True)
class Token:
    """One vocabulary entry, decoded for people.

    ``bpe``: the raw vocabulary string (``"photo</w>"``); ``text``: readable text without the end-of-word
    marker, undecodable bytes and control characters escaped; ``end_of_word``: the piece ends a word (CLIP's
    ``</w>``); ``special``: ``<start_of_text>``/``<end_of_text>`` (or another special token); ``raw``: the
    token's bytes (empty for special tokens), used to join pieces into a string.
    """

    id: int
    bpe: str
    text: str
    end_of_word: bool
    special: bool
    raw: bytes = field(default=b"", repr=False)

    @property
    def display(self) -> str:
        """``text``, with a trailing ``…`` when the piece continues into the next token."""
        return self.text if self.end_of_word or self.special else self.text + CONTINUES

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "bpe": self.bpe, "end_of_word": self.end_of_word, "special": self.special}


def _escape_char(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"


def readable_bytes(raw: bytes) -> str:
    """UTF-8 text of ``raw`` with undecodable bytes as ``\\xNN`` and whitespace/control characters escaped.

    A literal backslash is doubled, so the escaped form is unambiguous. Printable non-Latin text is kept as is.
    """
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # a byte that is not valid UTF-8 on its own (part of a multi-byte char)
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isspace() or not ch.isprintable():
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


def decode_token(tokenizer: Any, token_id: int) -> Token:
    """Decode one id of a CLIP BPE tokenizer (open_clip's ``SimpleTokenizer``: ``decoder`` + ``byte_decoder``).

    Other tokenizers fall back to their ``convert_ids_to_tokens`` (Hugging Face) or to the bare id.
    """
    token_id = int(token_id)
    special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if isinstance(decoder, dict) and isinstance(byte_decoder, dict) and token_id in decoder:
        bpe = str(decoder[token_id])
        if token_id in special_ids or (bpe.startswith("<") and bpe.endswith(">") and not bpe.endswith(_END_OF_WORD)):
            return Token(token_id, bpe, bpe, True, True)
        end_of_word = bpe.endswith(_END_OF_WORD)
        core = bpe[: -len(_END_OF_WORD)] if end_of_word else bpe
        try:
            raw = bytes(byte_decoder[c] for c in core)
        except KeyError:  # not a byte-level entry (an added token): keep its text
            return Token(token_id, bpe, readable_bytes(core.encode("utf-8")), end_of_word, False, core.encode("utf-8"))
        return Token(token_id, bpe, readable_bytes(raw), end_of_word, False, raw)
    hf = getattr(getattr(tokenizer, "tokenizer", None), "convert_ids_to_tokens", None)
    if callable(hf):
        text = str(hf(token_id))
        return Token(token_id, text, readable_bytes(text.encode("utf-8")), True, token_id in special_ids, text.encode("utf-8"))
    return Token(token_id, str(token_id), f"<{token_id}>", True, token_id in special_ids)


def join_tokens(tokens: Sequence[Token]) -> str:
    """The tokens as one string, as the BPE tokenizer would decode them (word pieces glued, words spaced).

    Undecodable bytes are escaped (``\\xNN``); special tokens appear as their literal names.
    """
    parts: list[bytes] = []
    for token in tokens:
        parts.append(token.bpe.encode("utf-8") + b" " if token.special else token.raw + (b" " if token.end_of_word else b""))
    text = b"".join(parts).decode("utf-8", errors="backslashreplace")
    return " ".join(text.split())
