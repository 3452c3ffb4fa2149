"""Reading a formatted dataset for training, and batching it.

A formatted dataset (``tracegen format``) is a folder with ``data/*.parquet``; training needs only
the ``input_ids``, ``labels`` (-100 where masked) and ``proof_mask`` columns. Files whose names start
with ``train`` are used when there are any (the Hub layout); otherwise every parquet file, sorted.

Supervised positions: position ``t`` of a row is supervised when ``labels[t + 1] != -100`` (the hidden
state at ``t`` predicts token ``t + 1``). The teacher cache stores one entry per supervised position in
exactly this row-major order, so a row cut to ``max_length`` keeps a prefix of its cache entries.

Windows (the ``topology`` option): a row longer than the window is trained as overlapping windows.
Window k covers tokens ``[start, end)`` and *owns* the targets ``u`` (token indices, ``labels[u]``)
in ``[own_from, end)``, where ``own_from`` is the previous window's ``end`` (0 for the first): the
overlap ``[start, own_from)`` is context only, so every target is trained exactly once. The owned
targets are a contiguous run of the row's supervised positions, so a window reads the contiguous
slice of its row's cache entries that starts at :func:`cache_start`.

Curriculum (the ``topology`` option): :func:`curriculum_phases` sorts the samples by difficulty,
and :func:`curriculum_batches` shuffles within each phase; the order stays a pure function of
(seed, epoch), so resume is exact.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tracegen.config import SplitMethod
from tracegen.errors import BadInputError

REQUIRED_COLUMNS = ("input_ids", "labels", "proof_mask")
METADATA_FILES = ("tracegen.json", "dataset_info.json", "metadata.json")


class Row(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    proof_mask: list[int]


class Batch(NamedTuple):
    """A micro-batch; ``rows`` are dataset row indices (for the teacher cache).

    Right-padded (``collate``: one row per sequence), or padding-free (``collate_packed``: every
    sequence end to end in one row, ``position_ids`` restarting at 0 for each, ``segments`` their lengths).
    """

    rows: list[int]
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, -100 masked and padded
    proof_mask: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor | None = None  # [1, L] int64 when packed
    segments: list[int] | None = None  # when packed: each sequence's length, in ``rows`` order

    def supervised(self) -> torch.Tensor:
        """Boolean ``[B, L-1]``: the positions whose next-token label is trained."""
        return self.labels[:, 1:] != -100

    def n_supervised(self) -> int:
        return int(self.supervised().sum().item())

    def counts(self) -> list[int]:
        """Supervised positions per sequence (per entry of ``rows``), in order: the teacher cache's slices."""
        sup = self.supervised()
        if self.segments is None:
            return [int(n) for n in sup.sum(dim=1).tolist()]
        # A sequence's first token is never a target (collate_packed masks it), so every supervised
        # position t of the sequence spanning [start, end) lies in [start, end - 1).
        out, start = [], 0
        for length in self.segments:
            out.append(int(sup[0, start : start + length - 1].sum()))
            start += length
        return out


def parquet_files(dataset_dir: Path) -> list[Path]:
    files = sorted((dataset_dir / "data").glob("*.parquet")) or sorted(dataset_dir.glob("*.parquet"))
    if not files:
        raise BadInputError(
            f"{dataset_dir}: no data/*.parquet files", hint="point at a folder written by `tracegen format`"
        )
    train = [f for f in files if f.name.startswith("train")]
    return train or files


def load_rows(dataset_dir: Path) -> list[Row]:
    """Every row's ids, labels and proof mask; checks the lengths agree (exit 2 when not)."""
    import pyarrow.parquet as pq

    rows: list[Row] = []
    for path in parquet_files(dataset_dir):
        table = pq.read_table(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise BadInputError(
                f"{path}: missing column(s) {', '.join(missing)}",
                hint="format the dataset with a tokenizer: `tracegen format ... --tokenizer TOK`",
            )
        cols = [table.column(c).to_pylist() for c in REQUIRED_COLUMNS]
        for i, (ids, labels, proof) in enumerate(zip(*cols, strict=True)):
            if ids is None or labels is None or proof is None or not (len(ids) == len(labels) == len(proof)):
                raise BadInputError(f"{path}: row {i}: input_ids, labels and proof_mask must have equal lengths")
            rows.append(Row(list(ids), list(labels), [int(bool(p)) for p in proof]))
    if not rows:
        raise BadInputError(f"{dataset_dir}: the dataset has no rows")
    return rows


def dataset_metadata(dataset_dir: Path) -> dict[str, Any]:
    """The format stage's metadata (tokenizer name, vocabulary hash), when the folder has it."""
    for name in METADATA_FILES:
        path = dataset_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def dataset_vocab_hash(dataset_dir: Path) -> str | None:
    """The vocabulary hash the dataset was tokenized with, if its metadata records one."""
    meta = dataset_metadata(dataset_dir)
    for container in (meta, meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}):
        for key in ("vocab_hash", "tokenizer_vocab_hash", "vocabulary_hash"):
            value = container.get(key) if isinstance(container, dict) else None
            if isinstance(value, str) and value:
                return value
    return None


