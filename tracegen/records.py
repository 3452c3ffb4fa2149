"""The records that flow through every tracegen stage.

One record, :class:`Trajectory`, is written by ``collect`` and read by every later stage; stages add
fields, they never reshape it. Everything here is pure pydantic (no I/O), versioned by
``SCHEMA_VERSION``, and round-trips exactly:
``Trajectory.model_validate_json(t.model_dump_json()) == t``.

Messages follow the OpenAI chat shape, as a union tagged by ``role``. Tool-call arguments stay the
raw JSON string the teacher produced (plus a parse error when it was not valid JSON), so nothing the
teacher wrote is lost and the Hub schema stays stable.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Record(BaseModel):
    """Base for every record: unknown fields are errors, so a typo never silently drops data."""

    model_config = ConfigDict(extra="forbid")


class Usage(Record):
    """Token counts as the server reported them (zeros where it reported nothing)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


TestsLanguage = Literal["python", "javascript", "bash"]
"""What a task's tests and solution are written in: run by ``python3``, ``node`` or ``bash`` in the sandbox."""


class Task(Record):
    """One unit of work: a prompt, and optionally what a verifier checks the answer against."""

    id: str
    prompt: str
    reference: str | None = None
    tests: str | None = None
    language: TestsLanguage = "python"
    metadata: dict[str, Any] = Field(default_factory=dict)


ToolProtocol = Literal["native", "hermes", "function_tag", "deepseek", "llama3_json", "mistral_text", "harmony"]
ReasoningFormat = Literal["reasoning_content", "reasoning", "inline", "content_parts"]
"""``content_parts``: thinking chunks in a list ``content`` (Mistral Magistral)."""


class ToolCall(Record):
    id: str
    name: str
    arguments: str
    """The raw JSON text the teacher produced, even when it does not parse."""
    parse_error: str | None = None
    echo: dict[str, Any] | None = None
    """Opaque state the provider attached to the call (Gemini's ``extra_content.google.thought_signature``),
    sent back verbatim with the call on later turns."""


class TopLogprob(Record):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Record):
    """One generated token and the server's top alternatives (OpenAI ``logprobs.content[i]``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TopLogprob] = Field(default_factory=list)


class SystemMessage(Record):
    role: Literal["system"] = "system"
    content: str


class UserMessage(Record):
    role: Literal["user"] = "user"
    content: str


class ExampleTurn(Record):
    """A worked example sent before the task (``few_shot``): part of the prompt, never the teacher's own
    behaviour, so it is recorded beside the messages and never trained."""

    role: Literal["user", "assistant"]
    content: str


class AssistantMessage(Record):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    reasoning: str | None = None
    reasoning_format: ReasoningFormat | None = None
    """How the server delivered the reasoning; decides how it is echoed back on later turns."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_protocol: ToolProtocol | None = None
    """How the tool calls were expressed: native function calling or one of the text forms."""
    finish_reason: str | None = None
    refusal: str | None = None
    """The model's refusal text (OpenAI ``refusal``), kept apart from the content."""
    echo: dict[str, Any] | None = None
    """Opaque continuation state the provider attached to the turn (OpenRouter ``reasoning_details``
    with their signatures), sent back verbatim on later turns."""
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    ttft_s: float | None = None
    attempts: int = 1
    reasoning_logprobs: list[TokenLogprob] | None = None
    """Per-token top log-probs of the tokens that arrived on reasoning deltas (``reasoning_content`` /
    ``reasoning``), in order; None when the server sent none (not requested, or e.g. SGLang, which
    sends ``logprobs: null`` on reasoning chunks)."""
    content_logprobs: list[TokenLogprob] | None = None
    """Per-token top log-probs of the tokens that arrived on content deltas, in order: the raw content,
    before inline ``<think>`` splitting and text-protocol call parsing, so the tokens' bytes join to the
    content the server sent. Tokens of deltas carrying only native tool calls are here too. A
    non-streamed reply's single list (reasoning and content tokens together) is all here."""


class Observation(Record):
    """Where a tool message came from, and what happened while producing it."""

    source: Literal["executed", "simulated", "error"]
    exit_code: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    duration_s: float = 0.0
    simulator: str | None = None
    """The model that role-played the tool, for ``source == "simulated"``."""


class ToolMessage(Record):
    role: Literal["tool"] = "tool"
    tool_call_id: str
    name: str
    content: str
    observation: Observation


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class ToolSpec(Record):
    """A tool offered to the teacher, in OpenAI function-calling shape."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class SamplingParams(Record):
    """None: not sent, the server's default applied."""

    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    seed: int | None = None
    max_completion_tokens: int | None = None
    reasoning_effort: str | None = None


class TeacherInfo(Record):
    """Who produced the trajectory. Never holds a key: only the host of the base URL."""

    model: str
    base_url_host: str
    sampling: SamplingParams


class RuntimeInfo(Record):
    kind: Literal["simulated", "docker"]
    image: str | None = None
    simulator_model: str | None = None


StopReason = Literal["answer", "max_turns", "length", "error", "budget", "time_budget"]


class TrajectoryError(Record):
    """A typed, recorded failure: a bad episode is data, never an exception.

    ``endpoint``: the teacher could not be reached or refused the request (key, URL, model), so the
    record is not a sample of its behaviour (collect retries it on resume); ``teacher``: any other
    failure of the teacher's API; ``deadline``: a request over its total deadline (``request_timeout_s``)."""

    kind: Literal["endpoint", "teacher", "deadline", "runtime", "tool_call", "budget", "internal"]
    message: str
    turn: int | None = None


class Timing(Record):
    started_at: str
    """ISO-8601 UTC."""
    wall_s: float = 0.0
    teacher_s: float = 0.0
    tool_s: float = 0.0


class Verdict(Record):
    check: str
    passed: bool
    score: float | None = None
    reason: str = ""
    judge_model: str | None = None
    usage: Usage | None = None


class Trajectory(Record):
    schema_version: int = SCHEMA_VERSION
    id: str
    tracegen_version: str
    recipe_fingerprint: str
    task: Task
    sample_index: int
    teacher: TeacherInfo
    runtime: RuntimeInfo
    tools: list[ToolSpec]
    few_shot: list[ExampleTurn] = Field(default_factory=list)
    """The example turns the teacher saw between the system prompt and the task (prompt, never trained)."""
    messages: list[Message]
    final_answer: str | None = None
    stop_reason: StopReason
    errors: list[TrajectoryError] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    requests: int = 0
    retries: int = 0
    timing: Timing
    verdicts: list[Verdict] = Field(default_factory=list)
    critique: str | None = None

    @property
    def turns(self) -> int:
        """Assistant turns, i.e. teacher requests that produced a reply."""
        return sum(1 for m in self.messages if isinstance(m, AssistantMessage))
