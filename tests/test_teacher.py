"""The teacher client over real HTTP on loopback, against every reply shape a real server sends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tracegen.client.chat import ChatClient
from tracegen.config import TeacherConfig
from tracegen.errors import TeacherError
from tracegen.records import AssistantMessage
from tracegen.testing.fake_server import (
    FakeServer,
    Reply,
    Scripted,
    error_reply,
    text_reply,
    tool_call_reply,
)

from .conftest import SECRET

MESSAGES = [{"role": "user", "content": "hi"}]


def ask(server: FakeServer, tool_protocol: Any = "auto", **cfg: Any) -> AssistantMessage:
    config = TeacherConfig.model_validate(
        {"base_url": server.base_url, "model": "m", "backoff_base_s": 0.01, "backoff_max_s": 0.05, **cfg}
    )

    async def go() -> AssistantMessage:
        client = ChatClient(config)
        try:
            return await client.complete(MESSAGES, tools=None, tool_protocol=tool_protocol)
        finally:
            await client.aclose()

    return asyncio.run(go())


Start = Callable[[Any], FakeServer]


@pytest.mark.parametrize("shape", ["reasoning_content", "reasoning", "inline", "inline_open"])
def test_reasoning_is_captured_in_every_shape(fake_server: Start, shape: str) -> None:
    server = fake_server(Scripted([text_reply("The answer is 4.", reasoning="2 plus 2 is 4", shape=shape)]))
    reply = ask(server)
    assert reply.reasoning == "2 plus 2 is 4"
    assert reply.content == "The answer is 4."
    assert reply.reasoning_format == ("inline" if shape.startswith("inline") else shape)
    assert reply.finish_reason == "stop"
    assert (
        reply.usage.completion_tokens > 0 and reply.usage.reasoning_tokens == 5
    )  # words of "2 plus 2 is 4", as the fake counts
    assert reply.ttft_s is not None and 0 < reply.ttft_s <= reply.latency_s


def test_unclosed_think_cut_by_length_is_all_reasoning(fake_server: Start) -> None:
    reply = Reply(events=[{"delta": {"content": "<think>\nstill going"}}, {"delta": {}, "finish_reason": "length"}])
    msg = ask(fake_server(Scripted([reply])))
    assert (msg.reasoning, msg.content, msg.finish_reason) == ("still going", "", "length")


def test_tool_call_deltas_split_across_chunks_and_parallel_calls(fake_server: Start) -> None:
    calls = [("python", json.dumps({"code": "print('a' * 3)"})), ("bash", json.dumps({"command": "ls -la /tmp"}))]
    server = fake_server(Scripted([tool_call_reply(calls, reasoning="two tools", pieces=5)]))
    msg = ask(server)
    assert msg.tool_protocol == "native"
    assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == [
        ("python", {"code": "print('a' * 3)"}),
        ("bash", {"command": "ls -la /tmp"}),
    ]
    assert all(c.parse_error is None for c in msg.tool_calls)
    assert msg.finish_reason == "tool_calls"


def test_malformed_tool_arguments_are_kept_with_a_parse_error(fake_server: Start) -> None:
    msg = ask(fake_server(Scripted([tool_call_reply([("python", '{"code": "print(1)"')])])))
    [call] = msg.tool_calls
    assert call.arguments == '{"code": "print(1)"'
    assert call.parse_error and "not valid JSON" in call.parse_error


def test_text_protocol_calls_are_detected_by_default(fake_server: Start) -> None:
    text = '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>'
    msg = ask(fake_server(Scripted([text_reply(text, reasoning="r", shape="inline")])))
    assert msg.tool_protocol == "hermes"
    assert msg.tool_calls[0].name == "python"
    assert msg.content == text  # the verbatim text stays in content


def test_429_retry_after_is_honoured(fake_server: Start) -> None:
    server = fake_server(Scripted([error_reply(429, "slow down", retry_after=0.4), text_reply("ok")]))
    started = time.monotonic()
    msg = ask(server)
    assert msg.content == "ok" and msg.attempts == 2
    assert time.monotonic() - started >= 0.4


def test_500_then_success(fake_server: Start) -> None:
    msg = ask(fake_server(Scripted([error_reply(500), error_reply(503), text_reply("ok")])))
    assert (msg.content, msg.attempts) == ("ok", 3)


def test_connection_dropped_mid_stream_is_retried(fake_server: Start) -> None:
    dropped = text_reply("never finished", reasoning="partial", pieces=5)
    dropped.drop_after = 3
    msg = ask(fake_server(Scripted([dropped, text_reply("ok")])))
    assert (msg.content, msg.attempts) == ("ok", 2)
    assert msg.reasoning is None  # nothing of the dropped attempt leaks into the reply


def test_slow_response_times_out_and_retries(fake_server: Start) -> None:
    slow = text_reply("late")
    slow.delay_s = 1.0
    msg = ask(fake_server(Scripted([slow, text_reply("fast")])), timeout_s=0.3)
    assert (msg.content, msg.attempts) == ("fast", 2)


def test_gives_up_after_max_attempts_with_status(fake_server: Start) -> None:
    server = fake_server(Scripted([], default=error_reply(500, "boom")))
    with pytest.raises(TeacherError) as info:
        ask(server, max_attempts=3)
    assert "after 3 attempts" in info.value.message and info.value.status == 500
    assert len(server.requests) == 3


def test_auth_error_is_not_retried_and_never_shows_the_key(fake_server: Start) -> None:
    server = fake_server(Scripted([error_reply(401, f"Incorrect API key provided: {SECRET}")]))
    with pytest.raises(TeacherError) as info:
        ask(server)
    assert len(server.requests) == 1
    assert SECRET not in info.value.message and "***" in info.value.message
    assert info.value.hint and "TRACEGEN_TEACHER_API_KEY" in info.value.hint
    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"  # it was sent, only to the server


def test_non_streaming_path_through_the_openai_sdk(fake_server: Start) -> None:
    server = fake_server(Scripted([tool_call_reply([("bash", '{"command": "pwd"}')], reasoning="think")]))
    msg = ask(server, stream=False)
    assert not server.requests[0].get("stream")
    assert msg.reasoning == "think" and msg.tool_calls[0].name == "bash"
    assert msg.usage.prompt_tokens == 60


def test_sampling_settings_reach_the_server(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply("ok")]))
    ask(server, temperature=0.3, top_p=0.5, max_tokens=77, seed=5, extra_body={"chat_template_kwargs": {"x": 1}})
    sent = server.requests[0]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["seed"]) == (0.3, 0.5, 77, 5)
    assert sent["chat_template_kwargs"] == {"x": 1}
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_requests_per_minute_limit_spaces_requests(fake_server: Start) -> None:
    server = fake_server(Scripted([], default=text_reply("ok")))
    config = TeacherConfig.model_validate({"base_url": server.base_url, "model": "m", "requests_per_minute": 600})

    async def go() -> float:
        client = ChatClient(config)
        started = time.monotonic()
        await asyncio.gather(*(client.complete(MESSAGES) for _ in range(5)))
        await client.aclose()
        return time.monotonic() - started

    assert asyncio.run(go()) >= 0.4  # 600/min = one request per 0.1 s: the 5th waits 0.4 s


def test_garbage_in_the_stream_is_retried(fake_server: Start) -> None:
    garbage = Reply(events=[{"delta": {"content": "x"}}, {"raw": '{"choices": [{"delta": {"content": "y"'}])
    msg = ask(fake_server(Scripted([garbage, text_reply("ok")])))
    assert (msg.content, msg.attempts) == ("ok", 2)
