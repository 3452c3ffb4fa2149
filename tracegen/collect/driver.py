"""``tracegen collect``: sample K trajectories per task with bounded concurrency, resumably.

Layout of a run directory::

    RUN_DIR/trajectories.jsonl   one complete Trajectory per line, fsynced as it finishes
    RUN_DIR/manifest.json        recipe, fingerprint, teacher (no key), counts, versions; atomic

Re-running the same command resumes: ids are deterministic, so every (task, sample) already in the
file is skipped, a torn last line is repaired, and nothing is duplicated. Ctrl-C (or SIGTERM) stops
cleanly and writes the manifest; ``kill -9`` loses only the trajectories still in flight.
"""

from __future__ import annotations

import asyncio
import collections
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
from tracegen.records import SCHEMA_VERSION, Task, Trajectory
from tracegen.runtime.base import Runtime
from tracegen.signals import cancel_on_sigterm
from tracegen.store import JsonlStore, write_json_atomic

TRAJECTORIES = "trajectories.jsonl"
MANIFEST = "manifest.json"


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
    requests: int = 0
    retries: int = 0
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def error_rate(self) -> float:
        return self.by_stop_reason["error"] / self.completed if self.completed else 0.0

    def check_errors(self, limit: float, setting: str) -> None:
        """TracegenError when more than ``limit`` of this run's trajectories ended in error (``setting``
        names the option that sets the limit, for the message)."""
        if self.completed and self.error_rate > limit:
            raise TracegenError(
                f"{self.by_stop_reason['error']} of {self.completed} trajectories ended in error "
                f"({self.error_rate:.0%} > {setting} {limit:.0%})",
                hint=f"read the `errors` field of the records in {self.run_dir / TRAJECTORIES}",
            )

    def add(self, trajectory: Trajectory) -> None:
        self.completed += 1
        self.by_stop_reason[trajectory.stop_reason] += 1
        self.turns += trajectory.turns
        self.prompt_tokens += trajectory.usage.prompt_tokens
        self.completion_tokens += trajectory.usage.completion_tokens
        self.reasoning_tokens += trajectory.usage.reasoning_tokens
        self.requests += trajectory.requests
        self.retries += trajectory.retries

    def as_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "already_done": self.already_done,
            "completed": self.completed,
            "by_stop_reason": dict(self.by_stop_reason),
            "turns": self.turns,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "requests": self.requests,
            "retries": self.retries,
            "wall_s": round(self.wall_s, 3),
            "interrupted": self.interrupted,
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
            previous = json.loads(manifest.read_text()).get("recipe_fingerprint")
        except ValueError:
            previous = None
        if previous and previous != config.fingerprint():
            raise BadInputError(
                f"{run_dir}: collected with different generation settings (fingerprint {previous}, now "
                f"{config.fingerprint()})",
                hint="use a new --out directory, or restore the settings of the earlier run to resume it",
            )
    return load_tasks(Path(config.tasks), config.task_columns, config.limit)


def run_collect(
    config: CollectConfig,
    run_dir: Path,
    show_progress: bool = True,
    rewrite: Callable[[Task], Task] | None = None,
) -> CollectSummary:
    """Synchronous entry point; on Ctrl-C returns a summary with ``interrupted=True``.

    ``rewrite`` changes each loaded task before it is sent (eval wraps prompts in a training template).
    """
    tasks = prepare(config, run_dir)
    if rewrite is not None:
        tasks = [rewrite(t) for t in tasks]
    summary = CollectSummary(run_dir=run_dir)
    try:
        asyncio.run(collect_async(config, tasks, run_dir, summary, show_progress))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (which cancels the run)
        summary.interrupted = True
    return summary


async def collect_async(
    config: CollectConfig, tasks: list[Task], run_dir: Path, summary: CollectSummary, show_progress: bool
) -> None:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat()
    fingerprint = config.fingerprint()
    await _preflight(config)  # a wrong URL, key or model fails here, before anything is written
    store = JsonlStore(run_dir / TRAJECTORIES)
    done = set(store.open())
    pairs = [(t, k) for t in tasks for k in range(config.samples_per_task)]
    pending = [(t, k) for t, k in pairs if trajectory_id(fingerprint, t.id, k) not in done]
    summary.planned = len(pairs)
    summary.already_done = len(pairs) - len(pending)

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

    status = "interrupted"
    try:
        await runtime.start()
        with progress:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(config.concurrency, len(pending))):
                    group.create_task(worker())
        status = "complete"
    finally:
        summary.interrupted = status != "complete"
        store.close()
        await runtime.aclose()
        await teacher.aclose()
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
