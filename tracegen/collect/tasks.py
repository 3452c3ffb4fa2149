"""Loading tasks from a JSONL file or a local Hugging Face dataset, validated before any request.

Every task is checked up front: a bad line stops the run with ``file:line`` and the problem before a
single teacher call is made and before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

from tracegen.config import TaskColumns
from tracegen.errors import BadInputError
from tracegen.records import Task, TestsLanguage

LANGUAGES: tuple[TestsLanguage, ...] = get_args(TestsLanguage)


def load_tasks(path: Path, columns: TaskColumns, limit: int | None = None) -> list[Task]:
    if not path.exists():
        raise BadInputError(f"{path}: tasks not found", hint="pass --tasks FILE.jsonl or a dataset directory")
    if path.is_dir():
        rows: Iterable[tuple[str, Mapping[str, Any]]] = _dataset_rows(path)
    else:
        rows = _jsonl_rows(path)
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    examples: list[Task] = []  # multiple choice, k-shot: the first rows, shown before every question
    for where, row in rows:
        task = _to_task(where, row, columns)
        if columns.choices is not None:
            if len(examples) < columns.shots:
                examples.append(task)
                continue
            task = task.model_copy(update={"prompt": _with_shots(examples, task.prompt)})
        if task.id in seen:
            raise BadInputError(f"{where}: duplicate task id {task.id!r} (first at {seen[task.id]})")
        seen[task.id] = where
        tasks.append(task)
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise BadInputError(f"{path}: no tasks found")
    return tasks


def _jsonl_rows(path: Path) -> Iterable[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise BadInputError(f"{where}: each line must be a JSON object")
            yield where, row


def _dataset_rows(path: Path) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """A dataset saved with ``save_to_disk``, or a folder of parquet/jsonl files ``load_dataset`` reads."""
    import datasets  # heavy: only when tasks come from a dataset

    try:
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise BadInputError(f"{path}: cannot load dataset ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}[row {i}]", row


def _to_task(where: str, row: Mapping[str, Any], columns: TaskColumns) -> Task:
    prompt = row.get(columns.prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInputError(
            f"{where}: field {columns.prompt!r} must be a non-empty string",
            hint="set collect.task_columns.prompt in the recipe if the prompt lives in another field",
        )
    if columns.id not in row:
        raise BadInputError(
            f"{where}: missing field {columns.id!r} (the task id)",
            hint="give every task a unique id, or set collect.task_columns.id",
        )
    reference = row.get(columns.reference)
    tests = row.get(columns.tests)
    if columns.choices is not None:
        prompt, reference = _multiple_choice(where, row, prompt, reference, columns.choices)
    language = row.get(columns.language) or "python"  # absent, null (a dataset column) or empty
    if language not in LANGUAGES:
        raise BadInputError(
            f"{where}: field {columns.language!r} is {language!r}, not one of {', '.join(LANGUAGES)}",
            hint="name the language the task's tests are written in, or leave the field out for python",
        )
    return Task(
        id=str(row[columns.id]),
        prompt=prompt,
        reference=None if reference is None else str(reference),
        tests=None if tests is None else str(tests),
        language=language,
        metadata={k: row[k] for k in columns.metadata if k in row},
    )


MC_INSTRUCTION = "Answer with the letter of the correct option."


def _multiple_choice(where: str, row: Mapping[str, Any], question: str, answer: Any, column: str) -> tuple[str, str]:
    """The question with its options lettered A, B, ...; the reference as the right letter."""
    options = row.get(column)
    if not isinstance(options, list) or not 2 <= len(options) <= 26 or not all(isinstance(o, str) for o in options):
        raise BadInputError(
            f"{where}: field {column!r} must be a list of 2 to 26 option strings",
            hint="set task_columns.choices to the column holding the options",
        )
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if isinstance(answer, int) and 0 <= answer < len(options):
        answer = letters[answer]
    if not isinstance(answer, str) or answer.strip().upper() not in letters:
        raise BadInputError(f"{where}: the answer {answer!r} is neither an option letter nor a 0-based option index")
    lines = [question.strip(), *(f"{letter}. {option}" for letter, option in zip(letters, options, strict=True))]
    return "\n".join(lines), answer.strip().upper()


def _with_shots(examples: list[Task], prompt: str) -> str:
    """k-shot: each example question with its answer, then the question; the instruction once at the end."""
    shots = [f"{e.prompt}\nAnswer: {e.reference}" for e in examples]
    return "\n\n".join([*shots, f"{prompt}\n{MC_INSTRUCTION}"])
