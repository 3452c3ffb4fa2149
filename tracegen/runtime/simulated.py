"""The simulated runtime: a second model role-plays each tool call.

Useful when tasks need an environment nobody can run (a production API, a big repository), or to
collect cheaply before paying for sandboxes. Every observation is recorded with
``source="simulated"`` and the simulator's model name, so ``format`` never trains on it and
``filter --verifier replay`` can re-check it against a real sandbox later.

What it does not guarantee: that any output is what the real tool would print. The simulator sees the
tool's schema, the call, and the earlier calls and outputs of this trajectory (so it stays
consistent with itself), nothing else.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from tracegen.client.chat import ChatClient
from tracegen.errors import RuntimeToolError, TeacherError
from tracegen.records import Observation, RuntimeInfo, ToolCall, ToolSpec
from tracegen.runtime.base import ToolOutput
from tracegen.truncate import middle_truncate

SIMULATOR_PROMPT = """You simulate a sandboxed Linux machine (Python 3.12, bash, no network) that executes tool calls.
Reply with exactly the raw output the call would produce: stdout, then stderr, as a terminal would show them.
No explanations, no markdown fences, no commentary. Stay consistent with the earlier calls and outputs of this session.
End your reply with one last line of the form:
EXIT_CODE: <the process exit status>"""

_EXIT_LINE = re.compile(r"\n?EXIT_CODE:\s*(-?\d+)\s*$")


class SimulatedRuntime:
    def __init__(self, client: ChatClient, max_chars: int) -> None:
        self.client = client
        self.max_chars = max_chars

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(kind="simulated", simulator_model=self.client.model)

    async def start(self) -> None:
        return None

    async def open_episode(self, trajectory_id: str) -> SimulatedEpisode:
        return SimulatedEpisode(self)

    async def aclose(self) -> None:
        await self.client.aclose()


class SimulatedEpisode:
    def __init__(self, runtime: SimulatedRuntime) -> None:
        self.runtime = runtime
        self.history: list[tuple[str, str]] = []  # (call as shown to the simulator, its output)

    async def call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        shown = f"Tool: {spec.name}\nSchema: {json.dumps(spec.parameters)}\nArguments: {json.dumps(arguments)}"
        messages: list[dict[str, Any]] = [{"role": "system", "content": SIMULATOR_PROMPT}]
        for past_call, past_output in self.history:
            messages += [{"role": "user", "content": past_call}, {"role": "assistant", "content": past_output}]
        messages.append({"role": "user", "content": shown})
        started = time.monotonic()
        try:
            reply = await self.runtime.client.complete(messages)
        except TeacherError as exc:
            raise RuntimeToolError(f"simulator failed: {exc.message}", hint=exc.hint) from exc
        text = reply.content
        match = _EXIT_LINE.search(text)
        exit_code = int(match.group(1)) if match else None
        output = text[: match.start()] if match else text
        self.history.append((shown, text))
        content, truncated = middle_truncate(output, self.runtime.max_chars)
        observation = Observation(
            source="simulated",
            exit_code=exit_code,
            truncated=truncated,
            duration_s=time.monotonic() - started,
            simulator=self.runtime.client.model,
        )
        return ToolOutput(content, observation)

    async def close(self) -> None:
        return None
