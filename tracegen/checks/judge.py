"""The LLM judge of ``tracegen filter``: a JSON verdict from any OpenAI-compatible endpoint.

The judge sees the task, the reference (when there is one), the recipe's rubric and the trajectory's
transcript (middle-truncated to ``max_transcript_chars``), and must answer with one JSON object
``{"verdict": "pass" | "fail", "score": 0..1, "rationale": "..."}``, validated with pydantic. A reply
that is not one (prose, a refusal, broken JSON, a score out of range) is answered with a re-ask naming
the problem, at most ``max_reasks`` times. Requests go through :class:`~tracegen.client.chat.ChatClient`,
so retries (429 with ``Retry-After``, 5xx, dropped streams), backoff and client-side rate limits are
the collect stage's.

With ``samples = N > 1`` the N replies vote: pass iff more than half of the valid replies pass (a tie
fails), and at least ``N // 2 + 1`` replies must be valid. When the judge still fails (garbage after
every re-ask, the API failing after its retries), the verdict is a *judge error*: ``passed=False``,
``reason`` starting ``judge_error:``. ``filter`` counts those apart, never keeps them, and asks again
on the next run.

Not guaranteed: that the judge is right. The rationale is stored so a person can audit it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tracegen.checks.protocol import Checked, Cost
from tracegen.client.chat import ChatClient
from tracegen.config import JudgeConfig
from tracegen.errors import TeacherError
from tracegen.fingerprint import deciding, fingerprint
from tracegen.records import AssistantMessage, SystemMessage, ToolMessage, Trajectory, Usage, UserMessage, Verdict
from tracegen.truncate import middle_truncate

JUDGE_ERROR = "judge_error:"

JUDGE_SYSTEM = """You are a strict, fair grader of an AI assistant's work on a task.
Read the task, the reference answer if one is given, the grading rubric and the assistant's transcript.
Reply with exactly one JSON object and nothing else:
{"verdict": "pass" or "fail", "score": a number from 0 to 1, "rationale": "one short paragraph"}"""

REASK = (
    "Your reply was not a valid verdict ({problem}). Reply with only the JSON object "
    '{{"verdict": "pass" or "fail", "score": <0..1>, "rationale": "..."}} and nothing else.'
)


class JudgeReply(BaseModel):
    """The verdict the judge must send."""

    model_config = ConfigDict(extra="ignore")

    verdict: Literal["pass", "fail"]
    score: float = Field(ge=0, le=1)
    rationale: str = Field(min_length=1)

    @field_validator("verdict", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class Sample(NamedTuple):
    reply: JudgeReply | None
    problem: str | None
    usage: Usage


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_reply(text: str) -> tuple[JudgeReply | None, str | None]:
    """(reply, None) for a valid JSON verdict, else (None, what is wrong with it)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    start, end = body.find("{"), body.rfind("}")
    if start < 0:
        return None, "no JSON object in the reply"
    if end < start:
        return None, "invalid JSON: the object is never closed"
    try:
        data = json.loads(body[start : end + 1])
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(data, dict):
        return None, "the JSON is not an object"
    try:
        return JudgeReply.model_validate(data), None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "object"
        return None, f"{field}: {err['msg']}"


def transcript(t: Trajectory, max_chars: int) -> str:
    """The trajectory as plain text for the judge: reasoning, tool calls, outputs, final answer."""
    parts: list[str] = []
    for m in t.messages:
        if isinstance(m, SystemMessage | UserMessage):
            continue
        if isinstance(m, AssistantMessage):
            if m.reasoning and m.reasoning.strip():
                parts.append(f"[assistant reasoning]\n{m.reasoning.strip()}")
            if m.content.strip() and m.tool_calls:
                parts.append(f"[assistant]\n{m.content.strip()}")
            for call in m.tool_calls:
                parts.append(f"[tool call {call.name}]\n{call.arguments}")
        elif isinstance(m, ToolMessage):
            parts.append(f"[tool output, {m.observation.source}]\n{m.content}")
    parts.append(f"[final answer]\n{t.final_answer or '(none)'}")
    text, _ = middle_truncate("\n\n".join(parts), max_chars)
    return text


