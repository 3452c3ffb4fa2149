"""The teacher's per-token top log-probs (``teacher.top_logprobs``), over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tracegen.client.chat import LOGPROB_FLOOR
from tracegen.collect.driver import run_collect
from tracegen.config import TeacherConfig
from tracegen.records import AssistantMessage, TokenLogprob, Trajectory
from tracegen.store import read_trajectories
from tracegen.testing.fake_server import FakeServer, Reply, Scripted, text_reply, token_logprob, tool_call_reply

from .conftest import make_config, write_tasks
from .test_teacher import ask

Start = Callable[[Any], FakeServer]
REASONING = "deux plus deux, ça fait quatre"  # non-ASCII: the bytes must join back too
CONTENT = "The answer is 4 ✓."


def text(tokens: list[TokenLogprob] | None) -> str:
    """The tokens joined back by their bytes (checking the token strings agree)."""
    assert tokens is not None
    joined = b"".join(bytes(t.bytes or b"") for t in tokens).decode()
    assert joined == "".join(t.token for t in tokens)
    return joined


def test_request_carries_logprobs_only_when_configured(fake_server: Start) -> None:
    server = fake_server(Scripted([], default=text_reply("ok", logprobs=3)))
    ask(server)
    ask(server, top_logprobs=3)
    plain, asked = server.requests
    assert "logprobs" not in plain and "top_logprobs" not in plain
    assert (asked["logprobs"], asked["top_logprobs"]) == (True, 3)


def test_without_the_setting_nothing_is_stored(fake_server: Start) -> None:
    msg = ask(fake_server(Scripted([text_reply(CONTENT, reasoning=REASONING, logprobs=3)])))
    assert (msg.reasoning, msg.content) == (REASONING, CONTENT)
    assert msg.reasoning_logprobs is None and msg.content_logprobs is None


@pytest.mark.parametrize("shape", ["reasoning_content", "reasoning"])
def test_tokens_per_channel_join_back_to_reasoning_and_content(fake_server: Start, shape: str) -> None:
    reply = text_reply(CONTENT, reasoning=REASONING, shape=shape, pieces=5, logprobs=4)
    msg = ask(fake_server(Scripted([reply])), top_logprobs=4)
    assert text(msg.reasoning_logprobs) == msg.reasoning == REASONING
    assert text(msg.content_logprobs) == msg.content == CONTENT
    tokens = (msg.reasoning_logprobs or []) + (msg.content_logprobs or [])
    assert len(tokens) == 10
    for t in tokens:
        assert len(t.top) == 4 and t.top[0].token == t.token and t.top[0].logprob == t.logprob == -0.25
        assert [alt.logprob for alt in t.top[1:]] == [-2.0, -3.0, -4.0]


def test_inline_think_and_text_calls_keep_the_raw_content_tokens(fake_server: Start) -> None:
    call = '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>'
    msg = ask(fake_server(Scripted([text_reply(call, reasoning="r", shape="inline", logprobs=2)])), top_logprobs=2)
    assert (msg.reasoning, msg.content, msg.tool_protocol) == ("r", call, "hermes")
    assert msg.reasoning_logprobs is None  # the reasoning arrived as content: its tokens are content tokens
    assert text(msg.content_logprobs) == f"<think>\nr\n</think>\n\n{call}"


def test_native_tool_call_tokens_are_content_tokens(fake_server: Start) -> None:
    arguments = json.dumps({"code": "print(6 * 7)"})
    reply = tool_call_reply([("python", arguments)], reasoning="use python", pieces=3, logprobs=1)
    msg = ask(fake_server(Scripted([reply])), top_logprobs=1)
    assert msg.tool_calls[0].arguments == arguments and msg.content == ""
    assert text(msg.reasoning_logprobs) == "use python"
    assert text(msg.content_logprobs) == arguments  # the fake sends each argument delta as one token


def test_reasoning_chunks_without_logprobs_store_nothing_for_them(fake_server: Start) -> None:
    reply = text_reply(CONTENT, reasoning=REASONING, logprobs=2)
    for event in reply.events:  # SGLang: ``logprobs: null`` on reasoning chunks
        if "reasoning_content" in event["delta"]:
            event["logprobs"] = None
    msg = ask(fake_server(Scripted([reply])), top_logprobs=2)
    assert msg.reasoning == REASONING and msg.reasoning_logprobs is None
    assert text(msg.content_logprobs) == CONTENT


def test_malformed_entries_are_skipped_and_the_turn_survives(fake_server: Start) -> None:
    good = token_logprob("ok", 2)
    bad_entries: list[Any] = [
        {"token": "x"},  # no logprob
        {"token": "x", "logprob": "very likely", "top_logprobs": []},
        {**good, "top_logprobs": [{"token": "y"}]},  # an alternative without a logprob
        {**good, "top_logprobs": "garbage"},
        {**good, "bytes": "not a list"},
        "garbage",
        None,
    ]
    events: list[dict[str, Any]] = [
        {"delta": {"content": "o"}, "logprobs": {"content": [*bad_entries[:4], good]}},
        {"delta": {"content": "k"}, "logprobs": {"content": bad_entries[4:]}},
        {"delta": {"content": "!"}, "logprobs": {"content": "garbage"}},
        {"delta": {"content": "!"}, "logprobs": ["garbage"]},
        {"delta": {}, "finish_reason": "stop"},
    ]
    msg = ask(fake_server(Scripted([Reply(events=events)])), top_logprobs=2)
    assert (msg.content, msg.attempts, msg.finish_reason) == ("ok!!", 1, "stop")
    [kept] = msg.content_logprobs or []
    assert text([kept]) == "ok" and [t.token for t in kept.top] == ["ok", "<alt1>"]
    assert msg.reasoning_logprobs is None


def test_non_finite_log_probs_keep_the_token_and_drop_the_alternative(fake_server: Start) -> None:
    """-Infinity cannot live in a JSON record; the sampled token must stay, or the tokens no longer join
    back into the text (and the API-logprob cache could not align that message)."""
    entry = {**token_logprob("ok", 2), "logprob": float("-inf")}
    entry["top_logprobs"] = [*entry["top_logprobs"], {"token": "z", "logprob": float("-inf"), "bytes": [122]}]
    events: list[dict[str, Any]] = [
        {"delta": {"content": "ok"}, "logprobs": {"content": [entry]}},
        {"delta": {}, "finish_reason": "stop"},
    ]
    msg = ask(fake_server(Scripted([Reply(events=events)])), top_logprobs=2)
    [kept] = msg.content_logprobs or []
    assert kept.logprob == LOGPROB_FLOOR and [t.token for t in kept.top] == ["ok", "<alt1>"]
    assert AssistantMessage.model_validate_json(msg.model_dump_json()) == msg


def test_non_streaming_reply_keeps_one_list_as_content_tokens(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply(CONTENT, reasoning=REASONING, logprobs=3)]))
    msg = ask(server, stream=False, top_logprobs=3)
    sent = server.requests[0]
    assert not sent.get("stream") and (sent["logprobs"], sent["top_logprobs"]) == (True, 3)
    assert (msg.reasoning, msg.content) == (REASONING, CONTENT)
    assert msg.reasoning_logprobs is None
    assert text(msg.content_logprobs) == REASONING + CONTENT  # the server's one list: reasoning, then content
    assert all(len(t.top) == 3 for t in msg.content_logprobs or [])


def test_collected_trajectories_hold_the_logprobs_and_round_trip(fake_server: Start, tmp_path: Path) -> None:
    arguments = json.dumps({"code": "print(2 + 2)"})

    def script(request: dict[str, Any]) -> Reply:
        if not request.get("tools"):
            return text_reply("4\nEXIT_CODE: 0", logprobs=5)  # the tool simulator
        if any(m["role"] == "tool" for m in request["messages"]):
            return text_reply(CONTENT, reasoning=REASONING, logprobs=5)
        return tool_call_reply([("python", arguments)], reasoning="compute it", logprobs=5)

    server = fake_server(script)
    config = make_config(server.base_url, write_tasks(tmp_path / "tasks.jsonl", 1), teacher={"top_logprobs": 5})
    run_collect(config, tmp_path / "run", show_progress=False)
    assert all(bool(r.get("logprobs")) == bool(r.get("tools")) for r in server.requests)  # not the simulator
    [traj] = read_trajectories(tmp_path / "run" / "trajectories.jsonl")
    call, answer = [m for m in traj.messages if isinstance(m, AssistantMessage)]
    assert text(call.reasoning_logprobs) == "compute it" and text(call.content_logprobs) == arguments
    assert text(answer.reasoning_logprobs) == REASONING and text(answer.content_logprobs) == CONTENT
    assert all(len(t.top) == 5 for t in answer.content_logprobs or [])
    assert Trajectory.model_validate_json(traj.model_dump_json()) == traj


def test_old_records_load_unchanged_and_the_setting_is_bounded_and_not_fingerprinted(tmp_path: Path) -> None:
    old = AssistantMessage.model_validate_json('{"role": "assistant", "content": "hi"}')
    assert old.reasoning_logprobs is None and old.content_logprobs is None
    assert AssistantMessage.model_validate_json(old.model_dump_json()) == old
    with pytest.raises(ValidationError):
        TeacherConfig(top_logprobs=21)
    tasks = write_tasks(tmp_path / "tasks.jsonl", 1)
    plain = make_config("http://127.0.0.1:1/v1", tasks)
    asked = make_config("http://127.0.0.1:1/v1", tasks, teacher={"top_logprobs": 20})
    assert plain.fingerprint() == asked.fingerprint()  # asking for log-probs does not change the samples
