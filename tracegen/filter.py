"""``tracegen filter``: rejection sampling. K samples per task in, the ones that solved it out.

Layout of a filter directory::

    FILTER_DIR/verdicts.jsonl   journal: one line per expensive verdict (tests, replay, judge), fsynced
    FILTER_DIR/kept.jsonl       kept trajectories, verdicts added          (written atomically, at the end)
    FILTER_DIR/rejected.jsonl   every other trajectory, with the verdicts that say why
    FILTER_DIR/report.json      counts per check, per task (k of K kept, pass@1, pass@K), tokens, judge cost

Checks (:mod:`tracegen.checks`: one protocol, built by name from :mod:`tracegen.checks.registry`) run
cheapest first, and a sample stops at its first failed check unless ``all_checks``:

1. ``structural`` and 2. ``duplicate`` always; 3. ``reference`` (pure functions of the records: they
   are recomputed on every run, in microseconds);
4. ``tests`` and 5. ``replay`` (the Docker sandbox: seconds, free) before 6. ``judge`` (an API: money).

Resume: every expensive verdict is appended to the journal (fsynced; a group of verdicts finishing
together shares one fsync) under the sample's id, a hash of its input line and a fingerprint of the
settings that decide it. A re-run reuses each journal verdict whose three keys match, so a judge is
never asked twice about the same sample with the same rubric; a changed rubric or sample asks again.
Verdicts recording a failure to check (``judge_error:``, ``tests_error:``, ``replay_error:``) are
retried. ``kill -9`` loses only verdicts still in flight. The input file is only read.

Selection, per task, among the samples that passed every check: ``all``; ``best`` (highest judge
score, then fewest completion tokens, then input order); or the ``k`` best. pass@1 / pass@K use the
unbiased estimator ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021) over each task's n samples, of
which c passed every check (an exact or near duplicate counts as its original).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import platform
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracegen import __version__
from tracegen.checks.judge import JUDGE_ERROR, JudgeCheck, is_error
from tracegen.checks.protocol import Check
from tracegen.checks.registry import CHECK_ORDER, build_checks
from tracegen.config import FilterConfig
from tracegen.errors import BadInputError
from tracegen.progress_bar import stage_bar
from tracegen.recipe import apply_overrides, load_recipe
from tracegen.records import Trajectory, Usage, Verdict
from tracegen.signals import cancel_on_sigterm
from tracegen.store import (
    JsonlStore,
    disk_errors,
    read_trajectory_lines,
    write_json_atomic,
    write_lines_atomic,
    writer_lock,
)

if TYPE_CHECKING:
    pass

JOURNAL = "verdicts.jsonl"
LOCK = ".lock"
KEPT = "kept.jsonl"
REJECTED = "rejected.jsonl"
REPORT = "report.json"


@dataclass
class Item:
    """One input sample on its way through the checks."""

    t: Trajectory
    line_hash: str
    verdicts: list[Verdict] = field(default_factory=list)
    failed: bool = False
    reused: set[str] = field(default_factory=set)
    details: dict[str, Any] = field(default_factory=dict)
    """Per check, the facts behind its verdict (replay: the per-call comparisons; duplicate: the original)."""

    def add(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        if not verdict.passed:
            self.failed = True

    @property
    def duplicate_of(self) -> str | None:
        return self.details.get("duplicate")

    @property
    def error(self) -> bool:
        return any(is_error(v) for v in self.verdicts)


@dataclass
class FilterSummary:
    out_dir: Path
    input_path: Path
    report: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------------------
# configuration and input


def filter_config(recipe: Path | None, overrides: dict[str, Any]) -> FilterConfig:
    """Defaults < the recipe's ``filter:`` section < flags (``None`` = not given)."""
    return apply_overrides(load_recipe(recipe).filter if recipe else FilterConfig(), overrides)


def resolve_input(path: Path) -> Path:
    """A run directory means its trajectories.jsonl; a filter directory its kept.jsonl."""
    if path.is_dir():
        for name in ("trajectories.jsonl", KEPT):
            if (path / name).is_file():
                return path / name
        raise BadInputError(f"{path}: no trajectories.jsonl (or kept.jsonl) in this folder")
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    return path


