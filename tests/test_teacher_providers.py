"""Real providers' reply shapes and request rules, through the real client over loopback HTTP.

Each fake provider (``fake_server.Provider``) answers a request the real one refuses with its
documented 400, so these tests fail when a parameter or an echo is wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from tracegen.client.chat import ChatClient
from tracegen.client.wire import to_wire
from tracegen.collect.driver import run_collect
from tracegen.config import TeacherConfig
from tracegen.errors import TeacherError
from tracegen.records import AssistantMessage, Message, Observation, SystemMessage, ToolMessage, Trajectory, UserMessage
from tracegen.testing.fake_server import (
    FakeServer,
    Provider,
    Reply,
    Scripted,
    anthropic_reply,
    gemini_tool_call_reply,
    mistral_thinking_reply,
    openrouter_reasoning_reply,
    refusal_reply,
    responses_reply,
    text_reply,
    tool_call_reply,
    unindexed_tool_call_reply,
)

from .conftest import SECRET, make_config

Start = Callable[[Any], FakeServer]
ARGS = json.dumps({"code": "print(6 * 7)"})


def converse(server: FakeServer, turns: int = 2, **cfg: Any) -> list[AssistantMessage]:
    """``turns`` teacher turns through the client, each tool call answered, earlier turns echoed by to_wire."""
    config = TeacherConfig.model_validate(
        {"base_url": server.base_url, "model": "m", "backoff_base_s": 0.01, "backoff_max_s": 0.05, **cfg}
    )
    tools = [{"type": "function", "function": {"name": "python", "parameters": {"type": "object"}}}]

    async def go() -> list[AssistantMessage]:
        client = ChatClient(config)
        history: list[Message] = [SystemMessage(content="s"), UserMessage(content="u")]
        replies = []
        try:
            for turn in range(turns):
                wire = to_wire(history, config.reasoning_echo, config.reasoning_field)
                reply = await client.complete(
                    wire, tools, tool_protocol=config.tool_protocol, call_id_prefix=f"c{turn}"
                )
                replies.append(reply)
                history.append(reply)
                for call in reply.tool_calls:
                    observation = Observation(source="simulated")
                    history.append(
                        ToolMessage(tool_call_id=call.id, name=call.name, content="42", observation=observation)
                    )
            return replies
        finally:
            await client.aclose()

    return asyncio.run(go())


# --- 1. OpenAI reasoning models -------------------------------------------------------------------


def test_reasoning_model_params_null_means_not_sent(fake_server: Start) -> None:
    server = fake_server(Provider("openai_reasoning", Scripted([text_reply("ok")])))
    cfg = {"temperature": None, "top_p": None, "max_completion_tokens": 2000, "reasoning_effort": "low"}
    [reply] = converse(server, turns=1, **cfg)
    assert reply.content == "ok"
    sent = server.requests[0]
    assert (sent["max_completion_tokens"], sent["reasoning_effort"]) == (2000, "low")
    assert not {"max_tokens", "temperature", "top_p"} & set(sent)


@pytest.mark.parametrize(
    ("cfg", "param", "hint"),
    [
        ({}, "max_tokens", "max_completion_tokens"),
        ({"max_completion_tokens": 100}, "temperature", "`teacher.temperature: null`"),
    ],
)
def test_reasoning_model_400_shows_the_server_text_and_a_hint(
    fake_server: Start, cfg: dict[str, Any], param: str, hint: str
) -> None:
    server = fake_server(Provider("openai_reasoning", Scripted([])))
    with pytest.raises(TeacherError) as info:
        converse(server, turns=1, **cfg)
    assert info.value.status == 400 and len(server.requests) == 1  # not retried
    assert f"'{param}'" in info.value.message and "Unsupported" in info.value.message
    assert hint in (info.value.hint or "")


def test_extra_body_null_removes_a_key(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply("ok")]))
    converse(server, turns=1, extra_body={"top_p": None, "max_tokens": None})
    assert not {"top_p", "max_tokens"} & set(server.requests[0])


# --- 2. opaque continuation state: Gemini signatures, OpenRouter reasoning_details ---------------


def test_gemini_thought_signature_is_kept_and_echoed(fake_server: Start) -> None:
    server = fake_server(Provider("gemini", Scripted([gemini_tool_call_reply("python", ARGS, "sig-A")])))
    first, second = converse(server)
    assert first.tool_calls[0].echo == {"extra_content": {"google": {"thought_signature": "sig-A"}}}
    assert second.content == "done"  # the fake's 400 would have failed the second turn
    [echoed] = server.requests[1]["messages"][2]["tool_calls"]
    assert echoed["extra_content"]["google"]["thought_signature"] == "sig-A"


def test_openrouter_reasoning_details_are_merged_kept_and_echoed(fake_server: Start) -> None:
    reply = openrouter_reasoning_reply("python", ARGS, thought="let me compute this", signature="sig-A")
    server = fake_server(Provider("openrouter", Scripted([reply])))
    first, second = converse(server)
    assert first.reasoning == "let me compute this"
    [detail] = (first.echo or {})["reasoning_details"]
    assert detail["text"] == "let me compute this" and detail["signature"] == "sig-A"
    assert second.content == "done"
    assert server.requests[1]["messages"][2]["reasoning_details"] == [detail]
    # the record round-trips (it is what a resumed or formatted run reads back)
    assert AssistantMessage.model_validate_json(first.model_dump_json()) == first


# --- 3. reasoning field echo ----------------------------------------------------------------------


def test_both_reasoning_fields_echo_in_reasoning_for_vllm(fake_server: Start) -> None:
    reply = tool_call_reply([("python", ARGS)], reasoning="think first", shape="both")
    server = fake_server(Provider("vllm", Scripted([reply])))
    first, second = converse(server)
    assert first.reasoning == "think first" and first.reasoning_format == "reasoning"
    assert second.content == "done"


def test_reasoning_field_setting_pins_the_echo_field(fake_server: Start) -> None:
    reply = tool_call_reply([("python", ARGS)], reasoning="think first", shape="reasoning_content")
    server = fake_server(Provider("vllm", Scripted([reply])))
    converse(server, reasoning_field="reasoning")
    echoed = server.requests[1]["messages"][2]
    assert echoed["reasoning"] == "think first" and "reasoning_content" not in echoed


# --- 4. Mistral content parts ---------------------------------------------------------------------


def test_mistral_thinking_chunks_become_reasoning(fake_server: Start) -> None:
    server = fake_server(Scripted([mistral_thinking_reply("The answer is 42.", thinking="six times seven")]))
    [reply] = converse(server, turns=1)
    assert (reply.content, reply.reasoning, reply.reasoning_format) == (
        "The answer is 42.",
        "six times seven",
        "content_parts",
    )
    wire = to_wire([reply], "always")[0]
    assert wire["content"][0] == {"type": "thinking", "thinking": [{"type": "text", "text": "six times seven"}]}


# --- 5. tool-call deltas without index; refusals --------------------------------------------------


def test_tool_call_deltas_without_index_are_assembled_by_id(fake_server: Start) -> None:
    calls = [("python", ARGS), ("bash", json.dumps({"command": "ls"}))]
    server = fake_server(Scripted([unindexed_tool_call_reply(calls)]))
    [reply] = converse(server, turns=1)
    assert [(c.id, c.name, c.arguments, c.parse_error) for c in reply.tool_calls] == [
        ("srv-call-0", "python", ARGS, None),
        ("srv-call-1", "bash", calls[1][1], None),
    ]


def test_refusal_is_kept_on_the_record(fake_server: Start) -> None:
    server = fake_server(Scripted([refusal_reply("I can't help with that.")]))
    [reply] = converse(server, turns=1)
    assert reply.refusal == "I can't help with that." and reply.content == ""


# --- 6. tool calls left unparsed by the server ----------------------------------------------------

DS = "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>"
DS_SEP, DS_END = (
    "<\uff5ctool\u2581sep\uff5c>",
    "<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>",
)
UNPARSED = {
    # vLLM's deepseek_v3 parser input (DeepSeek-V3 chat template): type, sep, name, fenced JSON
    "deepseek": f"Let me run it.{DS}function{DS_SEP}python\n```json\n{ARGS}\n```{DS_END}",
    # Llama 3.1/3.2 JSON tool calling (llama.com model card, "JSON based tool calling")
    "llama3_json": '{"name": "python", "parameters": {"code": "print(6 * 7)"}}',
    # Mistral tokenizer v11+ (mistral-common): [TOOL_CALLS]NAME[ARGS]{...}
    "mistral_text": f"[TOOL_CALLS]python[ARGS]{ARGS}",
    # gpt-oss harmony (cookbook.openai.com/articles/openai-harmony, "Function calling")
    "harmony": "<|channel|>analysis<|message|>Need to compute.<|end|><|start|>assistant<|channel|>commentary "
    f"to=functions.python <|constrain|>json<|message|>{ARGS}<|call|>",
}


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("protocol", sorted(UNPARSED))
def test_unparsed_text_tool_calls_are_detected(fake_server: Start, protocol: str, pinned: bool) -> None:
    server = fake_server(Scripted([text_reply(UNPARSED[protocol])]))
    [reply] = converse(server, turns=1, tool_protocol=protocol if pinned else "auto")
    assert reply.tool_protocol == protocol
    [call] = reply.tool_calls
    assert (call.name, json.loads(call.arguments), call.parse_error) == ("python", {"code": "print(6 * 7)"}, None)


def test_mistral_v3_list_form_and_a_json_answer_is_not_a_call(fake_server: Start) -> None:
    listed = '[TOOL_CALLS][{"name": "python", "arguments": {"code": "1"}}, {"name": "bash", "arguments": {}}]'
    server = fake_server(Scripted([text_reply(listed), text_reply('{"name": "Ada", "age": 36}')]))
    first, second = converse(server, turns=2)
    assert [c.name for c in first.tool_calls] == ["python", "bash"]
    assert second.tool_calls == [] and second.tool_protocol is None


def test_unparsable_unparsed_call_is_an_error_observation_not_an_answer(fake_server: Start, tmp_path: Any) -> None:
    broken = f"{DS}function{DS_SEP}python\n```json\n{{'code': oops}}\n```{DS_END}"
    server = fake_server(Scripted([text_reply(broken), text_reply("The answer is 42.")]))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t0", "prompt": "6*7?"}) + "\n")
    run_collect(make_config(server.base_url, tasks), tmp_path / "run", show_progress=False)
    [line] = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    trajectory = Trajectory.model_validate_json(line)
    assert trajectory.stop_reason == "answer" and trajectory.final_answer == "The answer is 42."
    observation = next(m for m in trajectory.messages if isinstance(m, ToolMessage))
    assert observation.observation.source == "error" and observation.content.startswith("Error:")


# --- 14. literal tags in an answer ----------------------------------------------------------------


def test_literal_tags_in_an_answer_are_text(fake_server: Start) -> None:
    answer = (
        "Qwen3 closes its reasoning with </think> before answering, and wraps calls in <tool_call> tags:\n"
        '```\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n```\nSo `<function=f>` is the other form.'
    )
    server = fake_server(Scripted([text_reply(answer)]))
    [reply] = converse(server, turns=1)
    assert (reply.content, reply.reasoning, reply.tool_calls) == (answer, None, [])


def test_key_in_a_400_is_scrubbed_before_truncation(fake_server: Start) -> None:
    from tracegen.testing.fake_server import error_reply

    message = "x" * 290 + SECRET  # cut at 300 first, a key prefix would survive
    server = fake_server(Scripted([error_reply(400, message)]))
    with pytest.raises(TeacherError) as info:
        converse(server, turns=1)
    assert SECRET[:8] not in info.value.message and "***" in info.value.message


# --- 7. the Responses API -------------------------------------------------------------------------


def test_responses_api_reasoning_items_are_kept_and_echoed(fake_server: Start) -> None:
    first_reply = responses_reply(reasoning="plan the call", calls=[("python", ARGS)], encrypted="sig-A")
    server = fake_server(Provider("openai_responses", Scripted([first_reply, responses_reply(text="done")])))
    first, second = converse(server, api="responses", reasoning_effort="high")
    assert (first.reasoning, first.finish_reason, first.usage.reasoning_tokens) == ("plan the call", "tool_calls", 7)
    assert [(c.id, c.name, c.arguments) for c in first.tool_calls] == [("call_0", "python", ARGS)]
    [item] = (first.echo or {})["reasoning_items"]
    assert item["encrypted_content"] == "sig-A"
    assert (second.content, second.finish_reason) == ("done", "stop")  # the fake's 400 had the echo been wrong
    sent = server.requests[0]
    assert "messages" not in sent and sent["store"] is False and sent["reasoning"]["effort"] == "high"
    assert sent["max_output_tokens"] == 4096 and sent["include"] == ["reasoning.encrypted_content"]
    kinds = [i.get("type", i.get("role")) for i in server.requests[1]["input"]]
    assert kinds == ["system", "user", "reasoning", "function_call", "function_call_output"]
    # without the reasoning item the provider refuses the next turn: the fake bites
    again = fake_server(
        Provider("openai_responses", Scripted([responses_reply(reasoning="r", calls=[("python", ARGS)])]))
    )
    with pytest.raises(TeacherError, match="required 'reasoning' item"):
        converse(again, api="responses", reasoning_echo="never")


def test_collect_runs_unchanged_on_the_responses_api(fake_server: Start, tmp_path: Any) -> None:
    def script(request: dict[str, Any]) -> Any:
        if "input" not in request:  # the simulator stays on chat completions
            return text_reply("42\nEXIT_CODE: 0")
        if any(i.get("type") == "function_call_output" for i in request["input"]):
            return responses_reply(text="The answer is 42.", reasoning="read the output")
        return responses_reply(reasoning="run it", calls=[("python", ARGS)])

    server = fake_server(Provider("openai_responses", script))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t0", "prompt": "6*7?"}) + "\n")
    config = make_config(server.base_url, tasks, teacher={"api": "responses"})
    run_collect(config, tmp_path / "run", show_progress=False)
    [line] = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    trajectory = Trajectory.model_validate_json(line)
    assert (trajectory.stop_reason, trajectory.final_answer) == ("answer", "The answer is 42.")
    assert [m.role for m in trajectory.messages] == ["system", "user", "assistant", "tool", "assistant"]


# --- 8. the Anthropic Messages API ----------------------------------------------------------------


def test_anthropic_thinking_blocks_are_kept_and_echoed_unmodified(fake_server: Start) -> None:
    first_reply = anthropic_reply(thinking="let me think", calls=[("python", ARGS)], signature="sig-A", redacted=True)
    server = fake_server(Provider("anthropic", Scripted([first_reply, anthropic_reply(text="done")])))
    first, second = converse(server, api="anthropic", temperature=None, top_p=None)
    assert (first.reasoning, first.finish_reason, first.usage.completion_tokens) == ("let me think", "tool_calls", 30)
    assert [(c.id, c.name, c.arguments) for c in first.tool_calls] == [("toolu_0", "python", ARGS)]
    blocks = (first.echo or {})["reasoning_items"]
    assert blocks == [
        {"type": "thinking", "thinking": "let me think", "signature": "sig-A"},
        {"type": "redacted_thinking", "data": "opaque-redacted"},
    ]
    assert (second.content, second.finish_reason) == ("done", "stop")  # the fake's 400 had the echo been wrong
    assert server.headers[0]["x-api-key"] == SECRET and server.headers[0]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in server.headers[0]
    sent = server.requests[1]
    assert sent["system"] == "s" and sent["max_tokens"] == 4096 and "temperature" not in sent
    assistant, results = sent["messages"][1], sent["messages"][2]
    assert [b["type"] for b in assistant["content"]] == ["thinking", "redacted_thinking", "tool_use"]
    assert assistant["content"][2]["input"] == json.loads(ARGS)
    assert results == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "42"}]}
    # without the thinking block the API refuses the next turn: the fake bites
    again = fake_server(Provider("anthropic", Scripted([anthropic_reply(thinking="t", calls=[("python", ARGS)])])))
    with pytest.raises(TeacherError, match="Expected `thinking` or `redacted_thinking`"):
        converse(again, api="anthropic", reasoning_echo="never")


def test_responses_summary_parts_are_paragraphs(fake_server: Start) -> None:
    """Each summary part arrives as part.added, its deltas, part.done: parts are joined, nothing trails."""
    events: list[dict[str, Any]] = []
    for n, text in enumerate(["First I plan.", "Then I check."]):
        events.append({"type": "response.reasoning_summary_part.added", "item_id": "rs_1", "summary_index": n})
        events.append({"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "delta": text})
        events.append({"type": "response.reasoning_summary_part.done", "item_id": "rs_1", "summary_index": n})
    events.append({"type": "response.output_text.delta", "item_id": "msg_1", "delta": "42"})
    events.append({"type": "response.completed", "response": {"usage": {}}})
    server = fake_server(Scripted([Reply(body=[f"data: {json.dumps(e)}\n\n".encode() for e in events])]))
    [reply] = converse(server, turns=1, api="responses")
    assert (reply.reasoning, reply.content) == ("First I plan.\n\nThen I check.", "42")


# --- 7 and 8 without streaming --------------------------------------------------------------------


@pytest.mark.parametrize(("api", "provider"), [("responses", "openai_responses"), ("anthropic", "anthropic")])
def test_non_streamed_reply_is_the_streamed_one(fake_server: Start, api: str, provider: str) -> None:
    """``stream: false`` asks for the whole object (the provider's non-streamed shape) and records the same turns,
    reasoning, continuation state and calls as streaming does; the fake provider refuses a wrong echo."""

    def script() -> Scripted:
        tool_turn = tool_call_reply([("python", ARGS)], reasoning="plan the call")
        return Scripted([tool_turn, text_reply("The answer is 42.", reasoning="read the output")])

    streamed_server, whole_server = fake_server(Provider(provider, script())), fake_server(Provider(provider, script()))
    streamed = converse(streamed_server, api=api)
    whole = converse(whole_server, api=api, stream=False)
    assert [r["stream"] for r in whole_server.requests] == [False, False]
    assert [r["stream"] for r in streamed_server.requests] == [True, True]
    timing = {"latency_s": 0.0, "ttft_s": None}
    assert [m.model_copy(update=timing) for m in whole] == [m.model_copy(update=timing) for m in streamed]
    first, second = whole
    assert (first.reasoning, first.finish_reason, [c.name for c in first.tool_calls]) == (
        "plan the call",
        "tool_calls",
        ["python"],
    )
    assert json.loads(first.tool_calls[0].arguments) == json.loads(ARGS)
    assert (first.echo or {})["reasoning_items"], "the reasoning state to echo was kept"
    assert (second.content, second.finish_reason, second.reasoning) == ("The answer is 42.", "stop", "read the output")


def test_anthropic_top_logprobs_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="returns no log-probs"):
        TeacherConfig.model_validate({"api": "anthropic", "top_logprobs": 5})


def test_collect_runs_unchanged_on_the_anthropic_api(fake_server: Start, tmp_path: Any) -> None:
    def script(request: dict[str, Any]) -> Any:
        if "stream_options" in request:  # the simulator stays on chat completions
            return text_reply("42\nEXIT_CODE: 0")
        done = any(isinstance(m["content"], list) and m["role"] == "user" for m in request["messages"])
        return (
            anthropic_reply(text="The answer is 42.")
            if done
            else anthropic_reply(thinking="run", calls=[("python", ARGS)])
        )

    server = fake_server(Provider("anthropic", script))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t0", "prompt": "6*7?"}) + "\n")
    run_collect(
        make_config(
            server.base_url,
            tasks,
            teacher={"api": "anthropic", "reasoning_effort": "high", "seed": 7, "max_tokens": None},
            simulator={"max_tokens": 64},
        ),
        tmp_path / "run",
        show_progress=False,
    )
    [line] = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    trajectory = Trajectory.model_validate_json(line)
    assert (trajectory.stop_reason, trajectory.final_answer) == ("answer", "The answer is 42.")
    # the Messages API has no field for them: not sent, so the record (and the card) does not claim them
    teacher_requests = [b for b in server.requests if "stream_options" not in b]
    assert teacher_requests and not any({"reasoning_effort", "seed"} & set(b) for b in teacher_requests)
    assert (trajectory.teacher.sampling.reasoning_effort, trajectory.teacher.sampling.seed) == (None, None)
    # its one limit is recorded as sent: with max_tokens unset, the default the API requires
    assert {b["max_tokens"] for b in teacher_requests} == {trajectory.teacher.sampling.max_tokens}
