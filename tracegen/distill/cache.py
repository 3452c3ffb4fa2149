"""The teacher cache: one forward pass of a local teacher, stored per supervised token.

Layout of a cache folder::

    cache.json                 teacher and its dtype, vocabulary hash, k, T, dataset fingerprint, rows, shards
    offsets.npy                int64 [rows + 1]: row r owns cache entries offsets[r]:offsets[r+1]
    shard-00000.ids.npy        int32   [n, k]  top-k token ids (by teacher logit)
    shard-00000.logprobs.npy   float16 [n, k]  their log-softmax at T=1
    shard-00000.lse1.npy       float32 [n]     logsumexp of the raw logits
    shard-00000.lset.npy       float32 [n]     logsumexp of logits / T

Entries follow the dataset's supervised positions in row-major order (see ``data``); a shard holds
whole rows. Arrays are plain ``.npy`` files opened with ``mmap_mode="r"``, so a cache larger than
memory trains fine. ``cache.json`` is written last: a folder without it is an unfinished cache.

Not guaranteed: log-probs are rounded to fp16 (about 3 significant digits), so KD from the cache
differs from KD on live teacher logits by that rounding.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracegen.distill.data import collate, load_rows, rows_fingerprint
from tracegen.distill.dtypes import DtypeName, resolve_dtype
from tracegen.distill.forward import supervised_logits
from tracegen.distill.losses import TeacherTopK, topk_from_logits
from tracegen.distill.vocab import vocab_hash
from tracegen.errors import BadInputError
from tracegen.store import write_json_atomic

CACHE_FORMAT = 1
ARRAYS = ("ids", "logprobs", "lse1", "lset")


@dataclass(frozen=True)
class CacheSummary:
    out: Path
    rows: int
    tokens: int
    top_k: int
    shards: int
    seconds: float
    mean_topk_mass_t: float  # mean teacher probability mass inside the top-k at temperature T


def build_cache(
    dataset_dir: Path,
    teacher: str,
    out: Path,
    *,
    top_k: int = 64,
    temperature: float = 2.0,
    batch_size: int = 4,
    max_length: int = 4096,
    shard_tokens: int = 1 << 20,
    dtype: DtypeName = "auto",
) -> CacheSummary:
    """Run ``teacher``, loaded in ``dtype`` (auto: its checkpoint's), once over the dataset's supervised positions
    and write the cache to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    rows = load_rows(dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    weights_dtype = resolve_dtype(dtype, teacher)
    model: Any = AutoModelForCausalLM.from_pretrained(teacher, dtype=weights_dtype)  # transformers' types are partial
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if top_k > vocab:
        raise BadInputError(f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab})")
    writer = CacheWriter(out, shard_tokens)
    mass_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            indices = list(range(start, min(start + batch_size, len(rows))))
            batch = collate(rows, indices, max_length, pad_id=tokenizer.pad_token_id or 0)
            logits = supervised_logits(model, batch, device).logits
            topk = topk_from_logits(logits, top_k, temperature)
            mass_sum += float(
                (topk.logprobs + topk.lse1.unsqueeze(-1))
                .div(temperature)
                .sub(topk.lse_t.unsqueeze(-1))
                .exp()
                .sum()
                .item()
            )
            writer.add(
                topk.ids.to(torch.int32).cpu().numpy(),
                topk.logprobs.to(torch.float16).cpu().numpy(),
                topk.lse1.float().cpu().numpy(),
                topk.lse_t.float().cpu().numpy(),
                [int(n) for n in batch.supervised().sum(dim=1).tolist()],
            )
            print(f"cache-teacher: {start + len(indices)}/{len(rows)} rows, {writer.tokens} tokens", file=sys.stderr)
    tokens = writer.tokens
    meta = {
        "teacher": teacher,
        "teacher_dtype": str(weights_dtype).removeprefix("torch."),
        "vocab_hash": vocab_hash(tokenizer),
        "vocab_size": vocab,
        "top_k": top_k,
        "temperature": temperature,
        "max_length": max_length,
        "dataset": str(dataset_dir),
        "dataset_fingerprint": rows_fingerprint(rows),
        "rows": len(rows),
        "mean_topk_mass_t": mass_sum / max(tokens, 1),
    }
    shards = writer.finish(meta)
    return CacheSummary(out, len(rows), tokens, top_k, shards, time.perf_counter() - started, mass_sum / max(tokens, 1))


class CacheWriter:
    """Writes a cache folder: entries arrive row by row, in dataset order; ``cache.json`` goes last."""

    def __init__(self, out: Path, shard_tokens: int = 1 << 20) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cache.json").unlink(missing_ok=True)  # unfinished until rewritten at the end
        self.out = out
        self.shard_tokens = shard_tokens
        self.offsets = [0]
        self.shards: list[dict[str, int]] = []
        self._pending: dict[str, list[np.ndarray[Any, Any]]] = {name: [] for name in ARRAYS}
        self._rows = 0
        self._tokens = 0

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(
        self,
        ids: np.ndarray[Any, Any],
        logprobs: np.ndarray[Any, Any],
        lse1: np.ndarray[Any, Any],
        lset: np.ndarray[Any, Any],
        per_row: list[int],
    ) -> None:
        """The entries of consecutive rows (``per_row`` of them each), as int32 / fp16 / fp32 / fp32 arrays."""
        for name, arr in zip(ARRAYS, (ids, logprobs, lse1, lset), strict=True):
            self._pending[name].append(arr)
        for n in per_row:
            self.offsets.append(self.offsets[-1] + n)
        self._rows += len(per_row)
        self._tokens += sum(per_row)
        if self._tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if self._rows == 0:
            return
        index = len(self.shards)
        for name in ARRAYS:
            np.save(self.out / f"shard-{index:05d}.{name}.npy", np.concatenate(self._pending[name]))
            self._pending[name] = []
        self.shards.append({"rows": self._rows, "tokens": self._tokens})
        self._rows = self._tokens = 0

    def finish(self, meta: dict[str, Any]) -> int:
        """Write the last shard, the offsets and ``cache.json`` (``meta`` plus format, tokens, shards)."""
        self._flush()
        np.save(self.out / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        write_json_atomic(
            self.out / "cache.json", {**meta, "format": CACHE_FORMAT, "tokens": self.tokens, "shards": self.shards}
        )
        return len(self.shards)


class TeacherCache:
    """Read side: memory-maps the shards and serves the entries of a batch's rows."""

    def __init__(self, path: Path) -> None:
        meta_path = path / "cache.json"
        if not meta_path.is_file():
            raise BadInputError(
                f"{path}: not a finished teacher cache (no cache.json)",
                hint="run `tracegen distill cache-teacher DATASET_DIR --teacher MODEL --out CACHE_DIR`",
            )
        self.path = path
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != CACHE_FORMAT:
            raise BadInputError(f"{path}: cache format {self.meta.get('format')} is not {CACHE_FORMAT}")
        self.offsets = np.load(path / "offsets.npy")
        self.temperature = float(self.meta["temperature"])
        self.vocab_hash = str(self.meta["vocab_hash"])
        self._shards: list[dict[str, np.ndarray[Any, Any]]] = []
        self._row_shard: list[int] = []
        self._shard_token_start: list[int] = []
        token = 0
        for i, shard in enumerate(self.meta["shards"]):
            self._shards.append({name: np.load(path / f"shard-{i:05d}.{name}.npy", mmap_mode="r") for name in ARRAYS})
            self._row_shard.extend([i] * int(shard["rows"]))
            self._shard_token_start.append(token)
            token += int(shard["tokens"])

    def rows(self) -> int:
        return int(self.meta["rows"])

    def entries(self, row: int, count: int, skip: int = 0) -> dict[str, np.ndarray[Any, Any]]:
        """Entries ``skip`` to ``skip + count`` of ``row`` (a row cut shorter than at cache time keeps a
        prefix; a window of a row starts further in)."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if skip + count > end - start:
            raise BadInputError(
                f"{self.path}: row {row} has {end - start} cached tokens, the batch needs {skip + count}",
                hint="rebuild the cache with the same dataset and a --max-length at least the training one",
            )
        shard = self._row_shard[row]
        lo = start + skip - self._shard_token_start[shard]
        return {name: arr[lo : lo + count] for name, arr in self._shards[shard].items()}

    def batch(
        self, rows: list[int], counts: list[int], device: torch.device, skips: list[int] | None = None
    ) -> TeacherTopK:
        skips = skips or [0] * len(rows)
        parts = [self.entries(r, c, s) for r, c, s in zip(rows, counts, skips, strict=True)]

        def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([p[name] for p in parts])).to(device=device, dtype=dtype)

        return TeacherTopK(
            cat("ids", torch.long),
            cat("logprobs", torch.float32),
            cat("lse1", torch.float32),
            cat("lset", torch.float32),
        )
