from __future__ import annotations

import pytest
from pydantic import ValidationError

from tracegen.client.tools import tool_specs
from tracegen.records import (
    AssistantMessage,
    Observation,
    RuntimeInfo,
    SamplingParams,
    SystemMessage,
    Task,
    TeacherInfo,
    Timing,
    ToolCall,
    ToolMessage,
    Trajectory,
    TrajectoryError,
    Usage,
    UserMessage,
)


def sample_trajectory() -> Trajectory:
    return Trajectory(
        id="abc",
        tracegen_version="0.1.0",
        recipe_fingerprint="f" * 16,
        task=Task(id="t1", prompt="2+2?", reference="4", metadata={"topic": "arith", "level": 1}),
        sample_index=3,
        teacher=TeacherInfo(
            model="m", base_url_host="h:1", sampling=SamplingParams(temperature=0.6, top_p=0.95, max_tokens=9)
        ),
        runtime=RuntimeInfo(kind="simulated", simulator_model="s"),
        tools=tool_specs(["python"]),
        messages=[
            SystemMessage(content="sys"),
            UserMessage(content="2+2?"),
            AssistantMessage(
                reasoning="let me think — ünïcode ✓",
                reasoning_format="reasoning_content",
                tool_calls=[ToolCall(id="c1", name="python", arguments='{"code": "print(4)"}')],
                tool_protocol="native",
                finish_reason="tool_calls",
                usage=Usage(prompt_tokens=5, completion_tokens=7, reasoning_tokens=3),
                latency_s=0.123456789,
                ttft_s=0.0101,
            ),
            ToolMessage(
                tool_call_id="c1",
                name="python",
                content="4\n",
                observation=Observation(source="simulated", exit_code=0, duration_s=0.5, simulator="s"),
            ),
            AssistantMessage(content="4", finish_reason="stop"),
        ],
        final_answer="4",
        stop_reason="answer",
        errors=[TrajectoryError(kind="teacher", message="x", turn=0)],
        usage=Usage(prompt_tokens=5, completion_tokens=7),
        timing=Timing(started_at="2026-11-22T00:00:00+00:00", wall_s=1.5),
    )


def test_json_round_trip_is_exact() -> None:
    t = sample_trajectory()
    again = Trajectory.model_validate_json(t.model_dump_json())
    assert again == t
    assert again.model_dump_json() == t.model_dump_json()
    assert isinstance(again.messages[2], AssistantMessage)
    assert isinstance(again.messages[3], ToolMessage)
    assert again.turns == 2


def test_records_reject_unknown_fields() -> None:
    data = sample_trajectory().model_dump()
    data["messages"][0]["colour"] = "red"
    with pytest.raises(ValidationError, match="colour"):
        Trajectory.model_validate(data)


def test_schema_version_is_recorded() -> None:
    assert '"schema_version":1' in sample_trajectory().model_dump_json()
