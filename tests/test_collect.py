"""collect end to end against the loopback server: agent loop, runtimes, resume, errors, secrets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.collect.driver import run_collect
from tracegen.data.format import message_rows
from tracegen.data.templates import MaskPolicy, render_instruct, render_proof
from tracegen.errors import BadInputError
from tracegen.records import AssistantMessage, ToolMessage
from tracegen.store import read_trajectories
from tracegen.testing.fake_server import (
    FakeServer,
    ReactScript,
    Reply,
    Scripted,
    error_reply,
    text_reply,
    tool_call_reply,
)

from .conftest import SECRET, make_config, write_tasks

Start = Callable[[Any], FakeServer]


def records(run: Path) -> list[Any]:
    return list(read_trajectories(run / "trajectories.jsonl"))


def test_react_episode_is_recorded_with_reasoning_tools_and_provenance(
    fake_server: Start, tasks_file: Path, tmp_path: Path
) -> None:
    server = fake_server(ReactScript(turns=3, latency_s=0.0))
    summary = run_collect(
        make_config(server.base_url, tasks_file, samples_per_task=2), tmp_path / "run", show_progress=False
    )
    assert summary.completed == 6 and summary.by_stop_reason == {"answer": 6}
    trajs = records(tmp_path / "run")
    assert sorted((t.task.id, t.sample_index) for t in trajs) == [(f"t{i}", k) for i in range(3) for k in range(2)]
    t = trajs[0]
    assert t.stop_reason == "answer" and t.final_answer == "The answer is 42."
    assert [m.role for m in t.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    first = t.messages[2]
    assert isinstance(first, AssistantMessage) and first.reasoning and first.tool_calls[0].name == "python"
    obs = t.messages[3]
    assert isinstance(obs, ToolMessage)
    assert obs.observation.source == "simulated" and obs.observation.simulator == "fake-teacher"
    assert obs.observation.exit_code == 0 and obs.content == "hello from the simulator"
    assert t.teacher.model == "fake-teacher" and t.teacher.base_url_host.startswith("127.0.0.1:")
    assert t.runtime.kind == "simulated" and [s.name for s in t.tools] == ["python", "bash"]
    assert t.usage.completion_tokens == sum(
        m.usage.completion_tokens for m in t.messages if isinstance(m, AssistantMessage)
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["completed"] == 6


def test_rerun_resumes_without_duplicates_and_grows_with_k(
    fake_server: Start, tasks_file: Path, tmp_path: Path
) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.0))
    cfg = make_config(server.base_url, tasks_file)
    run_collect(cfg, tmp_path / "run", show_progress=False)
    before = len(server.requests)
    again = run_collect(cfg, tmp_path / "run", show_progress=False)
    assert again.completed == 0 and again.already_done == 3 and len(server.requests) == before
    more = run_collect(
        make_config(server.base_url, tasks_file, samples_per_task=3), tmp_path / "run", show_progress=False
    )
    assert more.completed == 6
    ids = [t.id for t in records(tmp_path / "run")]
    assert len(ids) == len(set(ids)) == 9


def test_each_sample_of_a_task_gets_its_own_seed(fake_server: Start, tasks_file: Path, tmp_path: Path) -> None:
    # A seeded server returns identical samples for identical seeds: K samples need K seeds.
    server = fake_server(ReactScript(turns=1, latency_s=0.0))
    cfg = make_config(server.base_url, tasks_file, samples_per_task=3, teacher={"seed": 7})
    run_collect(cfg, tmp_path / "run", show_progress=False)
    seeds_by_task: dict[str, set[int]] = {}
    for request in server.requests:
        prompt = request["messages"][1]["content"]
        seeds_by_task.setdefault(prompt, set()).add(request["seed"])
    assert len(seeds_by_task) == 3 and all(seeds == {7, 8, 9} for seeds in seeds_by_task.values())


def test_changed_generation_settings_refuse_to_resume(fake_server: Start, tasks_file: Path, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=1, latency_s=0.0))
    run_collect(make_config(server.base_url, tasks_file), tmp_path / "run", show_progress=False)
    with pytest.raises(BadInputError, match="different generation settings"):
        run_collect(make_config(server.base_url, tasks_file, teacher={"temperature": 1.0}), tmp_path / "run")


def test_malformed_call_becomes_an_error_observation_and_the_teacher_recovers(
    fake_server: Start, tasks_file: Path, tmp_path: Path
) -> None:
    script = Scripted(
        [
            tool_call_reply([("python", '{"code": ')]),
            tool_call_reply([("nosuchtool", "{}")]),
            tool_call_reply([("python", '{"code": "print(2)"}')]),
            text_reply("sim output\nEXIT_CODE: 3"),  # the simulator's reply
            text_reply("4"),
        ]
    )
    server = fake_server(script)
    run_collect(
        make_config(server.base_url, write_tasks(tmp_path / "one.jsonl", 1)), tmp_path / "run", show_progress=False
    )
    [t] = records(tmp_path / "run")
    tools = [m for m in t.messages if isinstance(m, ToolMessage)]
    assert [m.observation.source for m in tools] == ["error", "error", "simulated"]
    assert "not valid JSON" in tools[0].content and "unknown tool 'nosuchtool'" in tools[1].content
    assert tools[2].observation.exit_code == 3 and tools[2].content == "sim output"
    assert t.stop_reason == "answer" and t.final_answer == "4" and t.errors == []
    # The teacher saw the error observations (native role=tool messages) on its next turn.
    second = server.requests[1]["messages"]
    assert second[-1]["role"] == "tool" and "not valid JSON" in second[-1]["content"]


def test_failed_teacher_is_recorded_and_the_run_goes_on(fake_server: Start, tmp_path: Path) -> None:
    script = Scripted([error_reply(400, "context length exceeded")], default=text_reply("fine"))
    server = fake_server(script)
    cfg = make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 3), concurrency=1)
    summary = run_collect(cfg, tmp_path / "run", show_progress=False)
    assert summary.completed == 3 and summary.by_stop_reason == {"error": 1, "answer": 2}
    failed = next(t for t in records(tmp_path / "run") if t.stop_reason == "error")
    assert failed.errors[0].kind == "teacher" and "HTTP 400" in failed.errors[0].message


def test_length_max_turns_and_budget_stop_reasons(fake_server: Start, tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "t.jsonl", 1)
    cut = Reply(events=[{"delta": {"content": "<think>long"}}, {"delta": {}, "finish_reason": "length"}])
    server = fake_server(Scripted([cut]))
    run_collect(make_config(server.base_url, tasks), tmp_path / "a", show_progress=False)
    assert records(tmp_path / "a")[0].stop_reason == "length"

    loop = fake_server(ReactScript(turns=99, latency_s=0.0))
    run_collect(make_config(loop.base_url, tasks, max_turns=2), tmp_path / "b", show_progress=False)
    assert records(tmp_path / "b")[0].stop_reason == "max_turns"

    run_collect(make_config(loop.base_url, tasks, token_budget=10), tmp_path / "c", show_progress=False)
    t = records(tmp_path / "c")[0]
    assert t.stop_reason == "budget" and t.errors[0].kind == "budget"


def test_deepseek_style_reasoning_is_echoed_on_tool_call_turns(fake_server: Start, tmp_path: Path) -> None:
    script = Scripted(
        [
            tool_call_reply([("python", '{"code": "1"}')], reasoning="I should run code"),
            text_reply("out\nEXIT_CODE: 0"),
            text_reply("done", reasoning="final thought"),
        ]
    )
    server = fake_server(script)
    tasks = write_tasks(tmp_path / "t.jsonl", 1)
    run_collect(make_config(server.base_url, tasks), tmp_path / "auto", show_progress=False)
    echoed = server.requests[2]["messages"][2]
    assert echoed["role"] == "assistant" and echoed["reasoning_content"] == "I should run code"

    script.replies = [tool_call_reply([("python", '{"code": "1"}')], reasoning="x"), text_reply("o"), text_reply("d")]
    run_collect(
        make_config(server.base_url, tasks, teacher={"reasoning_echo": "never"}),
        tmp_path / "never",
        show_progress=False,
    )
    assert "reasoning_content" not in server.requests[-1]["messages"][2]


def test_pinned_text_protocol_puts_tools_in_the_prompt_and_answers_in_tool_response(
    fake_server: Start, tmp_path: Path
) -> None:
    call = '<tool_call>{"name": "bash", "arguments": {"command": "echo hi"}}</tool_call>'
    server = fake_server(Scripted([text_reply(call), text_reply("hi\nEXIT_CODE: 0"), text_reply("said hi")]))
    cfg = make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 1), teacher={"tool_protocol": "hermes"})
    run_collect(cfg, tmp_path / "run", show_progress=False)
    first, _, third = server.requests
    assert "tools" not in first and "<tool_call>" in first["messages"][0]["content"]
    assert third["messages"][-1] == {"role": "user", "content": "<tool_response>\nhi\n</tool_response>"}
    assert records(tmp_path / "run")[0].final_answer == "said hi"


def test_few_shot_turns_are_sent_before_every_task_recorded_apart_and_never_trained(
    fake_server: Start, tmp_path: Path
) -> None:
    example = [
        {"role": "user", "content": "What is 12 * 34? Use the python tool."},
        {"role": "assistant", "content": '<tool_call>{"name": "python", "arguments": {"code": "print(12*34)"}}'},
        {"role": "user", "content": "<tool_response>\n408\n</tool_response>"},
        {"role": "assistant", "content": "12 * 34 = 408."},
    ]
    call = '<tool_call>{"name": "bash", "arguments": {"command": "echo hi"}}</tool_call>'
    server = fake_server(Scripted([text_reply(call), text_reply("hi\nEXIT_CODE: 0"), text_reply("said hi")]))
    tasks = write_tasks(tmp_path / "t.jsonl", 1)
    cfg = make_config(server.base_url, tasks, teacher={"tool_protocol": "hermes"}, few_shot=example)
    run_collect(cfg, tmp_path / "run", show_progress=False)
    first, _, third = server.requests  # the teacher's two turns (the second request is the simulator's)
    for request in (first, third):  # every turn of the trajectory sees them, right after the system turn
        assert request["messages"][0]["role"] == "system" and request["messages"][1:5] == example
        assert request["messages"][5] == {"role": "user", "content": "What is 0 + 0?"}
    (t,) = records(tmp_path / "run")
    assert [turn.model_dump() for turn in t.few_shot] == example and t.final_answer == "said hi"
    assert [m.role for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    # Prompt, not the teacher's behaviour: no template renders them, so no token of them is trained.
    for rendered in (render_proof(t, MaskPolicy(), "</s>"), render_instruct(t, MaskPolicy(), "</s>")):
        text = "".join(piece.text for piece in rendered.pieces)
        assert "12 * 34" not in text and "What is 0 + 0?" in text
    assert not any("12 * 34" in str(row["content"]) for row in message_rows(t))


def test_bad_task_line_stops_before_any_request_and_writes_nothing(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=1, latency_s=0.0))
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": ""}\n')
    with pytest.raises(BadInputError, match=r"t\.jsonl:2: field 'prompt' must be a non-empty string"):
        run_collect(make_config(server.base_url, tasks), tmp_path / "run")
    assert server.requests == [] and not (tmp_path / "run").exists()


def test_tasks_from_a_local_hugging_face_dataset(fake_server: Start, tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"qid": ["x", "y"], "question": ["1+1?", "2+2?"], "answer": ["2", "4"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    server = fake_server(ReactScript(turns=1, latency_s=0.0))
    cfg = make_config(
        server.base_url, tmp_path / "ds", task_columns={"id": "qid", "prompt": "question", "reference": "answer"}
    )
    run_collect(cfg, tmp_path / "run", show_progress=False)
    assert sorted((t.task.id, t.task.reference) for t in records(tmp_path / "run")) == [("x", "2"), ("y", "4")]


def test_the_key_never_reaches_any_file(fake_server: Start, tasks_file: Path, tmp_path: Path) -> None:
    server = fake_server(Scripted([error_reply(400, f"bad key {SECRET}")], default=text_reply("ok")))
    run_collect(make_config(server.base_url, tasks_file), tmp_path / "run", show_progress=False)
    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"
    for path in (tmp_path / "run").iterdir():
        assert SECRET not in path.read_text(), path


def test_simulator_sees_this_trajectorys_earlier_calls_only(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=3, latency_s=0.0))
    cfg = make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 1))
    run_collect(cfg, tmp_path / "run", show_progress=False)
    simulator_requests = [r for r in server.requests if not r.get("tools")]
    assert len(simulator_requests) == 2
    first, second = (r["messages"] for r in simulator_requests)
    assert first[0]["role"] == "system" and "EXIT_CODE" in first[0]["content"]
    assert len(first) == 2 and len(second) == 4  # the second call carries the first call and its output
    assert "print(0 * 7)" in second[1]["content"] and "print(1 * 7)" in second[3]["content"]


def test_badly_typed_calls_and_calls_past_the_caps_are_error_observations(fake_server: Start, tmp_path: Path) -> None:
    """The teacher is told what was wrong and the trajectory goes on; nothing past a cap runs."""
    calls = [
        ("python", '{"code": 5}'),
        ("python", "{}"),
        ("python", '{"code": "print(1)"}'),
        ("bash", '{"command": "ls"}'),
    ]
    script = Scripted([tool_call_reply(calls), text_reply("1"), text_reply("The answer is 1.")])
    server = fake_server(script)
    cfg = make_config(server.base_url, write_tasks(tmp_path / "one.jsonl", 1), max_tool_calls_per_reply=3)
    summary = run_collect(cfg, tmp_path / "run", show_progress=False)
    assert summary.by_stop_reason == {"answer": 1}
    (t,) = records(tmp_path / "run")
    observations = [m for m in t.messages if isinstance(m, ToolMessage)]
    assert [m.observation.source for m in observations] == ["error", "error", "simulated", "error"]
    assert "'code' of tool 'python' must be a JSON string, got integer" in observations[0].content
    assert "missing required argument(s) 'code'" in observations[1].content
    assert "at most 3 tool calls" in observations[3].content
    assert [m.tool_call_id for m in observations] == [c.id for c in t.messages[2].tool_calls]  # type: ignore[union-attr]