def judge_messages(t: Trajectory, config: JudgeConfig) -> list[dict[str, Any]]:
    reference = f"\n\n# Reference answer\n{t.task.reference}" if t.task.reference else ""
    user = (
        f"# Task\n{t.task.prompt}{reference}\n\n# Rubric\n{config.rubric}\n\n"
        f"# Transcript\n{transcript(t, config.max_transcript_chars)}\n\n"
        "Grade it now: reply with the JSON verdict only."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


class Judge:
    """Judges trajectories with one client; create inside the running event loop."""

    def __init__(self, config: JudgeConfig, client: ChatClient | None = None) -> None:
        self.config = config
        self.client = client or ChatClient(config, "judge")
        self.calls = 0
        self.usage = Usage()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def judge(self, t: Trajectory) -> Verdict:
        samples = await asyncio.gather(*(self._sample(t) for _ in range(self.config.samples)))
        usage = sum((s.usage for s in samples), Usage())
        valid = [s.reply for s in samples if s.reply is not None]
        model = self.client.model
        needed = self.config.samples // 2 + 1
        if len(valid) < needed:
            problem = next((s.problem for s in samples if s.problem), "no valid reply")
            return Verdict(
                check="judge",
                passed=False,
                reason=f"{JUDGE_ERROR} {len(valid)} of {self.config.samples} judge replies valid; {problem}"[:500],
                judge_model=model,
                usage=usage,
            )
        passes = [r for r in valid if r.verdict == "pass"]
        majority_pass = len(passes) * 2 > len(valid)
        score = sum(r.score for r in valid) / len(valid)
        passed = majority_pass and (self.config.pass_score is None or score >= self.config.pass_score)
        chosen = (passes if majority_pass else [r for r in valid if r.verdict == "fail"] or valid)[0]
        vote = f" (vote {len(passes)}/{len(valid)} pass)" if self.config.samples > 1 else ""
        return Verdict(
            check="judge",
            passed=passed,
            score=round(score, 4),
            reason=chosen.rationale + vote,
            judge_model=model,
            usage=usage,
        )

    async def _sample(self, t: Trajectory) -> Sample:
        messages = judge_messages(t, self.config)
        usage = Usage()
        problem: str | None = None
        for _ in range(self.config.max_reasks + 1):
            self.calls += 1
            try:
                reply = await self.client.complete(messages)
            except TeacherError as exc:
                return Sample(None, exc.message, usage)
            usage += reply.usage
            self.usage += reply.usage
            text = reply.content if reply.content.strip() else (reply.reasoning or "")
            parsed, problem = parse_reply(text)
            if parsed is not None:
                return Sample(parsed, None, usage)
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": REASK.format(problem=problem)},
            ]
        return Sample(None, f"invalid verdict after {self.config.max_reasks} re-ask(s): {problem}", usage)


def is_error(verdict: Verdict) -> bool:
    """A verdict that records a failure to check (``judge_error``, ``tests_error``, ``replay_error``)."""
    return verdict.reason.startswith(f"{verdict.check}_error:")


class JudgeCheck:
    """``judge``: the LLM judge; its client is created on the first call, inside the running loop."""

    name = "judge"
    cost: Cost = "model"

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.key = fingerprint(deciding(config))
        self.judge: Judge | None = None

    def applies(self, t: Trajectory) -> bool:
        return True

    async def __call__(self, t: Trajectory) -> Checked:
        if self.judge is None:
            self.judge = Judge(self.config)
        return Checked(await self.judge.judge(t))

    async def aclose(self) -> None:
        if self.judge is not None:
            await self.judge.aclose()
