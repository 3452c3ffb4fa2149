"""The client and the run against hostile or broken servers, over loopback HTTP: preflight, secrets in
server text, replies no record can hold, deadlines, and SSE as the spec allows it."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.client.chat import ChatClient
from tracegen.collect.driver import run_collect
from tracegen.config import CollectConfig, TeacherConfig
from tracegen.errors import DeadlineError, TeacherError
from tracegen.records import AssistantMessage, Trajectory
from tracegen.testing.fake_server import (
    Api,
    FakeServer,
    ReactScript,
    Reply,
    Scripted,
    error_reply,
    mid_stream_error,
    stream_body,
    text_reply,
)

from .conftest import SECRET, make_config

Start = Callable[..., FakeServer]
MESSAGES = [{"role": "user", "content": "hi"}]
APIS: list[Api] = ["chat", "responses", "anthropic"]  # the hostile-byte tests run through each API's event handler


def client_for(base_url: str, **cfg: Any) -> TeacherConfig:
    return TeacherConfig.model_validate(
        {"base_url": base_url, "model": "m", "backoff_base_s": 0.01, "backoff_max_s": 0.05, **cfg}
    )


def run(config: TeacherConfig, call: str = "complete") -> Any:
    async def go() -> Any:
        client = ChatClient(config)
        try:
            return await (client.preflight() if call == "preflight" else client.complete(MESSAGES))
        finally:
            await client.aclose()

    return asyncio.run(go())


def collect_one(tmp_path: Path, config: CollectConfig) -> Trajectory:
    run_collect(config, tmp_path / "run", show_progress=False)
    [line] = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    return Trajectory.model_validate_json(line)


def one_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t0", "prompt": "hi"}) + "\n")
    return tasks


# --- 9. preflight, OPENAI_BASE_URL ----------------------------------------------------------------


def test_preflight_refused_connection_fails_in_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(TeacherError, match=r"cannot reach teacher m@127\.0\.0\.1:9") as info:
        run(client_for("http://127.0.0.1:9/v1"), "preflight")
    assert time.monotonic() - started < 5 and "base_url" in (info.value.hint or "")


def test_preflight_bad_key_is_401_without_the_key(fake_server: Start) -> None:
    server = fake_server(Scripted([]), api_key="the-right-key")
    with pytest.raises(TeacherError) as info:
        run(client_for(server.base_url), "preflight")
    assert info.value.status == 401 and SECRET not in info.value.message
    assert "TRACEGEN_TEACHER_API_KEY" in (info.value.hint or "")


def test_preflight_unknown_model_lists_what_the_server_offers(fake_server: Start) -> None:
    server = fake_server(Scripted([]), models=["qwen3-8b", "llama-3.1-8b"])
    with pytest.raises(TeacherError, match=re.escape("does not offer model 'm'; it offers: qwen3-8b, llama-3.1-8b")):
        run(client_for(server.base_url), "preflight")
    run(client_for(server.base_url, model="qwen3-8b"), "preflight")  # a listed one passes


def test_preflight_without_models_route_probes_without_generating(fake_server: Start) -> None:
    server = fake_server(Scripted([]), api_key="the-right-key")  # no /models (404)
    with pytest.raises(TeacherError) as info:
        run(client_for(server.base_url), "preflight")
    assert info.value.status == 401 and server.requests == []  # the probe generated nothing


def test_collect_stops_at_the_preflight_before_writing(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(Scripted([]), models=["other"])
    with pytest.raises(TeacherError, match="does not offer model"):
        run_collect(make_config(server.base_url, one_task(tmp_path)), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "trajectories.jsonl").exists() and server.requests == []


def test_openai_base_url_is_honoured(fake_server: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake_server(Scripted([text_reply("from env")]))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    reply = run(TeacherConfig.model_validate({"model": "m"}))
    assert reply.content == "from env"


# --- 10. secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_key_in_a_mid_stream_error_never_reaches_the_record(fake_server: Start, tmp_path: Path, api: Api) -> None:
    server = fake_server(Scripted([mid_stream_error(api, "upstream said: " + "x" * 250 + f" key={SECRET}")]))
    config = make_config(server.base_url, one_task(tmp_path), teacher={"max_attempts": 1, "api": api})
    trajectory = collect_one(tmp_path, config)
    assert trajectory.stop_reason == "error" and "***" in trajectory.errors[0].message
    assert SECRET[:8] not in (tmp_path / "run" / "trajectories.jsonl").read_text()


def test_simulator_on_another_host_gets_no_teacher_key(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.0))
    other_host = server.base_url.replace("127.0.0.1", "localhost")
    config = make_config(server.base_url, one_task(tmp_path), simulator={"base_url": other_host})
    assert collect_one(tmp_path, config).stop_reason == "answer"
    sent = {
        (bool(body.get("tools")), h["authorization"]) for body, h in zip(server.requests, server.headers, strict=True)
    }
    assert sent == {(True, f"Bearer {SECRET}"), (False, "Bearer EMPTY")}
    told = make_config(server.base_url, one_task(tmp_path), simulator={"base_url": other_host, "api_key_env": "K"})
    assert told.simulator_endpoint().api_key_env == "K"  # unless the recipe says so


# --- 11. one bad reply never ends the run --------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_surrogate_pair_split_across_deltas_is_joined(fake_server: Start, tmp_path: Path, api: Api) -> None:
    # Each delta JSON-escaped on its own (as a server splitting UTF-16 does): "\ud83d" in one, "\ude00" in the next.
    events = [{"delta": {"content": "smile \ud83d"}}, {"delta": {"content": "\ude00"}}, {"finish_reason": "stop"}]
    assert b"\\ud83d" in stream_body(api, Reply(events=events))
    server = fake_server(Scripted([Reply(events=events)]))
    trajectory = collect_one(tmp_path, make_config(server.base_url, one_task(tmp_path), teacher={"api": api}))
    assert trajectory.final_answer == "smile \U0001f600"


def test_a_trajectory_no_record_can_hold_is_recorded_as_an_error(fake_server: Start, tmp_path: Path) -> None:
    bad = Reply(events=[{"raw": '{"error": {"message": "lone \\ud800 surrogate"}}'}])
    server = fake_server(Scripted([bad], default=text_reply("fine")))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "prompt": "hi"}) + "\n" for i in range(2)))
    config = make_config(server.base_url, tasks, teacher={"max_attempts": 1}, concurrency=1)
    summary = run_collect(config, tmp_path / "run", show_progress=False)
    assert summary.completed == 2 and not summary.interrupted
    lines = [
        Trajectory.model_validate_json(x) for x in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    ]
    assert sorted(t.stop_reason for t in lines) == ["answer", "error"]
    again = run_collect(config, tmp_path / "run", show_progress=False)  # a resume does not crash either
    assert again.already_done == 2


# --- 12. deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("trickle", ["keep-alive", "tokens"])
def test_a_stream_that_never_ends_hits_the_request_deadline(fake_server: Start, api: Api, trickle: str) -> None:
    if trickle == "keep-alive":
        forever = Reply(body=[b": keep-alive\n\n"] * 2000, event_delay_s=0.01)
    else:  # a token every 10 ms, for 20 s: each read is quick, the whole is not
        forever = Reply(events=[{"delta": {"content": "x"}}] * 2000, event_delay_s=0.01)
    server = fake_server(Scripted([forever]))
    started = time.monotonic()
    with pytest.raises(DeadlineError, match=r"deadline of 0\.5 s"):
        run(client_for(server.base_url, request_timeout_s=0.5, timeout_s=5, api=api))
    assert time.monotonic() - started < 3 and len(server.requests) == 1  # not retried


def test_request_deadline_defaults_from_max_tokens() -> None:
    assert client_for("http://x/v1", max_tokens=1000, timeout_s=60).request_deadline_s() == 160
    assert client_for("http://x/v1", max_tokens=None).request_deadline_s() == 3600
    # never shorter than the silence a reply may start with (a request queued on a busy local server)
    assert client_for("http://x/v1", max_tokens=48).request_deadline_s() == 604.8


def test_retry_after_infinity_is_capped(fake_server: Start) -> None:
    server = fake_server(Scripted([error_reply(429, retry_after=float("inf")), text_reply("ok")]))
    started = time.monotonic()
    reply = run(client_for(server.base_url, retry_after_max_s=0.1))
    assert reply.content == "ok" and time.monotonic() - started < 3


def test_trajectory_wall_clock_budget(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=8, latency_s=0.2))
    config = make_config(server.base_url, one_task(tmp_path), trajectory_timeout_s=0.5, max_turns=8)
    trajectory = collect_one(tmp_path, config)
    assert trajectory.stop_reason == "time_budget" and trajectory.errors[0].kind == "budget"


# --- 13. SSE as specified -------------------------------------------------------------------------

CHUNK = {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}]}
HEL = json.dumps({"choices": [{"index": 0, "delta": {"content": "hel"}}]})
LO = json.dumps({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]})


@pytest.mark.parametrize(
    "body",
    [
        [f"data: {HEL}\r".encode(), f"\n\rdata: {LO}\r\r".encode()],  # a CRLF split across chunks, then CR
        [b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "hello"}, "finish_reason": "stop"}]}\n\n'],
        [
            b"event: message\nid: 1\n: comment\ndata:"
            + HEL.replace(", ", ",\ndata:", 1).encode()
            + b"\n\n"
            + f"data: {LO}".encode()
        ],  # fields, no space after the colon, no blank line after the last event
    ],
    ids=["crlf-split-then-cr", "multi-line-data", "fields-and-multi-line-no-final-blank"],
)
def test_valid_sse_variants_are_read(fake_server: Start, body: list[bytes]) -> None:
    server = fake_server(Scripted([Reply(body=body)]))
    reply: AssistantMessage = run(client_for(server.base_url))
    assert (reply.content, reply.finish_reason) == ("hello", "stop")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("ending", [b"\r", b"\r\n"], ids=["cr", "crlf"])
def test_other_line_endings_on_every_api(fake_server: Start, api: Api, ending: bytes) -> None:
    body = stream_body(api, text_reply("hello", reasoning="think"))
    server = fake_server(Scripted([Reply(body=[body.replace(b"\n", ending)])]))
    reply: AssistantMessage = run(client_for(server.base_url, api=api))
    assert (reply.content, reply.reasoning, reply.finish_reason) == ("hello", "think", "stop")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (Reply(body=[b"<!DOCTYPE html><html>Login</html>"], content_type="text/html"), "text/html"),
        (
            Reply(body=[gzip.compress(b"data: [DONE]\n\n")], headers={"Content-Encoding": "gzip"}, content_type="x"),
            "compressed body (Content-Encoding: gzip",
        ),
    ],
    ids=["html", "gzip"],
)
def test_a_200_that_is_not_sse_is_named(fake_server: Start, reply: Reply, named: str, api: Api) -> None:
    server = fake_server(Scripted([reply]))
    with pytest.raises(TeacherError, match="not") as info:
        run(client_for(server.base_url, api=api))
    assert named in info.value.message and "dropped" not in info.value.message
    assert len(server.requests) == 1


def test_line_buffer_is_linear_in_the_bytes(fake_server: Start) -> None:
    text = "x" * (8 << 20)
    line = f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': text}, 'finish_reason': 'stop'}]})}"
    data = line.encode()
    body = [data[i : i + 8192] for i in range(0, len(data), 8192)] + [b"\n\ndata: [DONE]\n\n"]
    server = fake_server(Scripted([Reply(body=body)]))
    started = time.thread_time()  # this thread's CPU: the client, not the server's thread
    reply = run(client_for(server.base_url))
    assert len(reply.content) == len(text)
    assert time.thread_time() - started < 1.0  # quadratic joining copies ~4 GB here


@pytest.mark.parametrize(
    ("api", "path"), [("chat", "/v1/chat/completions"), ("responses", "/v1/responses"), ("anthropic", "/v1/messages")]
)
def test_preflight_probe_goes_to_the_endpoint_of_the_teachers_api(api: str, path: str) -> None:
    """Where ``/models`` is absent, the probe asks the API the teacher speaks (an Anthropic-compatible
    endpoint serves no /chat/completions): a server that knows only that route answers 401 for the key."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = head.decode("latin-1").split(" ", 2)[:2]
        length = next(
            (int(h.split(":")[1]) for h in head.decode().split("\r\n") if h.lower().startswith("content-length")), 0
        )
        await reader.readexactly(length)
        seen.append(f"{method} {target}")
        status = "401 Unauthorized" if (method, target) == ("POST", path) else "404 Not Found"
        body = b'{"error": {"message": "bad key", "type": "authentication_error"}}'
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ChatClient(client_for(f"http://127.0.0.1:{port}/v1", api=api))
        try:
            with pytest.raises(TeacherError) as info:
                await client.preflight()
            assert info.value.status == 401
        finally:
            await client.aclose()
            server.close()

    asyncio.run(go())
    assert seen == ["GET /v1/models", f"POST {path}"]
