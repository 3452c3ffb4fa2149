"""A teacher cache from the top log-probs an API teacher returned during collect (KD with no local teacher).

``collect`` with ``teacher.top_logprobs: K`` stores, per generated token, the server's log-prob and
its top-K alternatives (``AssistantMessage.reasoning_logprobs`` / ``content_logprobs``; OpenAI,
vLLM and SGLang return them). This module turns them into the same cache ``cache-teacher`` writes
from a local teacher, for the formatted dataset the student trains on:

1. Alignment, in bytes. Each row's tokens are decoded to their UTF-8 bytes (the row's ``text`` is
   exactly their concatenation). For each assistant message of the row's trajectory, a channel's
   tokens are joined into the bytes the server sent; the message's recorded reasoning and content are
   found in them and, in the same order, in the trained region of the row (reasoning and answer
   spans). A supervised token of the row gets the teacher's entry when a teacher token covers exactly
   the same bytes. Template text, tool calls re-rendered by a chat template, critiques, and tokens
   the two tokenizations split differently get no entry.
2. Entries. The listed ids are the sampled token and the top alternatives (their bytes mapped to the
   student vocabulary), with the server's log-probs as they are (normalised, T=1: vLLM reports them
   before temperature), so ``lse1 = 0``. The tempered normaliser is ``lse_T = log(sum_i p_i^(1/T) +
   p_tail^(1/T))``: the unreported tail is tempered as one bucket, consistent with the tail bucket of
   the KD loss (the true tail is spread over many ids; this is an approximation, stated here).
   Rows are padded to K+1 entries with ``-inf`` log-probs; a token with no entry is all ``-inf``,
   which makes its KD term exactly 0 (``losses.sparse_kd_per_token``).

Refused (exit 2): a tokenizer whose vocabulary differs from the dataset's, and a tokenizer that is
not byte-level BPE (GPT-2 style byte alphabet: Qwen, Llama 3, SmolLM, ...), where token bytes are
not recoverable. The coverage (share of supervised tokens with an entry) is reported; none at all is
an error.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracegen.data.token_bytes import byte_table
from tracegen.distill.cache import CacheWriter
from tracegen.distill.data import dataset_vocab_hash, load_rows, parquet_files, rows_fingerprint
from tracegen.errors import BadInputError
from tracegen.records import AssistantMessage, TokenLogprob, Trajectory
from tracegen.store import read_trajectories

ALIGNED_KINDS = ("reasoning", "answer")


@dataclass(frozen=True)
class ApiCacheSummary:
    out: Path
    rows: int
    tokens: int
    aligned: int
    coverage: float  # aligned / supervised tokens
    top_k: int
    shards: int
    seconds: float


def _token_bytes(t: Any) -> bytes:
    return bytes(t.bytes) if t.bytes is not None else str(t.token).encode("utf-8")


def _teacher_spans(message: AssistantMessage) -> list[tuple[bytes, list[tuple[int, int, TokenLogprob]]]]:
    """(recorded text, its teacher tokens as (start, end, token) relative to that text) per field.

    The two channels are one stream here: a server may put the first content tokens on the last
    reasoning chunk, send inline ``<think>`` reasoning as content, or (non-streaming) everything as content.
    """
    tokens = [*(message.reasoning_logprobs or []), *(message.content_logprobs or [])]
    if not tokens:
        return []
    joined = b"".join(_token_bytes(t) for t in tokens)
    bounds = np.cumsum([0] + [len(_token_bytes(t)) for t in tokens])
    out = []
    cursor = 0
    for text in (message.reasoning, message.content):
        target = (text or "").encode("utf-8")
        at = joined.find(target, cursor) if target else -1
        if at < 0:
            continue
        inside = [
            (int(bounds[i]) - at, int(bounds[i + 1]) - at, t)
            for i, t in enumerate(tokens)
            if bounds[i] >= at and bounds[i + 1] <= at + len(target) and bounds[i + 1] > bounds[i]
        ]
        out.append((target, inside))
        cursor = at + len(target)
    return out


def _row_regions(spans: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Byte ranges of the row's reasoning and answer spans."""
    regions = []
    for sp in spans:
        if sp["kind"] in ALIGNED_KINDS:
            start = len(text[: sp["start"]].encode("utf-8"))
            regions.append((start, start + len(text[sp["start"] : sp["end"]].encode("utf-8"))))
    return regions


def align_row(trajectory: Trajectory, text: str, spans: list[dict[str, Any]]) -> dict[tuple[int, int], TokenLogprob]:
    """Teacher tokens keyed by the byte range of the row text they cover."""
    data = text.encode("utf-8")
    regions = _row_regions(spans, text)
    found: dict[tuple[int, int], TokenLogprob] = {}
    cursor = 0
    for message in trajectory.messages:
        if not isinstance(message, AssistantMessage):
            continue
        for target, tokens in _teacher_spans(message):
            at = data.find(target, cursor)
            while at >= 0 and not any(a <= at and at + len(target) <= b for a, b in regions):
                at = data.find(target, at + 1)
            if at < 0:
                continue
            for start, end, token in tokens:
                found[(at + start, at + end)] = token
            cursor = at + len(target)
    return found