def prepare(input_path: Path, out_dir: Path, config: FilterConfig) -> Path:
    """Validate what can be validated before reading anything big or calling anyone."""
    source = resolve_input(input_path)
    for name in (KEPT, REJECTED, REPORT, JOURNAL):
        if (out_dir / name).resolve() == source.resolve():
            raise BadInputError(
                f"{source}: the input is one of the outputs of --out {out_dir}",
                hint="filter into a different --out directory; the input is never modified",
            )
    if "judge" in config.verifiers:
        for name, flag in (("base_url", "base-url"), ("model", "model")):
            if not (config.judge.url() if name == "base_url" else config.judge.model):
                raise BadInputError(
                    f"no judge {name.replace('_', ' ')} configured",
                    hint=f"pass --judge-{flag}, set TRACEGEN_JUDGE_{name.upper()}, or set filter.judge.{name} "
                    "in the recipe",
                )
    if config.structural.answer_pattern is not None:
        try:
            re.compile(config.structural.answer_pattern)
        except re.error as exc:
            raise BadInputError(f"filter.structural.answer_pattern: invalid regex ({exc})") from exc
    return source


def read_items(path: Path) -> list[Item]:
    items = [
        Item(t, hashlib.blake2b(line.rstrip("\n").encode(), digest_size=12).hexdigest())
        for _, line, t in read_trajectory_lines(path)
    ]
    if not items:
        raise BadInputError(f"{path}: no trajectories in this file")
    return items


