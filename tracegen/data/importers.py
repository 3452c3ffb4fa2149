"""Import chain-of-thought datasets without tool calls (question / CoT / response columns) as trajectories.

So a user can format and distill data they did not collect: each row becomes a :class:`Trajectory`
with one user message (the question) and one assistant message whose ``reasoning`` is the chain of
thought and whose ``content`` is the answer. Provenance is honest: the teacher is recorded as
``imported:<source>`` with unknown sampling (zeros), and there are no tools and no observations.

Inputs: a ``.jsonl`` file, a ``.parquet`` file, or a local Hugging Face dataset folder (``save_to_disk``
output, or a folder of data files). A row missing a mapped column is an error naming file:row.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracegen import __version__
from tracegen.config import ImportColumns
from tracegen.errors import BadInputError
from tracegen.records import (
    AssistantMessage,
    RuntimeInfo,
    SamplingParams,
    Task,
    TeacherInfo,
    Timing,
    Trajectory,
    UserMessage,
)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a .jsonl / .parquet file, a local dataset folder or a Hub dataset id."""
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise BadInputError(f"{path}:{line_no}: not valid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise BadInputError(f"{path}:{line_no}: expected a JSON object")
                yield line_no, row
        return
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    if path.is_dir():
        import datasets

        try:
            ds: Any = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            ds = datasets.load_dataset(str(path), split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for i, row in enumerate(ds, 1):
            yield i, dict(row)
        return
    if not path.exists() and HUB_ID.fullmatch(str(path)):
        import datasets

        for i, row in enumerate(datasets.load_dataset(str(path), split="train"), 1):
            yield i, dict(row)
        return
    raise BadInputError(
        f"{path}: not a .jsonl / .parquet file, a dataset folder or a Hub dataset id",
        hint="check the path (relative paths in a recipe resolve against the recipe's folder)",
    )


def import_cot(path: Path, columns: ImportColumns) -> list[Trajectory]:
    source = columns.source or path.name
    out: list[Trajectory] = []
    for where, row in read_rows(path):
        values: dict[str, str] = {}
        for field in ("question", "reasoning", "answer"):
            col = getattr(columns, field)
            if col is None:  # instruction data: no chain of thought
                continue
            value = row.get(col)
            if not isinstance(value, str):
                have = ", ".join(sorted(row)) or "none"
                problem = "missing" if value is None else f"not text ({type(value).__name__})"
                raise BadInputError(
                    f"{path}:{where}: column '{col}' ({field}) is {problem}; columns here: {have}",
                    hint=f"map the columns with --import-columns {field}=NAME",
                )
            values[field] = value
        rid = str(row.get(columns.id)) if columns.id and row.get(columns.id) is not None else str(where)
        digest = hashlib.sha256(f"{source}\0{rid}".encode()).hexdigest()[:16]
        out.append(
            Trajectory(
                id=f"imp-{digest}",
                tracegen_version=__version__,
                recipe_fingerprint="imported",
                task=Task(id=rid, prompt=values["question"], metadata={"imported_from": source}),
                sample_index=0,
                teacher=TeacherInfo(
                    model=f"imported:{source}",
                    base_url_host="",
                    sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=0),
                ),
                runtime=RuntimeInfo(kind="simulated"),
                tools=[],
                messages=[
                    UserMessage(content=values["question"]),
                    AssistantMessage(content=values["answer"], reasoning=values.get("reasoning"), finish_reason="stop"),
                ],
                final_answer=values["answer"],
                stop_reason="answer",
                timing=Timing(started_at="1970-01-01T00:00:00Z"),
            )
        )
    if not out:
        raise BadInputError(f"{path}: no rows")
    return out
