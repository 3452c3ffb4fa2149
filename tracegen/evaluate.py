"""``tracegen eval``: measure a served model on a task set with the collect loop and filter's verifiers.

The model under test sits in the teacher's seat of an ordinary collect run (same client, retries,
tools, runtimes, resume), so OUT holds ``trajectories.jsonl`` and ``manifest.json`` as collect writes
them. Each answer is then scored:

- ``correct``: the ``reference`` check of filter (numbers, fractions, LaTeX, sympy, choice letters)
  when the task has a reference; with ``tests: true`` also the task's tests in the Docker sandbox.
  An answer is correct when every check that applied passed; a task with neither is not scored.
- ``finish_reason`` of the answer's last turn: ``stop`` means the model converged on an answer,
  ``length`` that it ran into the token wall (the metric the agentic card reports per question).

``OUT/eval.json`` (written atomically) carries one row per answer and the totals. Re-running resumes
the collect part; scoring is recomputed (it is cheap, tests aside). Changing what is asked (template,
sampling, model) while reusing OUT is refused, since old answers would be mixed with new ones.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracegen.checks.reference import reference_verdict
from tracegen.collect.driver import TRAJECTORIES, run_collect
from tracegen.config import EvalConfig
from tracegen.data.templates import prompt_part
from tracegen.errors import BadInputError
from tracegen.records import AssistantMessage, Task, Trajectory, Verdict
from tracegen.store import read_trajectories, write_json_atomic

EVAL_JSON = "eval.json"
ANSWER_CHARS = 200  # of each final answer kept in eval.json (the full text is in trajectories.jsonl)


@dataclass
class AnswerRow:
    task_id: str
    sample: int
    finish_reason: str  # of the last turn; "none" when no turn came back
    stop_reason: str
    correct: bool | None  # None: no check applied (no reference, no tests)
    checks: dict[str, str]  # check name -> its verdict's reason
    completion_tokens: int
    turns: int
    answer: str


@dataclass
class EvalSummary:
    out: Path
    model: str
    rows: list[AnswerRow] = field(default_factory=list)
    interrupted: bool = False

    def totals(self) -> dict[str, Any]:
        n = len(self.rows)
        scored = [r for r in self.rows if r.correct is not None]
        finish = collections.Counter(r.finish_reason for r in self.rows)
        return {
            "answers": n,
            "questions": len({r.task_id for r in self.rows}),
            "scored": len(scored),
            "correct": sum(1 for r in scored if r.correct),
            "accuracy": round(sum(1 for r in scored if r.correct) / len(scored), 4) if scored else None,
            "converged": round(finish["stop"] / n, 4) if n else None,
            "hit_length": round(finish["length"] / n, 4) if n else None,
            "by_finish_reason": dict(finish),
            "by_stop_reason": dict(collections.Counter(r.stop_reason for r in self.rows)),
            "mean_completion_tokens": round(sum(r.completion_tokens for r in self.rows) / n, 1) if n else None,
        }


def settings_key(config: EvalConfig) -> str:
    """What decides the answers: the collect fingerprint (model, sampling, tools...) plus the prompt wrapping."""
    blob = json.dumps([config.collect_config().fingerprint(), config.prompt_template], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_eval(config: EvalConfig, out: Path, show_progress: bool = True) -> EvalSummary:
    """Collect answers into ``out``, score them, write ``out/eval.json``; see the module docstring."""
    if not config.endpoint.url() or not config.endpoint.model:
        raise BadInputError(
            "no model to evaluate",
            hint="pass --base-url and --model (or set eval.endpoint.base_url / eval.endpoint.model in the recipe)",
        )
    key = settings_key(config)
    _refuse_changed_settings(out, key)
    collect = config.collect_config()
    rewrite: Callable[[Task], Task] | None = None
    if config.prompt_template != "none":
        template = config.prompt_template
        rewrite = lambda t: t.model_copy(update={"prompt": prompt_part(template, t.prompt)})  # noqa: E731
    collected = run_collect(collect, out, show_progress=show_progress, rewrite=rewrite)
    summary = EvalSummary(out=out, model=config.endpoint.model)
    if collected.interrupted:
        summary.interrupted = True
        return summary
    collected.check_errors(config.fail_on_error, "eval.fail_on_error")
    trajectories = _read(out / TRAJECTORIES, collect.fingerprint())
    tests = asyncio.run(_run_tests(trajectories, config)) if config.tests else {}
    for t in trajectories:
        verdicts = [v for v in (reference_verdict(t, config.reference), tests.get(t.id)) if v is not None]
        summary.rows.append(_row(t, verdicts))
    summary.rows.sort(key=lambda r: (r.task_id, r.sample))
    write_json_atomic(
        out / EVAL_JSON,
        {
            "model": config.endpoint.model,
            "settings_key": key,
            "prompt_template": config.prompt_template,
            "sampling": config.endpoint.model_dump(include={"temperature", "top_p", "max_tokens", "seed"}),
            "totals": summary.totals(),
            "answers": [asdict(r) for r in summary.rows],
        },
    )
    return summary


def _refuse_changed_settings(out: Path, key: str) -> None:
    path = out / EVAL_JSON
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("settings_key")
    except ValueError:
        return
    if previous and previous != key:
        raise BadInputError(
            f"{out}: evaluated with different settings (key {previous}, now {key})",
            hint="use a new --out directory, or restore the earlier settings to resume",
        )


def _read(path: Path, fingerprint: str) -> list[Trajectory]:
    """The answers of this run (the file may hold only these: collect refuses a changed fingerprint)."""
    if not path.is_file():
        return []
    return [t for t in read_trajectories(path) if t.recipe_fingerprint == fingerprint]


async def _run_tests(trajectories: list[Trajectory], config: EvalConfig) -> dict[str, Verdict]:
    """filter's ``tests`` check on every answer whose task has tests, ``concurrency`` sandboxes at a time."""
    from tracegen.checks.task_tests import run_tests
    from tracegen.runtime.docker.pool import DockerRuntime

    with_tests = [t for t in trajectories if t.task.tests]
    if not with_tests:
        return {}
    runtime = DockerRuntime(config.docker)
    slots = asyncio.Semaphore(config.concurrency)

    async def one(t: Trajectory) -> tuple[str, Verdict]:
        async with slots:
            return t.id, await run_tests(t, runtime)

    await runtime.start()
    try:
        return dict(await asyncio.gather(*(one(t) for t in with_tests)))
    finally:
        await runtime.aclose()


