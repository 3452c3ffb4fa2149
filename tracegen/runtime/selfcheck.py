"""The hostile-code self-test: what ``tracegen sandbox check`` runs against an engine and image.

Each case runs code through :class:`~tracegen.runtime.docker.DockerRuntime` exactly as a
trajectory's tool call would, and reports what it expected, what it observed, and whether the
sandbox held. The test suite runs the same cases (``tests/test_sandbox_hostile.py``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from tracegen.errors import RuntimeToolError
from tracegen.runtime.base import ToolOutput
from tracegen.runtime.docker import DockerEpisode, DockerRuntime, DockerRuntimeConfig
from tracegen.types import ToolCall, ToolSpec

PYTHON = ToolSpec(name="python", description="Run Python code.", parameters={"type": "object"})
BASH = ToolSpec(name="bash", description="Run a bash command.", parameters={"type": "object"})
SECRET_ENV = ("TRACEGEN_TEACHER_API_KEY", "OPENAI_API_KEY", "HF_TOKEN")


class CheckRow(NamedTuple):
    case: str
    expected: str
    observed: str
    passed: bool


class Outcome(NamedTuple):
    observed: str
    passed: bool


Case = Callable[[DockerRuntime], Awaitable[Outcome]]


def check_config(base: DockerRuntimeConfig | None = None) -> DockerRuntimeConfig:
    """The configured sandbox with short deadlines and a small memory limit, so the check is quick."""
    base = base or DockerRuntimeConfig()
    return base.model_copy(update={"timeout_s": 3.0, "kill_grace_s": 5.0, "mem_limit": "256m", "pool_size": 2})


async def run(episode: DockerEpisode, tool: str, source: str) -> ToolOutput:
    key = "code" if tool == "python" else "command"
    spec = PYTHON if tool == "python" else BASH
    call = ToolCall(id=f"call-{secrets.token_hex(4)}", name=tool, arguments="{}")
    return await episode.call(call, {key: source}, spec)


async def _episode(rt: DockerRuntime) -> DockerEpisode:
    return await rt.open_episode(f"selfcheck-{secrets.token_hex(4)}")


COUNT_PROCS = "import os; print(sum(1 for p in os.listdir('/proc') if p.isdigit()))"


async def infinite_loop(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(ep, "python", "while True:\n    pass")
        after = await run(ep, "bash", "echo alive")
        obs = out.observation
        ok = obs.timed_out and obs.duration_s < rt.config.timeout_s + 2 and after.content.strip() == "alive"
        return Outcome(f"timed_out={obs.timed_out} after {obs.duration_s:.1f}s; next call: {after.content[:40]!r}", ok)
    finally:
        await ep.close()


async def background_children(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(ep, "bash", "sleep 300 & sleep 301; wait")
        procs = await run(ep, "python", COUNT_PROCS)
        left = int(procs.content.strip()) if procs.content.strip().isdigit() else -1
        # init, the keepalive sleep, the worker and this python: nothing else.
        ok = out.observation.timed_out and 0 < left <= 4
        return Outcome(f"timed_out={out.observation.timed_out}; processes after: {left}", ok)
    finally:
        await ep.close()


async def fork_bomb(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(ep, "bash", "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived")
        after = await run(ep, "bash", "echo alive")
        host_ok = subprocess.run(["true"], check=False).returncode == 0
        ok = after.content.strip() == "alive" and host_ok
        return Outcome(
            f"bomb call exit={out.observation.exit_code} timed_out={out.observation.timed_out}; "
            f"next call: {after.content[:30]!r}; host forks: {host_ok}",
            ok,
        )
    finally:
        await ep.close()


async def memory_hog(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(
            ep, "python", "x = bytearray(4 * 1024**3)\nx[::4096] = b'1' * len(x[::4096])\nprint('no limit')"
        )
        obs = out.observation
        return Outcome(
            f"oom_killed={obs.oom_killed} exit={obs.exit_code}", obs.oom_killed and "no limit" not in out.content
        )
    finally:
        await ep.close()


async def huge_output(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        code = "import sys\nsys.stdout.write('HEAD' + 'x' * 100_000_000 + 'TAIL\\n')"
        started = time.monotonic()
        out = await run(ep, "python", code)
        took = time.monotonic() - started
        after = await run(ep, "bash", "echo alive")
        obs = out.observation
        ok = (
            obs.truncated
            and out.content.startswith("HEAD")
            and "TAIL" in out.content
            and len(out.content) <= rt.max_chars
            and after.content.strip() == "alive"
        )
        return Outcome(f"truncated={obs.truncated}, {len(out.content)} chars shown, {took:.1f}s; run continues", ok)
    finally:
        await ep.close()


async def outbound_tcp(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        code = (
            "import socket\n"
            "for host in ('1.1.1.1', '8.8.8.8'):\n"
            "    try:\n"
            "        socket.create_connection((host, 53), timeout=2); print('CONNECTED', host)\n"
            "    except OSError as e:\n"
            "        print('refused:', e)"
        )
        out = await run(ep, "python", code)
        return Outcome(out.content.splitlines()[0][:80] if out.content else "", "CONNECTED" not in out.content)
    finally:
        await ep.close()


async def write_system_dirs(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(
            ep, "bash", "for d in / /usr /etc; do touch $d/tracegen-probe 2>/dev/null && echo WROTE $d; done; echo done"
        )
        return Outcome(out.content.replace("\n", " ")[:80], "WROTE" not in out.content)
    finally:
        await ep.close()


async def host_environment(rt: DockerRuntime) -> Outcome:
    canary = f"canary-{secrets.token_hex(8)}"
    os.environ["TRACEGEN_SELFCHECK_CANARY"] = canary
    ep = await _episode(rt)
    try:
        out = await run(ep, "bash", "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'")
        values = [canary] + [v for k in SECRET_ENV if (v := os.environ.get(k))]
        leaked = [v for v in values if v in out.content] + [k for k in SECRET_ENV if k in out.content]
        return Outcome("none visible" if not leaked else f"{len(leaked)} visible", not leaked)
    finally:
        os.environ.pop("TRACEGEN_SELFCHECK_CANARY", None)
        await ep.close()


async def privileges(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        out = await run(ep, "bash", "id -u; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status")
        lines = out.content.split()
        ok = lines[:1] != ["0"] and "0000000000000000" in out.content and "NoNewPrivs:\t1" in out.content
        return Outcome(out.content.replace("\n", " ").replace("\t", " ")[:80], ok)
    finally:
        await ep.close()


async def kill_worker(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        await run(ep, "bash", "echo MARK-7f3 > state.txt")
        first = ep.container_id
        killed = await run(ep, "bash", "kill -9 $PPID; sleep 1")
        after = await run(ep, "bash", "cat state.txt 2>&1; echo alive")
        fresh = ep.container_id != first
        ok = fresh and "alive" in after.content and "MARK-7f3" not in after.content
        return Outcome(f"kill call source={killed.observation.source}; fresh container: {fresh}", ok)
    finally:
        await ep.close()


async def state_across_calls(rt: DockerRuntime) -> Outcome:
    ep = await _episode(rt)
    try:
        await run(ep, "python", "open('notes.txt', 'w').write('remembered')")
        out = await run(ep, "bash", "cat notes.txt")
        return Outcome(repr(out.content[:40]), out.content == "remembered")
    finally:
        await ep.close()


async def isolation(rt: DockerRuntime) -> Outcome:
    a, b = await _episode(rt), await _episode(rt)
    try:
        await asyncio.gather(run(a, "bash", "echo A > mine.txt"), run(b, "bash", "echo B > mine.txt"))
        seen_a, seen_b = await asyncio.gather(run(a, "bash", "cat mine.txt"), run(b, "bash", "cat mine.txt"))
        ok = seen_a.content == "A" and seen_b.content == "B" and a.container_id != b.container_id
        return Outcome(f"A sees {seen_a.content!r}, B sees {seen_b.content!r}", ok)
    finally:
        await asyncio.gather(a.close(), b.close())


CASES: list[tuple[str, str, Case]] = [
    ("state across calls", "a file written by one call is read by the next", state_across_calls),
    ("concurrent isolation", "two trajectories never see each other's files", isolation),
    ("infinite loop", "timed out at the deadline; the sandbox answers the next call", infinite_loop),
    ("background children", "`sleep 300 & sleep 301; wait` timed out, no process left", background_children),
    ("fork bomb", "stopped by pids_limit; next call and the host fine", fork_bomb),
    ("memory hog", "allocating past mem_limit is OOM-killed (oom_killed)", memory_hog),
    ("100 MB of output", "capped; head and tail kept; the run continues", huge_output),
    ("outbound TCP", "no connection (network none)", outbound_tcp),
    ("write to / and /usr", "refused (read-only root, non-root user)", write_system_dirs),
    ("host environment", "no host variable or teacher key inside", host_environment),
    ("privileges", "non-root, no capabilities, no-new-privileges", privileges),
    ("kill the worker", "the trajectory continues in a fresh container", kill_worker),
]


async def run_selfcheck(config: DockerRuntimeConfig | None = None) -> list[CheckRow]:
    """Run every case against the configured engine(s) and image; raises RuntimeToolError if none answers."""
    runtime = DockerRuntime(check_config(config))
    rows: list[CheckRow] = []
    try:
        await runtime.start()
        for name, expected, case in CASES:
            try:
                observed, passed = await case(runtime)
            except RuntimeToolError as exc:
                observed, passed = f"runtime error: {exc.message}", False
            rows.append(CheckRow(name, expected, observed, passed))
    finally:
        await runtime.aclose()
    return rows