def load_journal(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest journal record per (sample id, check)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return out
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                out[(record["id"], record["check"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                raise BadInputError(
                    f"{path}:{line_no}: not a filter journal record",
                    hint="this file belongs to tracegen filter; use a fresh --out directory",
                ) from exc
    return out


# ---------------------------------------------------------------------------------------------------
# the run


def run_filter(input_path: Path, out_dir: Path, config: FilterConfig, show_progress: bool = True) -> FilterSummary:
    """Synchronous entry point; on Ctrl-C returns ``interrupted=True`` with every finished verdict journaled."""
    started = time.monotonic()
    source = prepare(input_path, out_dir, config)
    summary = FilterSummary(out_dir=out_dir, input_path=source)
    # The records are trees that refcounting frees; with 100k of them alive, the cyclic GC's full
    # collections (triggered by every allocation burst) cost more than the checks themselves.
    gc.disable()
    try:
        items = read_items(source)
        gc.freeze()
        gc.enable()
        with writer_lock(out_dir / LOCK, str(out_dir)), disk_errors(out_dir):
            stats = asyncio.run(run_checks(items, out_dir, config, show_progress))
            summary.wall_s = time.monotonic() - started
            summary.report = finish(items, source, out_dir, config, stats, summary.wall_s)
    except (KeyboardInterrupt, asyncio.CancelledError):
        summary.interrupted = True
    finally:
        gc.enable()
        gc.unfreeze()
    return summary


def alive(item: Item, config: FilterConfig) -> bool:
    return config.all_checks or not item.failed


async def run_checks(items: list[Item], out_dir: Path, config: FilterConfig, show_progress: bool) -> RunStats:
    """Every enabled check (:mod:`tracegen.checks.registry`): the cheap ones, then the costly ones."""
    checks = build_checks(config)
    try:
        await cheap_checks(items, [c for c in checks if c.cost == "cheap"], config)
        return await costly_checks(items, [c for c in checks if c.cost != "cheap"], out_dir, config, show_progress)
    finally:
        for check in checks:
            await check.aclose()


async def cheap_checks(items: list[Item], checks: Sequence[Check], config: FilterConfig) -> None:
    """In input order (the first of a duplicate group is the original); never journaled."""
    for item in items:
        for check in checks:
            if not alive(item, config):
                break
            if check.applies(item.t):
                verdict, details = await check(item.t)
                item.add(verdict)
                if details is not None:
                    item.details[check.name] = details


class Journal:
    """Appends journal lines; verdicts finishing together share one write and one fsync (group commit)."""

    def __init__(self, store: JsonlStore) -> None:
        self.store = store
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, record: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((json.dumps(record, ensure_ascii=False), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.store.append, "\n".join(line for line, _ in batch))
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise
            for _, future in batch:
                if not future.done():
                    future.set_result(None)


@dataclass
class RunStats:
    judge_calls: int = 0
    judge_usage: Usage = field(default_factory=Usage)
    computed: Counter[str] = field(default_factory=Counter)


async def costly_checks(
    items: list[Item], checks: Sequence[Check], out_dir: Path, config: FilterConfig, show_progress: bool
) -> RunStats:
    """Sandbox and model checks: concurrent (each cost class within its own limit), journaled, reused on resume."""
    stats = RunStats()
    store = JsonlStore(out_dir / JOURNAL)
    store.open()  # repairs a torn last line (kill -9 mid-write)
    journal_records = load_journal(store.path)

    def plan(item: Item) -> list[Check]:
        return [check for check in checks if check.applies(item.t)]

    pending = [item for item in items if alive(item, config) and plan(item)]
    if not pending:
        store.close()
        return stats
    journal = Journal(store)
    slots = {"sandbox": asyncio.Semaphore(config.concurrency), "model": asyncio.Semaphore(config.judge.concurrency)}
    progress = _Progress(len(pending), show_progress)
    cancel_on_sigterm()

    def reusable(item: Item, check: Check) -> Verdict | None:
        record = journal_records.get((item.t.id, check.name))
        if record is None or record.get("key") != check.key or record.get("input") != item.line_hash:
            return None
        verdict = Verdict.model_validate(record["verdict"])
        if is_error(verdict):
            return None  # a failure to check is asked again
        if record.get("details") is not None:
            item.details[check.name] = record["details"]
        return verdict

    async def run(item: Item) -> None:
        for check in plan(item):
            if not alive(item, config):
                break
            verdict = reusable(item, check)
            if verdict is not None:
                item.reused.add(check.name)
            else:
                async with slots[check.cost]:
                    verdict, details = await check(item.t)
                stats.computed[check.name] += 1
                if details is not None:
                    item.details[check.name] = details
                await journal.append(
                    {
                        "id": item.t.id,
                        "check": check.name,
                        "key": check.key,
                        "input": item.line_hash,
                        "verdict": verdict.model_dump(mode="json"),
                        "details": details,
                    }
                )
            item.add(verdict)
        progress.done(item)

    work: Iterator[Item] = iter(pending)

    async def worker() -> None:
        for item in work:
            await run(item)

    try:
        workers = min(len(pending), max(config.concurrency, config.judge.concurrency))
        with progress:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
    finally:
        for check in checks:
            if isinstance(check, JudgeCheck) and check.judge is not None:
                stats.judge_calls = check.judge.calls
                stats.judge_usage = check.judge.usage
        store.close()
    return stats


class _Progress:
    """A bar on stderr over the samples that need sandbox or judge checks."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.passed = self.failed = self.errors = 0
        self._progress, self._task = stage_bar("filter", total, enabled)

    def __enter__(self) -> _Progress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def done(self, item: Item) -> None:
        if item.error:
            self.errors += 1
        elif item.failed:
            self.failed += 1
        else:
            self.passed += 1
        self._progress.update(
            self._task, advance=1, stats=f"passed {self.passed} · failed {self.failed} · errors {self.errors}"
        )


# ---------------------------------------------------------------------------------------------------
# selection, outputs, report


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n <= 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    result = 1.0
    for i in range(n - c + 1, n + 1):
        result *= 1.0 - k / i
    return 1.0 - result


def _judge_score(item: Item) -> float:
    scores = [v.score for v in item.verdicts if v.check == "judge" and v.score is not None]
    return scores[-1] if scores else -1.0


def select(items: list[Item], config: FilterConfig) -> dict[str, list[Item]]:
    """Per task, the passing samples kept, best first; adds ``selection`` verdicts when not ``all``."""
    passing: dict[str, list[Item]] = {}
    for item in items:
        if not item.failed and not item.error:
            passing.setdefault(item.t.task.id, []).append(item)
    kept: dict[str, list[Item]] = {}
    limit = {"all": None, "best": 1, "k": config.k}[config.selection]
    for task_id, group in passing.items():
        ranked = sorted(enumerate(group), key=lambda p: (-_judge_score(p[1]), p[1].t.usage.completion_tokens, p[0]))
        ordered = [item for _, item in ranked]
        if limit is None:
            kept[task_id] = ordered
            continue
        kept[task_id] = ordered[:limit]
        for rank, item in enumerate(ordered, 1):
            chosen = rank <= limit
            item.add(
                Verdict(
                    check="selection",
                    passed=chosen,
                    score=_judge_score(item) if _judge_score(item) >= 0 else None,
                    reason=f"rank {rank} of {len(ordered)} passing samples of task {task_id} "
                    f"(selection={config.selection}, keeps {limit}; judge score, then fewer tokens)",
                )
            )
    return kept


def finish(
    items: list[Item], source: Path, out_dir: Path, config: FilterConfig, stats: RunStats, wall_s: float
) -> dict[str, Any]:
    """Select, write kept/rejected atomically, then report.json (last: its presence means complete)."""
    kept_by_task = select(items, config)
    kept_ids = {id(item) for group in kept_by_task.values() for item in group}

    def record(item: Item) -> str:
        ran = {v.check for v in item.verdicts}
        previous = [v for v in item.t.verdicts if v.check not in ran]
        return item.t.model_copy(update={"verdicts": previous + item.verdicts}).model_dump_json()

    write_lines_atomic(out_dir / KEPT, (record(i) for i in items if id(i) in kept_ids))
    write_lines_atomic(out_dir / REJECTED, (record(i) for i in items if id(i) not in kept_ids))
    report = build_report(items, kept_ids, source, config, stats, wall_s)
    write_json_atomic(out_dir / REPORT, report)
    return report


def build_report(
    items: list[Item], kept_ids: set[int], source: Path, config: FilterConfig, stats: RunStats, wall_s: float
) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {}
    rules: Counter[str] = Counter()
    for item in items:
        for v in item.verdicts:
            if v.check == "selection":
                continue
            c = checks.setdefault(v.check, {"ran": 0, "passed": 0, "failed": 0, "errors": 0, "reused": 0})
            c["ran"] += 1
            if is_error(v):
                c["errors"] += 1
            elif v.passed:
                c["passed"] += 1
            else:
                c["failed"] += 1
            c["reused"] += v.check in item.reused
            if v.check == "reference":
                rules[v.reason.split(":", 1)[0]] += 1
    for c in checks.values():
        c["acceptance_rate"] = round(c["passed"] / c["ran"], 4) if c["ran"] else None
    ordered_checks = {name: checks[name] for name in CHECK_ORDER if name in checks}

    # pass@k: a sample is correct when it passed every check; a duplicate counts as its original.
    correct_ids = {item.t.id for item in items if not item.failed and not item.error}
    by_task: dict[str, list[Item]] = {}
    for item in items:
        by_task.setdefault(item.t.task.id, []).append(item)
    big_k = max(len(group) for group in by_task.values())
    tasks: dict[str, dict[str, Any]] = {}
    for task_id, group in by_task.items():
        n = len(group)
        correct = sum(
            1
            for item in group
            if item.t.id in correct_ids or (item.duplicate_of is not None and item.duplicate_of in correct_ids)
        )
        tasks[task_id] = {
            "samples": n,
            "passed": correct,
            "kept": sum(1 for item in group if id(item) in kept_ids),
            "errors": sum(1 for item in group if item.error),
            "pass_at_1": round(pass_at_k(n, correct, 1), 4),
            "pass_at_k": round(pass_at_k(n, correct, big_k), 4),
        }
    kept_items = [item for item in items if id(item) in kept_ids]
    judge_usage = sum((v.usage for item in items for v in item.verdicts if v.check == "judge" and v.usage), Usage())
    prices = config.judge.prices
    replay_calls = [c for item in items for c in item.details.get("replay") or []]
    agreement = Counter(c["agreement"] for c in replay_calls)
    return {
        "kind": "tracegen.filter",
        "status": "complete",
        "tracegen_version": __version__,
        "input": str(source),
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_s": round(wall_s, 3),
        "trajectories": len(items),
        "tasks_count": len(by_task),
        "kept": len(kept_items),
        "rejected": len(items) - len(kept_items),
        "judge_errors": sum(1 for item in items for v in item.verdicts if v.reason.startswith(JUDGE_ERROR)),
        "check_errors": sum(1 for item in items if item.error),
        "acceptance_rate": round(len(kept_items) / len(items), 4),
        "k": big_k,
        "pass_at_1": round(sum(t["pass_at_1"] for t in tasks.values()) / len(tasks), 4),
        "pass_at_k": round(sum(t["pass_at_k"] for t in tasks.values()) / len(tasks), 4),
        "selection": {"mode": config.selection, "k": config.k if config.selection == "k" else None},
        "checks": ordered_checks,
        "reference_rules": dict(rules.most_common()),
        "tokens_kept": {
            "prompt": sum(i.t.usage.prompt_tokens for i in kept_items),
            "completion": sum(i.t.usage.completion_tokens for i in kept_items),
            "reasoning": sum(i.t.usage.reasoning_tokens for i in kept_items),
        },
        "judge": {
            "model": config.judge.model if "judge" in config.verifiers else None,
            "prompt_tokens": judge_usage.prompt_tokens,
            "completion_tokens": judge_usage.completion_tokens,
            "cost_usd": round(prices.cost(judge_usage.prompt_tokens, judge_usage.completion_tokens), 6)
            if prices
            else None,
            "requests_this_run": stats.judge_calls,
            "verdicts_this_run": stats.computed["judge"],
        },
        "replay": {
            "trajectories": sum(1 for item in items if "replay" in item.details),
            "calls": len(replay_calls),
            "exact": agreement["exact"],
            "normalised": agreement["normalised"],
            "differ": agreement["differ"],
            "material": sum(1 for c in replay_calls if c["material"]),
            "agreement_rate": round((agreement["exact"] + agreement["normalised"]) / len(replay_calls), 4)
            if replay_calls
            else None,
        },
        "tasks": tasks,
        "config": config.model_dump(mode="json"),
        "versions": {"python": platform.python_version()},
    }


def print_summary(summary: FilterSummary, max_tasks: int = 30) -> None:
    """The result tables on stdout: per check, per task (k of K kept), totals."""
    from rich.console import Console
    from rich.table import Table

    report = summary.report
    console = Console()
    checks = Table(title=f"filter: {summary.input_path} -> {summary.out_dir}")
    for column in ("check", "ran", "passed", "failed", "errors", "reused", "acceptance"):
        checks.add_column(column, justify="left" if column == "check" else "right")
    for name, c in report["checks"].items():
        rate = f"{c['acceptance_rate']:.1%}" if c["acceptance_rate"] is not None else "-"
        checks.add_row(name, *(str(c[k]) for k in ("ran", "passed", "failed", "errors", "reused")), rate)
    console.print(checks)
    tasks = Table(title="per task (k of K kept)")
    at_k = report["k"] > 1  # with K = 1, pass@K is pass@1: one column
    for column in ("task", "kept", "passed", "samples", "pass@1", *([f"pass@{report['k']}"] if at_k else [])):
        tasks.add_column(column, justify="left" if column == "task" else "right")
    for task_id, t in list(report["tasks"].items())[:max_tasks]:
        cells = [task_id, str(t["kept"]), str(t["passed"]), str(t["samples"]), f"{t['pass_at_1']:.2f}"]
        tasks.add_row(*cells, *([f"{t['pass_at_k']:.2f}"] if at_k else []))
    if len(report["tasks"]) > max_tasks:
        tasks.add_row(f"... {len(report['tasks']) - max_tasks} more in report.json", *[""] * (5 if at_k else 4))
    console.print(tasks)
    totals = Table(show_header=False, title="totals")
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    totals.add_row("kept / trajectories", f"{report['kept']} / {report['trajectories']}")
    if at_k:
        totals.add_row("pass@1 / pass@K (mean over tasks)", f"{report['pass_at_1']:.3f} / {report['pass_at_k']:.3f}")
    else:
        totals.add_row("pass@1 (mean over tasks)", f"{report['pass_at_1']:.3f}")
    tk = report["tokens_kept"]
    totals.add_row("tokens kept (completion / reasoning)", f"{tk['completion']:,} / {tk['reasoning']:,}")
    judge = report["judge"]
    if judge["model"]:
        cost = f" · ${judge['cost_usd']:.4f}" if judge["cost_usd"] is not None else ""
        totals.add_row(
            "judge tokens (prompt / completion)",
            f"{judge['prompt_tokens']:,} / {judge['completion_tokens']:,}{cost}",
        )
        totals.add_row(
            "judge requests this run / judge errors", f"{judge['requests_this_run']} / {report['judge_errors']}"
        )
    replayed = report["replay"]
    if replayed["calls"]:
        totals.add_row(
            "replay: calls exact / normalised / differ (material)",
            f"{replayed['exact']} / {replayed['normalised']} / {replayed['differ']} ({replayed['material']})",
        )
    totals.add_row("wall time", f"{summary.wall_s:.1f} s")
    console.print(totals)
