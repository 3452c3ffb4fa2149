"""Vocabulary identity: KD is only meaningful when teacher and student share token ids.

:func:`vocab_hash` hashes the token -> id mapping (added tokens included), so two tokenizers with the
same ids for the same strings hash equal whatever their names; Qwen3 and Qwen3.5 differ, for instance.
Not compared: normalisation and pre-tokenisation rules, which do not change what an id means.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol


class HasVocab(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def vocab_hash(tokenizer: HasVocab) -> str:
    """sha256 (first 16 hex digits) of the sorted (token, id) pairs."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
