"""One trajectory's use of a sandbox container: a tool call as a worker request, its reply as an observation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from tracegen.errors import RuntimeToolError
from tracegen.records import Observation, ToolCall, ToolSpec
from tracegen.runtime.base import ToolOutput
from tracegen.runtime.docker.channel import WorkerLost
from tracegen.runtime.docker.settings import (
    RESTART_NOTE,
    SANDBOX_ENV,
)
from tracegen.truncate import middle_truncate

if TYPE_CHECKING:
    from tracegen.runtime.docker.pool import DockerRuntime, Sandbox


class DockerEpisode:
    """One trajectory's container, taken from the pool on the first tool call."""

    def __init__(self, runtime: DockerRuntime, trajectory_id: str) -> None:
        self.runtime = runtime
        self.trajectory_id = trajectory_id
        self.sandbox: Sandbox | None = None
        self._lock = asyncio.Lock()

    @property
    def container_id(self) -> str | None:
        return self.sandbox.container_id if self.sandbox is not None else None

    async def call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        async with self._lock:
            return await self._call(call, arguments, spec)

    async def _call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        rt = self.runtime
        cfg = rt.config
        request = self._request(spec.name, arguments)
        if isinstance(request, str):  # the call cannot run as written: the teacher is told why
            return _output(f"[error: {request}]", rt.max_chars, Observation(source="error"))
        started = time.monotonic()
        note = ""
        if self.sandbox is not None and (self.sandbox.dead or self.sandbox.channel.lost):
            rt.release(self.sandbox)
            self.sandbox = None
            note = RESTART_NOTE
        if self.sandbox is None:
            self.sandbox = await rt.acquire()
        sandbox = self.sandbox
        try:
            reply = await sandbox.channel.request(request, cfg.timeout_s + cfg.kill_grace_s)
        except TimeoutError:
            await rt.kill(sandbox)
            return _output(
                note + f"[timed out after {cfg.timeout_s:g} s and the sandbox stopped answering; "
                "it was killed, and the next call runs in a fresh one without earlier files]",
                rt.max_chars,
                Observation(source="executed", timed_out=True, duration_s=time.monotonic() - started),
            )
        except WorkerLost:
            if sandbox.channel.violation is not None:
                # Nothing from a channel that broke the protocol is trusted: not even that it failed.
                await rt.kill(sandbox)
                return _output(
                    note + "[the sandbox broke its protocol during this call and was replaced; "
                    "the next call runs in a fresh sandbox without files from earlier calls]",
                    rt.max_chars,
                    Observation(source="error", duration_s=time.monotonic() - started),
                )
            sandbox.dead = True
            oom = await rt.was_oom_killed(sandbox)
            why = "ran out of memory" if oom else "stopped"
            return _output(
                note + f"[the sandbox {why} during this call; the next call runs in a fresh sandbox "
                "without files from earlier calls]",
                rt.max_chars,
                Observation(
                    source="executed" if oom else "error",
                    exit_code=137 if oom else None,
                    oom_killed=oom,
                    duration_s=time.monotonic() - started,
                ),
            )
        if reply.get("op") != "result":
            raise RuntimeToolError(f"unexpected reply from the sandbox worker: {str(reply)[:200]}")
        oom_kills = reply.get("oom_kills")
        oom = bool(oom_kills) if oom_kills is not None else False
        if oom_kills is None and reply.get("signal") == 9 and not reply.get("timed_out"):
            oom = await rt.was_oom_killed(sandbox)  # no cgroup counter inside: ask the engine
        if oom or reply.get("timed_out"):
            sandbox.tainted = True  # replaced, not reset, when the trajectory ends
        content = note + render(reply, cfg.timeout_s, oom)
        return _output(
            content,
            rt.max_chars,
            Observation(
                source="executed",
                exit_code=reply.get("exit_code"),
                timed_out=bool(reply.get("timed_out")),
                oom_killed=oom,
                truncated=bool(reply.get("truncated")),
                duration_s=time.monotonic() - started,
            ),
        )

    def _request(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any] | str:
        """The worker request for one call, or why it cannot run (shown to the teacher, never raised)."""
        cfg = self.runtime.config
        if tool == "python":
            key, argv, file_argv = "code", [cfg.python, "-c"], [cfg.python]
        elif tool == "bash":
            key, argv, file_argv = "command", [cfg.shell, "-c"], [cfg.shell]
        else:
            return f"the Docker runtime has no tool named {tool!r}; use python or bash"
        source = arguments.get(key)
        if not isinstance(source, str):
            got = "nothing" if source is None else f"a JSON {type(source).__name__}"
            return f"tool {tool!r} needs a string argument {key!r}, got {got}"
        if "\x00" in source:
            return f"the {key} contains a NUL character, which no program text can hold"
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:
            return f"the {key} contains a lone surrogate (invalid Unicode); send valid UTF-8 text"
        return {
            "op": "run",
            "argv": argv,
            "file_argv": file_argv,
            "script": source,
            "python": tool == "python" and cfg.python_zygote and cfg.python == cfg.worker_command[0],
            "timeout_s": cfg.timeout_s,
            "keep_bytes": cfg.keep_bytes,
            "kill_bytes": cfg.kill_bytes,
            "cwd": cfg.work_dir,
            "env": SANDBOX_ENV,
        }

    async def close(self) -> None:
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                self.runtime.release(self.sandbox)
            self.sandbox = None


def render(reply: dict[str, Any], timeout_s: float, oom: bool) -> str:
    """What the model sees of one call: stdout, stderr under a marker, then what went wrong."""
    parts: list[str] = []
    stdout, stderr = str(reply.get("stdout") or ""), str(reply.get("stderr") or "")
    if stdout:
        parts.append(stdout.rstrip("\n"))
    if stderr:
        parts.append("[stderr]\n" + stderr.rstrip("\n"))
    if reply.get("error"):
        parts.append(f"[error: {reply['error']}]")
    if reply.get("timed_out"):
        parts.append(f"[timed out after {timeout_s:g} s: the command and its children were killed]")
    if oom:
        parts.append("[killed: out of memory]")
    if reply.get("output_capped"):
        total = int(reply.get("stdout_bytes") or 0) + int(reply.get("stderr_bytes") or 0)
        parts.append(f"[output too long ({total} bytes read): the command was killed]")
    code = reply.get("exit_code")
    if code not in (0, None):
        parts.append(f"[exit code {code}]")
    return "\n".join(parts) if parts else "[no output]"


def _output(content: str, max_chars: int, observation: Observation) -> ToolOutput:
    shown, cut = middle_truncate(content, max_chars)
    if cut:
        observation = observation.model_copy(update={"truncated": True})
    return ToolOutput(shown, observation)