def entry(
    token: TokenLogprob, target: int, vocab_ids: dict[bytes, int], k: int, temperature: float
) -> tuple[list[int], list[float], float]:
    """(ids, log-probs) padded to ``k`` with -inf, and lse_T, for one aligned token."""
    listed: dict[int, float] = {target: token.logprob}
    for alt in token.top:
        i = vocab_ids.get(_token_bytes(alt))
        if i is not None and i not in listed and math.isfinite(alt.logprob):
            listed[i] = alt.logprob
    pairs = sorted(listed.items(), key=lambda kv: -kv[1])[:k]
    ids = [i for i, _ in pairs] + [pairs[0][0]] * (k - len(pairs))
    logprobs = [lp for _, lp in pairs] + [-math.inf] * (k - len(pairs))
    mass = sum(math.exp(lp) for _, lp in pairs)
    tail = max(0.0, 1.0 - mass)
    lse_t = math.log(sum(math.exp(lp / temperature) for _, lp in pairs) + tail ** (1.0 / temperature))
    return ids, logprobs, lse_t


def build_cache_from_logprobs(
    dataset_dir: Path,
    trajectories: Path,
    out: Path,
    *,
    tokenizer: str,
    temperature: float = 2.0,
    max_length: int = 4096,
) -> ApiCacheSummary:
    """Write a teacher cache for ``dataset_dir`` from the log-probs stored in ``trajectories``."""
    import pyarrow.parquet as pq

    from tracegen.data.tokenize import load_tokenizer

    started = time.perf_counter()
    rows = load_rows(dataset_dir)
    tok = load_tokenizer(tokenizer)
    expected = dataset_vocab_hash(dataset_dir)
    if expected is not None and tok.vocab_hash != expected:
        raise BadInputError(
            f"--tokenizer {tokenizer} (vocabulary {tok.vocab_hash}) is not the one {dataset_dir} was tokenized with "
            f"({expected})",
            hint="pass the dataset's (the student's) tokenizer; the API teacher must share it",
        )
    vocab_bytes = byte_table(tok)
    if not vocab_bytes.byte_level:  # decoded text is not the bytes a server reports: nothing would align
        raise BadInputError(
            f"--tokenizer {tokenizer}: KD from API log-probs needs a byte-level BPE tokenizer "
            "(Qwen, Llama 3, SmolLM, GPT-2 style)",
            hint="use a local teacher: `tracegen distill cache-teacher DATASET --teacher MODEL`",
        )
    by_id = {t.id: t for t in read_trajectories(trajectories)}
    meta_rows: list[tuple[str, str, list[dict[str, Any]]]] = []
    for path in parquet_files(dataset_dir):
        table = pq.read_table(path, columns=["id", "text", "spans"])
        for rid, text, spans in zip(*(table.column(c).to_pylist() for c in ("id", "text", "spans")), strict=True):
            meta_rows.append((rid, text, json.loads(spans) if isinstance(spans, str) else spans or []))
    k = 1 + max(
        (len(tok.top) for t in by_id.values() for m in t.messages if isinstance(m, AssistantMessage)
         for toks in (m.reasoning_logprobs, m.content_logprobs) if toks for tok in toks),
        default=0,
    )  # fmt: skip
    vocab = vocab_bytes.pieces
    vocab_ids: dict[bytes, int] = {}
    for i, b in enumerate(vocab):
        vocab_ids.setdefault(b, i)

    writer = CacheWriter(out)
    supervised = aligned = 0
    empty_ids, empty_lp = [0] * k, [-math.inf] * k
    for r, (row, (rid, text, spans)) in enumerate(zip(rows, meta_rows, strict=True)):
        trajectory = by_id.get(rid)
        teacher = align_row(trajectory, text, spans) if trajectory is not None else {}
        ends = np.cumsum([len(vocab[i]) for i in row.input_ids])
        ids_rows, lp_rows, lset_rows = [], [], []
        for u in range(1, min(len(row.input_ids), max_length)):
            if row.labels[u] == -100:
                continue
            span = (int(ends[u - 1]), int(ends[u]))
            token = teacher.get(span)
            if token is not None and _token_bytes(token) == vocab[row.input_ids[u]]:
                ids, lps, lse_t = entry(token, row.input_ids[u], vocab_ids, k, temperature)
                aligned += 1
            else:
                ids, lps, lse_t = empty_ids, empty_lp, 0.0
            ids_rows.append(ids)
            lp_rows.append(lps)
            lset_rows.append(lse_t)
        supervised += len(ids_rows)
        writer.add(
            np.asarray(ids_rows, dtype=np.int32).reshape(-1, k),
            np.asarray(lp_rows, dtype=np.float16).reshape(-1, k),
            np.zeros(len(ids_rows), dtype=np.float32),
            np.asarray(lset_rows, dtype=np.float32),
            [len(ids_rows)],
        )
        if (r + 1) % 100 == 0 or r + 1 == len(rows):
            print(
                f"cache-teacher (API log-probs): {r + 1}/{len(rows)} rows, {aligned}/{supervised} aligned",
                file=sys.stderr,
            )
    if aligned == 0:
        raise BadInputError(
            f"no supervised token of {dataset_dir} lines up with a stored teacher log-prob in {trajectories}",
            hint="collect with teacher.top_logprobs set (the server must return logprobs); format those trajectories",
        )
    teachers = sorted({t.teacher.model for t in by_id.values()})
    meta = {
        "teacher": ", ".join(teachers),
        "source": "api-logprobs",
        "vocab_hash": tok.vocab_hash,
        "vocab_size": len(vocab),
        "top_k": k,
        "temperature": temperature,
        "max_length": max_length,
        "dataset": str(dataset_dir),
        "dataset_fingerprint": rows_fingerprint(rows),
        "rows": len(rows),
        "aligned_tokens": aligned,
        "coverage": aligned / max(supervised, 1),
    }
    shards = writer.finish(meta)
    return ApiCacheSummary(
        out, len(rows), supervised, aligned, aligned / max(supervised, 1), k, shards, time.perf_counter() - started
    )
