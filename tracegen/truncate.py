"""Middle truncation: what a model sees of a long tool output (head and tail, the middle elided)."""

from __future__ import annotations


def middle_truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """Keep the first and last parts of ``text`` within ``max_chars``; returns (text, was_truncated)."""
    if len(text) <= max_chars:
        return text, False
    marker = "\n[... {} characters elided ...]\n"
    budget = max(0, max_chars - len(marker) - 8)
    head = budget // 2
    tail = budget - head
    elided = len(text) - head - tail
    return text[:head] + marker.format(elided) + (text[-tail:] if tail else ""), True