def rows_fingerprint(rows: list[Row]) -> str:
    """Hash of every row's ids and labels: a teacher cache belongs to exactly one dataset."""
    h = hashlib.sha256()
    for row in rows:
        h.update(np.asarray(row.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(row.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def n_supervised(row: Row, max_length: int | None = None) -> int:
    labels = row.labels[:max_length] if max_length else row.labels
    return sum(1 for x in labels[1:] if x != -100)


def collate(rows: list[Row], indices: list[int], max_length: int, pad_id: int = 0) -> Batch:
    """Right-pad rows ``indices`` (cut to ``max_length``) into one batch."""
    cut = [rows[i] for i in indices]
    length = max(min(len(r.input_ids), max_length) for r in cut)
    ids = torch.full((len(cut), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(cut), length), dtype=torch.long)
    labels = torch.full((len(cut), length), -100, dtype=torch.long)
    proof = torch.zeros((len(cut), length), dtype=torch.long)
    for b, row in enumerate(cut):
        n = min(len(row.input_ids), max_length)
        ids[b, :n] = torch.tensor(row.input_ids[:n], dtype=torch.long)
        attn[b, :n] = 1
        labels[b, :n] = torch.tensor(row.labels[:n], dtype=torch.long)
        proof[b, :n] = torch.tensor(row.proof_mask[:n], dtype=torch.long)
    return Batch(list(indices), ids, attn, labels, proof)


def collate_packed(rows: list[Row], indices: list[int], max_length: int) -> Batch:
    """Padding-free: rows ``indices`` (each cut to ``max_length``) end to end in one sequence.

    ``position_ids`` restart at 0 for every row, which makes transformers build a block-diagonal causal
    mask (no attention across rows; ``attention_mask`` must then be left out of the forward call). The
    first token of each row gets label -100, so no row's last token is trained to predict the next
    row's first: the supervised positions, and the loss, are exactly those of ``collate``.
    """
    ids: list[int] = []
    labels: list[int] = []
    proof: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for i in indices:
        row = rows[i]
        n = min(len(row.input_ids), max_length)
        ids += row.input_ids[:n]
        labels += [-100, *row.labels[1:n]]
        proof += row.proof_mask[:n]
        positions += range(n)
        segments.append(n)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long)

    ones = torch.ones((1, len(ids)), dtype=torch.long)
    return Batch(list(indices), tensor(ids), ones, tensor(labels), tensor(proof), tensor(positions), segments)


class Split(NamedTuple):
    train: list[int]
    eval: list[int]


def split_indices(n: int, eval_fraction: float, seed: int = 42, method: SplitMethod = "torch") -> Split:
    """Row indices of the train and eval splits, each sorted.

    ``torch``: eval is ``floor(n * eval_fraction)`` rows, the first of a ``torch.randperm`` seeded
    with ``seed``. ``hf``: exactly ``datasets.Dataset.train_test_split(test_size=eval_fraction,
    seed=seed)`` (counts and membership): eval is ``ceil(n * eval_fraction)`` rows, the first of
    ``numpy.random.default_rng(seed).permutation(n)``, so a card that reports a Hub split (5,815 /
    307 of 6,122 at 0.05, seed 42) gets the same rows. An ``eval_fraction`` of 0 holds out nothing.
    """
    if eval_fraction <= 0:
        return Split(list(range(n)), [])
    if method == "hf":
        n_eval = math.ceil(eval_fraction * n)  # datasets' own expression, float rounding included
        order = np.random.default_rng(seed).permutation(n).tolist()
    else:
        n_eval = int(n * eval_fraction)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Split(sorted(order[n_eval:]), sorted(order[:n_eval]))


def held_out_tasks(dataset_dir: Path, eval_fraction: float, seed: int, method: SplitMethod) -> list[dict[str, Any]]:
    """The rows distill holds out (the same split as training), as eval tasks: id, prompt, reference.

    The prompt is the row's first user message, the reference its last assistant message's content
    (the answer the card scores against). Rows without either are left out.
    """
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in parquet_files(dataset_dir):
        rows += pq.read_table(path, columns=["id", "messages"]).to_pylist()
    tasks = []
    for i in split_indices(len(rows), eval_fraction, seed, method).eval:
        messages = rows[i]["messages"] or []
        prompt = next((m["content"] for m in messages if m["role"] == "user" and m["content"]), None)
        answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant" and m["content"]), None)
        if prompt and answer:
            tasks.append({"id": str(rows[i]["id"]), "prompt": prompt, "reference": answer})
    return tasks


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def micro_batches(train: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a shuffle seeded by ``(seed, epoch)``, so resume is exact."""
    g = _epoch_generator(seed, epoch)
    order = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Window(NamedTuple):
    """Part ``[start, end)`` of dataset row ``row``; it trains the targets in ``[own_from, end)``."""

    row: int
    start: int
    end: int
    own_from: int


def adaptive_windows(
    row: int, length: int, density: list[float], window: int, min_overlap: int, max_overlap: int
) -> list[Window]:
    """Cut a row of ``length`` tokens into windows of at most ``window`` tokens.

    The next window starts at the position of lowest ``density`` (per token) among those leaving an
    overlap of ``min_overlap`` to ``max_overlap`` tokens with the previous window (the latest such
    position on a tie: the least recomputation). Needs ``1 <= min_overlap <= max_overlap < window``.
    """
    windows = [Window(row, 0, min(length, window), 0)]
    while windows[-1].end < length:
        end = windows[-1].end
        candidates = range(end - max_overlap, end - min_overlap + 1)
        start = min(candidates, key=lambda s: (density[s], -s))
        windows.append(Window(row, start, min(start + window, length), end))
    return windows


def window_row(row: Row, w: Window) -> Row:
    """The window as a row of its own: targets before ``own_from`` masked (the previous window trains them)."""
    labels = [label if u >= w.own_from else -100 for u, label in enumerate(row.labels[: w.end])]
    return Row(row.input_ids[w.start : w.end], labels[w.start :], row.proof_mask[w.start : w.end])


def cache_start(row: Row, w: Window) -> int:
    """Index of the window's first cache entry among its row's: the supervised targets before ``own_from``."""
    return sum(1 for label in row.labels[1 : w.own_from] if label != -100)


def curriculum_phases(difficulty: list[float], phases: int, easiest_fraction: float) -> list[list[int]]:
    """Sample indices grouped into ``phases`` phases of rising difficulty.

    Samples are sorted by difficulty (ties by index). The first phase is the easiest
    ``round(easiest_fraction * n)`` samples (at least one); the rest are split into ``phases - 1``
    consecutive bands whose sizes differ by at most one (the earlier bands the larger). One phase
    holds every sample.
    """
    ranked = sorted(range(len(difficulty)), key=lambda i: (difficulty[i], i))
    if phases == 1 or not ranked:
        return [ranked]
    n_easy = min(len(ranked), max(1, round(easiest_fraction * len(ranked))))
    rest = ranked[n_easy:]
    size, extra = divmod(len(rest), phases - 1)
    bands, at = [ranked[:n_easy]], 0
    for k in range(phases - 1):
        step = size + (1 if k < extra else 0)
        bands.append(rest[at : at + step])
        at += step
    return bands


def curriculum_batches(phases: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch in phase order: each phase shuffled, then all phases concatenated and cut into batches.

    One generator seeded by ``(seed, epoch)`` (as :func:`micro_batches`) shuffles phase 1, then
    phase 2, and so on; a micro-batch may span the boundary of two phases.
    """
    g = _epoch_generator(seed, epoch)
    order = [phase[i] for phase in phases for i in torch.randperm(len(phase), generator=g).tolist()]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
