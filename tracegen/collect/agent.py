"""The ReAct loop for one trajectory: think, call tools, observe, repeat, until an answer.

A bad episode is data, never an exception: a teacher that fails after its retries, a runtime that
cannot run a call, or a budget overrun ends the trajectory with a ``stop_reason`` and a typed error,
and the run goes on. Only cancellation (Ctrl-C) propagates, and then the partial trajectory is
discarded: the store only ever holds complete ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tracegen import __version__
from tracegen.client.anthropic_messages import sampling_sent
from tracegen.client.chat import ChatClient
from tracegen.client.tools import check_arguments, describe_for_prompt, parse_arguments, tool_specs
from tracegen.client.wire import to_wire
from tracegen.config import CollectConfig
from tracegen.errors import DeadlineError, RuntimeToolError, TeacherError
from tracegen.records import (
    AssistantMessage,
    Message,
    Observation,
    SamplingParams,
    StopReason,
    SystemMessage,
    Task,
    TeacherInfo,
    Timing,
    ToolCall,
    ToolMessage,
    ToolSpec,
    Trajectory,
    TrajectoryError,
    Usage,
    UserMessage,
)
from tracegen.runtime.base import Episode, Runtime


def trajectory_id(fingerprint: str, task_id: str, sample_index: int) -> str:
    """Deterministic, so a resumed run knows exactly which (task, sample) pairs are done."""
    return hashlib.sha256(f"{fingerprint}\0{task_id}\0{sample_index}".encode()).hexdigest()[:24]


@dataclass
class Agent:
    """Everything a trajectory needs, shared by all trajectories of a run."""

    config: CollectConfig
    teacher: ChatClient
    runtime: Runtime
    fingerprint: str
    on_turn: Callable[[AssistantMessage], None] = lambda _: None
    specs: list[ToolSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.specs = tool_specs(list(self.config.tools))
        cfg = self.config.teacher
        self.teacher_info = TeacherInfo(
            model=self.teacher.model,
            base_url_host=self.teacher.host,
            sampling=SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=cfg.seed,
                max_completion_tokens=cfg.max_completion_tokens,
                reasoning_effort=cfg.reasoning_effort,
            ).model_copy(
                update=sampling_sent(cfg.max_tokens, cfg.max_completion_tokens) if cfg.api == "anthropic" else {}
            ),
        )  # the record (and the dataset card) names only settings the request carried
        text_protocol = cfg.tool_protocol in ("hermes", "function_tag")
        self.system_prompt = self.config.system_prompt
        if text_protocol and self.specs:
            self.system_prompt += "\n\n" + describe_for_prompt(self.specs, cfg.tool_protocol)  # type: ignore[arg-type]
        # Servers pinned to a text protocol get the tools in the prompt, not as `tools`.
        self.native_tools = None if text_protocol else [s.openai_schema() for s in self.specs] or None

    async def run(self, task: Task, sample_index: int) -> Trajectory:
        tid = trajectory_id(self.fingerprint, task.id, sample_index)
        started = time.monotonic()
        started_at = datetime.now(UTC).isoformat()
        messages: list[Message] = [SystemMessage(content=self.system_prompt), UserMessage(content=task.prompt)]
        errors: list[TrajectoryError] = []
        usage = Usage()
        teacher_s = tool_s = 0.0
        requests = retries = 0
        final_answer: str | None = None
        stop: StopReason = "max_turns"
        episode: Episode | None = None
        turn = tool_calls = 0
        try:
            cfg = self.config.teacher
            budget = asyncio.timeout(self.config.trajectory_timeout_s)
            async with budget:
                for turn in range(self.config.max_turns):
                    t0 = time.monotonic()
                    try:
                        reply = await self.teacher.complete(
                            to_wire(messages, cfg.reasoning_echo, cfg.reasoning_field, self.config.few_shot),
                            self.native_tools,
                            tool_protocol=cfg.tool_protocol,
                            call_id_prefix=f"call-{turn}",
                            seed_offset=sample_index,
                        )
                    except TeacherError as exc:
                        if isinstance(exc, DeadlineError):
                            kind = "deadline"
                        else:  # an endpoint that cannot be reached or refuses us is no sample of the teacher
                            kind = "endpoint" if _endpoint_failure(exc) else "teacher"
                        errors.append(TrajectoryError(kind=kind, message=exc.message, turn=turn))
                        stop = "error"
                        break
                    finally:
                        teacher_s += time.monotonic() - t0
                    requests += reply.attempts
                    retries += reply.attempts - 1
                    usage += reply.usage
                    messages.append(reply)
                    self.on_turn(reply)
                    if reply.finish_reason == "length":
                        stop = "length"  # unconverged: the reply was cut off mid-thought or mid-call
                        break
                    if not reply.tool_calls:
                        stop, final_answer = "answer", reply.content.strip()
                        break
                    if usage.completion_tokens >= self.config.token_budget:
                        stop = "budget"
                        errors.append(
                            TrajectoryError(
                                kind="budget",
                                message=f"{usage.completion_tokens} completion tokens >= token_budget "
                                f"{self.config.token_budget}",
                                turn=turn,
                            )
                        )
                        break
                    if episode is None:
                        episode = await self.runtime.open_episode(tid)
                    t1 = time.monotonic()
                    for index, call in enumerate(reply.tool_calls):
                        over = self._over_cap(index, tool_calls)
                        if over is not None:  # every call still gets its answer: the chat shape needs one per id
                            messages.append(_error_message(call, over))
                            continue
                        tool_calls += 1
                        messages.append(await self._observe(episode, call))
                    tool_s += time.monotonic() - t1
        except RuntimeToolError as exc:
            errors.append(TrajectoryError(kind="runtime", message=exc.message, turn=turn))
            stop = "error"
        except TimeoutError as exc:
            if not budget.expired():
                errors.append(TrajectoryError(kind="internal", message=f"TimeoutError: {exc}", turn=turn))
                stop = "error"
            else:
                limit = self.config.trajectory_timeout_s
                errors.append(TrajectoryError(kind="budget", message=f"over trajectory_timeout_s {limit:g}", turn=turn))
                stop = "time_budget"
        except Exception as exc:  # noqa: BLE001 - a bug in one episode must not end the run; record it
            errors.append(TrajectoryError(kind="internal", message=f"{type(exc).__name__}: {exc}", turn=turn))
            stop = "error"
        finally:
            if episode is not None:
                await episode.close()
        return self._record(
            task,
            sample_index,
            messages=messages,
            final_answer=final_answer,
            stop_reason=stop,
            errors=errors,
            usage=usage,
            requests=requests,
            retries=retries,
            timing=Timing(started_at=started_at, wall_s=time.monotonic() - started, teacher_s=teacher_s, tool_s=tool_s),
        )

    def failed(self, task: Task, sample_index: int, exc: Exception) -> Trajectory:
        """The record of a trajectory that could not be built or serialised (a bad reply must not end the
        run): its prompt and the error, so a resume skips it like any other finished pair."""
        detail = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace").decode("utf-8")[:1000]
        return self._record(
            task,
            sample_index,
            messages=[SystemMessage(content=self.system_prompt), UserMessage(content=task.prompt)],
            final_answer=None,
            stop_reason="error",
            errors=[TrajectoryError(kind="internal", message=f"could not record the trajectory: {detail}")],
            timing=Timing(started_at=datetime.now(UTC).isoformat()),
        )

    def _record(self, task: Task, sample_index: int, **fields: Any) -> Trajectory:
        return Trajectory(
            id=trajectory_id(self.fingerprint, task.id, sample_index),
            tracegen_version=__version__,
            recipe_fingerprint=self.fingerprint,
            task=task,
            sample_index=sample_index,
            teacher=self.teacher_info,
            runtime=self.runtime.info(),
            tools=self.specs,
            few_shot=self.config.few_shot,
            **fields,
        )

    def _over_cap(self, index: int, done: int) -> str | None:
        """Why the call at ``index`` of a reply is not run (a cap on calls), or None."""
        per_reply, per_trajectory = self.config.max_tool_calls_per_reply, self.config.max_tool_calls_per_trajectory
        if index >= per_reply:
            return f"not run: a reply may make at most {per_reply} tool calls (max_tool_calls_per_reply)"
        if done >= per_trajectory:
            return f"not run: this task allows at most {per_trajectory} tool calls (max_tool_calls_per_trajectory)"
        return None

    async def _observe(self, episode: Episode, call: ToolCall) -> ToolMessage:
        """Run one call, or explain to the teacher why it could not run (it can then retry)."""
        spec = next((s for s in self.specs if s.name == call.name), None)
        problem = call.parse_error
        arguments = None
        if problem is None and spec is None:
            offered = ", ".join(s.name for s in self.specs) or "none"
            problem = f"unknown tool {call.name!r} (available: {offered})"
        if problem is None:
            arguments, problem = parse_arguments(call.arguments)
        if problem is None and arguments is not None and spec is not None:
            problem = check_arguments(arguments, spec)
        if problem is not None or arguments is None or spec is None:
            return _error_message(call, f"{problem}. Fix the call and try again.")
        output = await episode.call(call, arguments, spec)
        return ToolMessage(tool_call_id=call.id, name=call.name, content=output.content, observation=output.observation)


_REFUSED = {401, 403, 404}  # bad key, no access, wrong URL or model name


def _endpoint_failure(exc: TeacherError) -> bool:
    """The teacher was unreachable (connection refused, unknown host) or refused the request itself:
    the error says nothing about how the teacher behaves on this task."""
    if exc.status in _REFUSED:
        return True
    cause = exc.__cause__  # after the retries: the last attempt's RetryableTeacherError, and its cause
    inner = cause.__cause__ if cause is not None else None
    unreachable = isinstance(inner, OSError) and not isinstance(inner, TimeoutError)
    return unreachable or type(inner).__name__ == "APIConnectionError"


def _error_message(call: ToolCall, problem: str) -> ToolMessage:
    return ToolMessage(
        tool_call_id=call.id, name=call.name, content=f"Error: {problem}", observation=Observation(source="error")
    )
