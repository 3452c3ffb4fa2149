"""``tracegen collect``: sample K trajectories per task with bounded concurrency, resumably.

Layout of a run directory::

    RUN_DIR/trajectories.jsonl   one complete Trajectory per line, fsynced as it finishes
    RUN_DIR/manifest.json        recipe, fingerprint, teacher (no key), counts, versions; atomic

Re-running the same command resumes: ids are deterministic, so every (task, sample) already in the
file is skipped, a torn last line is repaired, and nothing is duplicated. A trajectory that ended in
an *endpoint* error (the teacher unreachable, or refusing the key, URL or model) is not a sample of
the teacher's behaviour: it is retried on resume, and so is every error with ``retry_errors``. The
file stays append-only: the retried record has the same id and supersedes the error on read.

An endpoint error stops the run at once (every other trajectory would fail the same way). Ctrl-C
(or SIGTERM) stops cleanly and writes the manifest; ``kill -9`` loses only the trajectories still in
flight. One process writes a run directory at a time (:func:`tracegen.store.writer_lock`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tracegen import __version__
from tracegen.client.chat import ChatClient
from tracegen.collect.agent import Agent, trajectory_id
from tracegen.collect.progress import CollectProgress
from tracegen.collect.tasks import load_tasks
from tracegen.config import CollectConfig, EndpointConfig
from tracegen.errors import BadInputError, TracegenError
from tracegen.fingerprint import changed_settings
from tracegen.records import SCHEMA_VERSION, Task, ToolMessage, Trajectory
from tracegen.runtime.base import Runtime
from tracegen.signals import cancel_on_sigterm
from tracegen.store import JsonlStore, disk_errors, write_json_atomic, writer_lock

TRAJECTORIES = "trajectories.jsonl"
MANIFEST = "manifest.json"
LOCK = ".lock"


class _Halt(Exception):  # a signal inside the task group, not an error
    """An endpoint error: stop every worker."""


@dataclass
class CollectSummary:
    run_dir: Path
    planned: int = 0
    already_done: int = 0
    completed: int = 0
    by_stop_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    retrying: int = 0
    """Pairs whose earlier record was an error, sampled again this run."""
    by_observation: collections.Counter[str] = field(default_factory=collections.Counter)
    """Tool calls answered, by where the answer came from: executed, simulated, error."""
    requests: int = 0
    retries: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    first_error: str | None = None
    halted: str | None = None
    """The endpoint error that stopped the run, if one did."""

    @property
    def error_rate(self) -> float:
        return self.by_stop_reason["error"] / self.completed if self.completed else 0.0

    def check_errors(self, limit: float, setting: str) -> None:
        """TracegenError when an endpoint error stopped the run, or more than ``limit`` of this run's
        trajectories ended in error (``setting`` names the option that sets the limit, for the message)."""
        if self.halted:
            raise TracegenError(
                f"stopped at the first endpoint error: {self.halted}",
                hint="fix the teacher's URL, model or key, then re-run the same command: these errors are retried",
            )
        if self.completed and self.error_rate > limit:
            raise TracegenError(
                f"{self.by_stop_reason['error']} of {self.completed} trajectories ended in error "
                f"({self.error_rate:.0%} > {setting} {limit:.0%}); the first: {self.first_error}",
                hint=f"the others are in the `errors` field of the records in {self.run_dir / TRAJECTORIES}; "
                "re-run with --retry-errors to sample them again",
            )

    def add(self, trajectory: Trajectory) -> None:
        self.completed += 1
        self.by_stop_reason[trajectory.stop_reason] += 1
        if trajectory.errors and self.first_error is None:
            self.first_error = trajectory.errors[0].message
        for message in trajectory.messages:
            if isinstance(message, ToolMessage):
                self.by_observation[message.observation.source] += 1
        self.turns += trajectory.turns
        self.prompt_tokens += trajectory.usage.prompt_tokens
        self.completion_tokens += trajectory.usage.completion_tokens
        self.reasoning_tokens += trajectory.usage.reasoning_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "already_done": self.already_done,
            "completed": self.completed,
            "retrying": self.retrying,
            "by_stop_reason": dict(self.by_stop_reason),
            "tool_calls_by_source": dict(self.by_observation),
            "turns": self.turns,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "requests": self.requests,
            "retries": self.retries,
            "wall_s": round(self.wall_s, 3),
            "interrupted": self.interrupted,
            "halted": self.halted,
        }


def prepare(config: CollectConfig, run_dir: Path) -> list[Task]:
    """Validate everything that can be validated before the first request; nothing is written."""
    if not config.tasks:
        raise BadInputError("no tasks given", hint="pass --tasks FILE.jsonl or set collect.tasks in the recipe")
    for role, endpoint in (("teacher", config.teacher), ("simulator", config.simulator_endpoint())):
        for name, flag in (("base_url", "base-url"), ("model", "model")):
            if not (endpoint.url() if name == "base_url" else endpoint.model):
                raise BadInputError(
                    f"no {role} {name.replace('_', ' ')} configured",
                    hint=f"pass --{role}-{flag}, set TRACEGEN_{role.upper()}_{name.upper()}, or set "
                    f"collect.{role}.{name} in the recipe",
                )
    manifest = run_dir / MANIFEST
    if manifest.exists():
        try:
            earlier = json.loads(manifest.read_text())
        except ValueError:
            earlier = {}
        previous = earlier.get("recipe_fingerprint")
        if previous and previous != config.fingerprint():
            changes = changed_settings(earlier.get("generation"), config.generation_settings())
            what = (
                "; ".join(changes) if "generation" in earlier else f"fingerprint {previous}, now {config.fingerprint()}"
            )
            raise BadInputError(
                f"{run_dir}: collected with different generation settings ({what})",
                hint="use a new --out directory, or restore the settings of the earlier run to resume it",
            )
    return load_tasks(Path(config.tasks), config.task_columns, config.limit)


def run_collect(
    config: CollectConfig,
    run_dir: Path,
    show_progress: bool = True,
    rewrite: Callable[[Task], Task] | None = None,
    retry_errors: bool = False,
) -> CollectSummary:
    """Synchronous entry point; on Ctrl-C returns a summary with ``interrupted=True``.

    ``rewrite`` changes each loaded task before it is sent (eval wraps prompts in a training template).
    ``retry_errors`` samples again every pair whose newest record is an error (endpoint errors always are).
    """
    tasks = prepare(config, run_dir)
    if rewrite is not None:
        tasks = [rewrite(t) for t in tasks]
    summary = CollectSummary(run_dir=run_dir)
    with writer_lock(run_dir / LOCK, str(run_dir)), disk_errors(run_dir):
        try:
            asyncio.run(collect_async(config, tasks, run_dir, summary, show_progress, retry_errors))
        except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (which cancels the run)
            summary.interrupted = True
        except ExceptionGroup as group:  # a worker's write failed (full disk...): raise it as itself
            raise group.exceptions[0] from None
    return summary


def endpoint_error(trajectory: Trajectory) -> bool:
    """It ended because the teacher could not be reached or refused the request (key, URL, model)."""
    return any(e.kind == "endpoint" for e in trajectory.errors)


def _to_sample(path: Path, retry_errors: bool) -> set[str]:
    """Ids whose newest record is an error to sample again (all errors with ``retry_errors``)."""
    retry: set[str] = set()
    with path.open("rb") as f:
        for raw in f:
            record = json.loads(raw)
            kinds = {e.get("kind") for e in record.get("errors", [])}
            if record.get("stop_reason") == "error" and (retry_errors or "endpoint" in kinds):
                retry.add(record["id"])
            else:
                retry.discard(record["id"])
    return retry


async def collect_async(
    config: CollectConfig,
    tasks: list[Task],
    run_dir: Path,
    summary: CollectSummary,
    show_progress: bool,
    retry_errors: bool = False,
) -> None:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat()
    fingerprint = config.fingerprint()
    await _preflight(config)  # a wrong URL, key or model fails here, before anything is written
    store = JsonlStore(run_dir / TRAJECTORIES)
    done = set(store.open())  # repairs a torn tail first
    retry = _to_sample(store.path, retry_errors)
    done -= retry
    pairs = [(t, k) for t in tasks for k in range(config.samples_per_task)]
    pending = [(t, k) for t, k in pairs if trajectory_id(fingerprint, t.id, k) not in done]
    summary.planned = len(pairs)
    summary.already_done = len(pairs) - len(pending)
    summary.retrying = sum(trajectory_id(fingerprint, t.id, k) in retry for t, k in pending)

    teacher = ChatClient(config.teacher, "teacher")
    runtime = _build_runtime(config)
    progress = CollectProgress(total=len(pending), prices=config.prices, enabled=show_progress)
    agent = Agent(config=config, teacher=teacher, runtime=runtime, fingerprint=fingerprint, on_turn=progress.turn)

    def write_manifest(status: str) -> None:
        summary.wall_s = time.monotonic() - started
        write_json_atomic(
            run_dir / MANIFEST,
            _manifest(config, fingerprint, teacher, runtime, status, started_at, summary),
        )

    write_manifest("running")
    cancel_on_sigterm()  # SIGTERM: cancel, clean up (containers too), write the manifest
    write_lock = asyncio.Lock()
    work: Iterator[tuple[Task, int]] = iter(pending)

    async def worker() -> None:
        for task, k in work:  # a shared iterator: each worker takes the next pending pair
            progress.started()
            try:
                trajectory = await agent.run(task, k)
                line = trajectory.model_dump_json()
            except Exception as exc:  # noqa: BLE001 - one bad reply (e.g. text no record can hold) is its own error
                trajectory = agent.failed(task, k, exc)
                line = trajectory.model_dump_json()
            async with write_lock:
                await asyncio.to_thread(store.append, line)
            summary.add(trajectory)
            progress.finished(trajectory)
            if endpoint_error(trajectory):
                summary.halted = summary.halted or trajectory.errors[0].message
                raise _Halt

    status = "interrupted"
    try:
        await runtime.start()
        with progress:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(config.concurrency, len(pending))):
                        group.create_task(worker())
            except* _Halt:
                pass
        status = "stopped" if summary.halted else "complete"
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
            status = "failed"
        raise
    finally:
        summary.interrupted = status not in ("complete", "stopped")
        summary.requests, summary.retries = teacher.requests, teacher.retries
        store.close()
        await runtime.aclose()
        await teacher.aclose()
        with contextlib.suppress(OSError):  # a full disk may refuse the manifest too; the error says why
            write_manifest(status)


async def _preflight(config: CollectConfig) -> None:
    endpoints: list[tuple[str, EndpointConfig]] = [("teacher", config.teacher)]
    simulator = config.simulator_endpoint()
    if config.runtime == "simulated" and (simulator.url(), simulator.model) != (
        config.teacher.url(),
        config.teacher.model,
    ):
        endpoints.append(("simulator", simulator))
    for role, endpoint in endpoints:
        if endpoint.preflight:
            client = ChatClient(endpoint, role)
            try:
                await client.preflight()
            finally:
                await client.aclose()


def _build_runtime(config: CollectConfig) -> Runtime:
    if config.runtime == "docker":
        from tracegen.runtime.docker.pool import DockerRuntime

        return DockerRuntime(config.docker, max_chars=config.observation_max_chars)
    from tracegen.runtime.simulated import SimulatedRuntime

    # Its own client even when it shares the teacher's endpoint, so its traffic is counted apart.
    simulator = ChatClient(config.simulator_endpoint(), "simulator")
    return SimulatedRuntime(simulator, config.observation_max_chars)


def _manifest(
    config: CollectConfig,
    fingerprint: str,
    teacher: ChatClient,
    runtime: Runtime,
    status: str,
    started_at: str,
    summary: CollectSummary,
) -> dict[str, Any]:
    import httpx
    import pydantic

    return {
        "kind": "tracegen.collect.driver",
        "status": status,
        "schema_version": SCHEMA_VERSION,
        "tracegen_version": __version__,
        "recipe_fingerprint": fingerprint,
        "generation": config.generation_settings(),
        "started_at": started_at,
        "updated_at": datetime.now(UTC).isoformat(),
        "teacher": {"model": teacher.model, "base_url_host": teacher.host},
        "runtime": runtime.info().model_dump(),
        "config": config.model_dump(mode="json"),
        "counts": summary.as_dict(),
        "versions": {
            "python": platform.python_version(),
            "httpx": httpx.__version__,
            "pydantic": pydantic.VERSION,
        },
    }
