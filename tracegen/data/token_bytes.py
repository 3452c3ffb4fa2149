"""Token extents from token ids alone: the bytes each vocabulary entry stands for, summed with numpy.

Two users: :mod:`tracegen.data.audit` re-derives every token's characters without trusting the formatter,
and :mod:`tracegen.data.tokenize` takes a byte-level BPE's offsets from here rather than from the
tokenizer's per-token Python tuples (the same numbers, for a fraction of the cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tracegen.data.tokenize import Tok

I64 = npt.NDArray[np.int64]


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass
class ByteTable:
    """The bytes every token id decodes to (byte-level BPE), as one length array for numpy."""

    lengths: I64
    pieces: list[bytes]
    byte_level: bool
    """A GPT-2 style byte alphabet (Qwen, Llama 3, SmolLM): every piece's bytes are exact, not decoded text."""


def byte_table(tok: Tok) -> ByteTable:
    """Every id's bytes, added tokens and non-byte-level vocabularies included (through ``decode``)."""
    size = int(tok.full.get_vocab_size(with_added_tokens=True))
    vocab = tok.full.get_vocab(with_added_tokens=True)
    size = max(size, max(vocab.values()) + 1)
    pieces = [b""] * size
    decoder = tok.plain_data.get("decoder") or {}  # parsed once, by load_tokenizer
    byte_level = decoder.get("type") == "ByteLevel" or any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict)
    )
    inv = byte_alphabet()
    for token, i in vocab.items():
        if token in tok.added:
            pieces[i] = token.encode()
        elif byte_level and all(c in inv for c in token):
            pieces[i] = bytes(inv[c] for c in token)
        else:
            pieces[i] = str(tok.full.decode([i], skip_special_tokens=False)).encode()
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size)
    return ByteTable(lengths=lengths, pieces=pieces, byte_level=byte_level)


def byte_level_lengths(data: dict[str, Any]) -> I64 | None:
    """Per-token byte lengths of a byte-level BPE's vocabulary (one vocabulary character per byte), else None.

    ``data`` is the parsed ``tokenizer.json``. Cheaper than :func:`byte_table` (no decoding), and only
    for what a byte-level pre-tokenizer produces: the model's own vocabulary, no added tokens.
    """
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    normalizer = (data.get("normalizer") or {}).get("type")
    model = data.get("model", {})
    if model.get("type") != "BPE" or normalizer not in (None, "NFC"):
        return None
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    lengths = np.zeros(max(vocab.values(), default=-1) + 1, dtype=np.int64)
    for token, token_id in vocab.items():
        lengths[token_id] = len(token)
    return lengths


def token_char_extents(text: str, ids: I64, lengths: I64) -> tuple[I64, I64] | None:
    """(char_start, char_end) per token of ``text`` from byte lengths; None if they do not add up to ``text``.

    A token holding part of a multi-byte character covers the whole character, as a tokenizer's own
    offsets do (so two tokens can share it); a zero-byte token is empty at its position.
    """
    raw = text.encode("utf-8")
    lens = lengths[ids]
    ends_b = np.cumsum(lens)
    if (ends_b[-1] if len(ends_b) else 0) != len(raw):
        return None
    starts_b = ends_b - lens
    arr = np.frombuffer(raw, dtype=np.uint8)
    char_of_byte = np.concatenate((np.cumsum((arr & 0xC0) != 0x80) - 1, [len(text)]))
    cs = char_of_byte[starts_b]
    last_b = np.maximum(ends_b - 1, starts_b)
    ce = np.where(lens > 0, char_of_byte[last_b] + 1, cs)
    return cs, ce