def _row(t: Trajectory, verdicts: list[Verdict]) -> AnswerRow:
    turns = [m for m in t.messages if isinstance(m, AssistantMessage)]
    answer = (t.final_answer or "").strip()
    return AnswerRow(
        task_id=t.task.id,
        sample=t.sample_index,
        finish_reason=(turns[-1].finish_reason or "none") if turns else "none",
        stop_reason=t.stop_reason,
        correct=all(v.passed for v in verdicts) if verdicts else None,
        checks={v.check: v.reason for v in verdicts},
        completion_tokens=t.usage.completion_tokens,
        turns=len(turns),
        answer=answer if len(answer) <= ANSWER_CHARS else answer[: ANSWER_CHARS - 3] + "...",
    )


def print_eval(summary: EvalSummary, max_rows: int = 40) -> None:
    """Per-answer table (finish_reason per question, the agentic card's metric) and the totals."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {summary.model}", show_header=True)
    for name in ("task", "k", "finish", "stop", "correct", "tokens", "answer"):
        table.add_column(name, justify="right" if name in ("k", "tokens") else "left", overflow="fold")
    for r in summary.rows[:max_rows]:
        mark = "-" if r.correct is None else ("yes" if r.correct else "no")
        short = r.answer.replace("\n", " ")
        table.add_row(
            r.task_id, str(r.sample), r.finish_reason, r.stop_reason, mark, str(r.completion_tokens), short[:50]
        )
    if len(summary.rows) > max_rows:
        table.add_row(f"... {len(summary.rows) - max_rows} more in {summary.out / EVAL_JSON}", "", "", "", "", "", "")
    console = Console()
    console.print(table)
    t = summary.totals()
    accuracy = "n/a (no references)" if t["accuracy"] is None else f"{t['accuracy']:.1%} ({t['correct']}/{t['scored']})"
    converged = "n/a" if t["converged"] is None else f"{t['converged']:.1%}"
    wall = "n/a" if t["hit_length"] is None else f"{t['hit_length']:.1%}"
    console.print(
        f"{t['questions']} questions, {t['answers']} answers: accuracy {accuracy}; converged (finish_reason=stop) "
        f"{converged}, hit the token wall (length) {wall}; {summary.out / EVAL_JSON}"
    )
