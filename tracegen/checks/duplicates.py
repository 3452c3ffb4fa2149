"""The ``duplicate`` check: near-identical samples of one task (exact hash, then MinHash), first one kept."""

from __future__ import annotations

import re
import zlib
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.verdicts import passing, verdict
from tracegen.config import DuplicateCheckConfig
from tracegen.records import AssistantMessage, Trajectory

if TYPE_CHECKING:
    import numpy as np


_WS = re.compile(r"\s+")


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


_UNIQUE = Checked(passing("duplicate", "unique"))


class DuplicateCheck:
    """Per task, the samples seen so far: exact (normalised answer + reasoning hash) and MinHash signatures.

    Feed samples in input order; the first of a group is the original, later ones are duplicates (the
    verdict's details name the original's id).
    """

    name = "duplicate"
    cost: Cost = "cheap"
    key = ""

    def __init__(self, config: DuplicateCheckConfig) -> None:
        self.config = config
        self._exact: dict[str, dict[bytes, str]] = {}
        self._signatures: dict[str, list[tuple[str, np.ndarray[Any, Any]]]] = {}
        self._perm: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None

    def applies(self, t: Trajectory) -> bool:
        return True

    async def aclose(self) -> None:
        pass

    async def __call__(self, t: Trajectory) -> Checked:
        digest = blake2b(_norm_text(t.final_answer or "").encode(), digest_size=16)
        pieces: list[str] = []
        for m in t.messages:
            if isinstance(m, AssistantMessage) and m.reasoning:
                piece = _norm_text(m.reasoning)
                digest.update(b"\x00" + piece.encode())
                pieces.append(piece)
        exact_key = digest.digest()
        seen = self._exact.setdefault(t.task.id, {})
        original = seen.get(exact_key)
        if original is not None:
            return Checked(verdict("duplicate", False, f"exact duplicate of {original}"), original)
        seen[exact_key] = t.id
        if self.config.near_threshold is not None:
            signature = self._minhash(" ".join([_norm_text(t.final_answer or ""), *pieces]))
            kept = self._signatures.setdefault(t.task.id, [])
            for other_id, other in kept:
                similarity = float((signature == other).mean())
                if similarity >= self.config.near_threshold:
                    reason = (
                        f"near duplicate of {other_id} (MinHash Jaccard ~{similarity:.2f} >= "
                        f"{self.config.near_threshold})"
                    )
                    return Checked(verdict("duplicate", False, reason, round(similarity, 4)), other_id)
            kept.append((t.id, signature))
        return _UNIQUE

    def _minhash(self, text: str) -> np.ndarray[Any, Any]:
        import numpy as np

        if self._perm is None:
            rng = np.random.default_rng(0x7ACE)  # fixed: signatures must agree across runs
            n = self.config.num_perm
            self._perm = (
                rng.integers(1, (1 << 31) - 1, n, dtype=np.uint64),
                rng.integers(0, (1 << 31) - 1, n, dtype=np.uint64),
            )
        words = text.split()
        n = self.config.ngram
        shingles = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
        hashes = np.fromiter((zlib.crc32(s.encode()) & 0x7FFFFFFF for s in shingles), dtype=np.uint64)
        a, b = self._perm
        prime = np.uint64((1 << 31) - 1)
        return ((a[:, None] * hashes[None, :] + b[:, None]) % prime).min(axis=1)  # type: ignore[no-any-return]
