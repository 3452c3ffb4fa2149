"""Vocabulary identity: KD is only meaningful when teacher and student share token ids.

:func:`vocab_hash` hashes the token -> id mapping (added tokens included), so two tokenizers with the
same ids for the same strings hash equal whatever their names; Qwen3 and Qwen3.5 differ, for instance.
Not compared: normalisation and pre-tokenisation rules, which do not change what an id means.
"""

from __future__ import annotations

from typing import Protocol

from tracegen.data.tokenize import hash_vocabulary


class HasVocab(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def vocab_hash(tokenizer: HasVocab) -> str:
    """The identity of a transformers tokenizer's vocabulary (:func:`~tracegen.data.tokenize.hash_vocabulary`)."""
    return hash_vocabulary(tokenizer.get_vocab())
