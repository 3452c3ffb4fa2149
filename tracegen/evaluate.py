"""``tracegen eval``: measure a served model on a task set with the collect loop and filter's verifiers.

The model under test sits in the teacher's seat of an ordinary collect run (same client, retries,
tools, runtimes, resume), so OUT holds ``trajectories.jsonl`` and ``manifest.json`` as collect writes
them. Each answer is then scored:

- ``correct``: the ``reference`` check of filter (numbers, fractions, LaTeX, sympy, choice letters)
  when the task has a reference; with ``tests: true`` also the task's tests in the Docker sandbox.
  An answer is correct when every check that applied passed; a task with neither is not scored.
- ``finish_reason`` of the answer's last turn: ``stop`` means the model converged on an answer,
  ``length`` that it ran into the token wall (the metric the agentic card reports per question).
- What the cards also report: ``require_markers`` present in the answer (``Final Answer:``, the
  DualMind tags), empty answers, tool calls whose arguments did not parse (``parse_fail``), and the
  median and 90th percentile of the completion length.

``OUT/eval.json`` (written atomically) carries one row per answer and the totals. Several models
served the same way (one endpoint, the same sampling and prompts; :func:`run_comparison`) are
measured one after another into ``OUT/<model>/`` and compared side by side in ``OUT/compare.json``. Re-running resumes
the collect part; scoring is recomputed (it is cheap, tests aside). Changing what is asked (template,
sampling, model) while reusing OUT is refused, since old answers would be mixed with new ones.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import re
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
COMPARE_JSON = "compare.json"
COMPARED = ("accuracy", "converged", "hit_length", "with_markers", "empty_answers", "parse_fail",
            "median_completion_tokens", "p90_completion_tokens")  # fmt: skip
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
    markers_missing: list[str] = field(default_factory=list)  # of eval.require_markers, in the answer's text
    parse_failures: int = 0  # tool calls whose arguments did not parse


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
            "median_completion_tokens": _percentile([r.completion_tokens for r in self.rows], 50),
            "p90_completion_tokens": _percentile([r.completion_tokens for r in self.rows], 90),
            "empty_answers": sum(1 for r in self.rows if not r.answer),
            "parse_fail": sum(r.parse_failures for r in self.rows),
            "with_markers": sum(1 for r in self.rows if not r.markers_missing),
        }


def _percentile(values: list[int], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    if not values:
        return None
    ranked = sorted(values)
    at = (len(ranked) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ranked) - 1)
    return round(ranked[low] + (ranked[high] - ranked[low]) * (at - low), 1)


def settings_key(config: EvalConfig) -> str:
    """What decides the answers: the collect fingerprint (model, sampling, tools...) plus the prompt wrapping."""
    blob = json.dumps([config.collect_config().fingerprint(), config.prompt_template], sort_keys=True)
    # require_markers only changes the scoring, recomputed on every run: not part of the key.
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
        summary.rows.append(_row(t, verdicts, config.require_markers))
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


def _row(t: Trajectory, verdicts: list[Verdict], markers: list[str]) -> AnswerRow:
    turns = [m for m in t.messages if isinstance(m, AssistantMessage)]
    answer = (t.final_answer or "").strip()
    said = "\n".join(m.content or "" for m in turns)
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
        markers_missing=[m for m in markers if m not in said],
        parse_failures=sum(1 for m in turns for c in m.tool_calls if c.parse_error),
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
        f"{converged}, hit the token wall (length) {wall}; completion tokens median {t['median_completion_tokens']}, "
        f"p90 {t['p90_completion_tokens']}; empty answers {t['empty_answers']}, parse_fail {t['parse_fail']}, "
        f"with the required markers {t['with_markers']}/{t['answers']}; {summary.out / EVAL_JSON}"
    )


def model_dir(out: Path, model: str) -> Path:
    """``OUT/<model>``, the model name made a safe folder name."""
    return out / (re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model")


def run_comparison(config: EvalConfig, models: list[str], out: Path, show_progress: bool = True) -> list[EvalSummary]:
    """Every model on the same endpoint, tasks and sampling, each into ``OUT/<model>``; then ``OUT/compare.json``.

    Stops at the first interrupted run (its answers are kept; re-running resumes every model).
    """
    dirs = [model_dir(out, m) for m in models]
    if len(set(dirs)) != len(dirs):
        raise BadInputError(f"--model names {', '.join(models)} repeat (or map to one folder)", hint="name each once")
    summaries = []
    for model, folder in zip(models, dirs, strict=True):
        summary = run_eval(config.model_copy(update={"endpoint": config.endpoint.model_copy(update={"model": model})}),
                           folder, show_progress)  # fmt: skip
        summaries.append(summary)
        if summary.interrupted:
            return summaries
    write_json_atomic(out / COMPARE_JSON, comparison(summaries))
    return summaries


def comparison(summaries: list[EvalSummary]) -> dict[str, Any]:
    """The compared totals per model, and each later model's difference from the first (the baseline)."""
    totals = [s.totals() for s in summaries]
    first = totals[0]

    def diff(value: Any, base: Any) -> float | None:
        return round(value - base, 4) if isinstance(value, int | float) and isinstance(base, int | float) else None

    return {
        "models": [s.model for s in summaries],
        "baseline": summaries[0].model,
        "metrics": {k: [t[k] for t in totals] for k in COMPARED},
        "difference": {k: [diff(t[k], first[k]) for t in totals[1:]] for k in COMPARED},
    }


def print_comparison(summaries: list[EvalSummary]) -> None:
    """One table: a row per metric, a column per model, then each model's difference from the first."""
    from rich.console import Console
    from rich.table import Table

    data = comparison(summaries)
    models = data["models"]
    table = Table(title=f"eval: {len(models)} models, difference from {models[0]}", show_header=True)
    table.add_column("metric")
    for m in models:
        table.add_column(m, justify="right")
    for m in models[1:]:
        table.add_column(f"{m} - {models[0]}", justify="right")

    def cell(value: Any, signed: bool = False) -> str:
        if value is None:
            return "n/a"
        return f"{value:+g}" if signed else f"{value:g}"

    for k in COMPARED:
        values = [cell(v) for v in data["metrics"][k]]
        table.add_row(k, *values, *(cell(d, signed=True) for d in data["difference"][k]))
    Console().print(table)
