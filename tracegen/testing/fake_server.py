"""A scriptable OpenAI-compatible chat-completions server on loopback, for tests and benchmarks.

It speaks real HTTP/1.1 (keep-alive, chunked Server-Sent Events), so a client under test runs its
production code path end to end. A *script* decides each reply from the request body:

- :class:`Scripted` plays a list of :class:`Reply` objects in order (one per request);
- :class:`ReactScript` plays a fixed ReAct episode: ``turns - 1`` tool calls, then an answer, with a
  fixed latency per response (the benchmark's teacher).

Scripts write chat-completions replies; a request to ``/responses`` or ``/messages`` gets the same reply
in that API's shape (streamed events or, without ``stream``, the whole object), so one script (the
benchmark's :class:`ReactScript` included) plays every API.

Reply builders cover what real servers do: reasoning as ``reasoning_content``, as ``reasoning`` or
inline ``<think>`` (with or without the opening tag), tool-call deltas split across chunks, parallel
calls, per-token top log-probs (sent only when the request asks for them), 429 with ``Retry-After``,
500, a connection dropped mid-stream, ``finish_reason=length`` and slow responses. Users can test
their own recipes against it::

    python -m tracegen.testing.fake_server --turns 4 --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Request = dict[str, Any]
Api = Literal["chat", "responses", "anthropic"]


@dataclass
class Reply:
    status: int = 200
    events: list[dict[str, Any]] = field(default_factory=list)
    """Stream deltas: each a ``choices[0]`` object (``delta`` and/or ``finish_reason``, optionally
    ``logprobs``, dropped unless the request has ``logprobs: true``), or ``{"raw": "..."}`` to send that
    text as the ``data:`` payload verbatim (garbage, errors)."""
    usage: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_body: Any = None
    """The whole JSON error body, when a provider's documented error shape matters (else built from ``error``)."""
    delay_s: float = 0.0
    """Wait before the response starts (a slow server, or time to first token)."""
    event_delay_s: float = 0.0
    """Wait between events."""
    drop_after: int | None = None
    """Close the connection after this many events, without ``[DONE]`` (a dropped stream)."""
    body: list[bytes] | None = None
    """Send these bytes as the 200 body instead of built events (chunked, ``event_delay_s`` apart):
    other line endings, HTML, a compressed body, keep-alive comments forever."""
    content_type: str = "text/event-stream"


Script = Callable[[Request], Reply]


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(pieces, 1)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _usage(prompt: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def token_logprob(token: str, top: int, logprob: float = -0.25) -> dict[str, Any]:
    """One ``logprobs.content`` entry: the token and ``top`` alternatives, the token itself first."""
    alternatives = [(token, logprob)] + [(f"<alt{j}>", -1.0 - j) for j in range(1, top)]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[:top]],
    }


def _event(delta: dict[str, Any], token: str, logprobs: int | None) -> dict[str, Any]:
    """A delta event; with ``logprobs``, ``token`` is its one token, with that many alternatives."""
    event: dict[str, Any] = {"delta": delta}
    if logprobs is not None:
        event["logprobs"] = {"content": [token_logprob(token, logprobs)]}
    return event


def text_reply(
    content: str,
    reasoning: str | None = None,
    shape: str = "reasoning_content",
    finish_reason: str = "stop",
    pieces: int = 3,
    logprobs: int | None = None,
    **kwargs: Any,
) -> Reply:
    """A streamed answer. ``shape``: reasoning_content | reasoning | inline | inline_open (no opening tag).

    ``logprobs``: give every streamed piece (reasoning and content) a log-prob entry with that many
    top alternatives, sent when the request asks for log-probs.
    """
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant"}}]
    if reasoning and shape in ("reasoning_content", "reasoning"):
        events += [_event({shape: part}, part, logprobs) for part in _split(reasoning, pieces)]
    elif reasoning and shape == "inline":
        content = f"<think>\n{reasoning}\n</think>\n\n{content}"
    elif reasoning and shape == "inline_open":
        content = f"{reasoning}\n</think>\n\n{content}"
    events += [_event({"content": part}, part, logprobs) for part in _split(content, pieces)]
    events.append({"delta": {}, "finish_reason": finish_reason})
    n = len((reasoning or "").split()) + len(content.split())
    return Reply(events=events, usage=_usage(50, n, len((reasoning or "").split())), **kwargs)


def tool_call_reply(
    calls: list[tuple[str, str]],
    reasoning: str | None = None,
    content: str = "",
    pieces: int = 3,
    logprobs: int | None = None,
    shape: str = "reasoning_content",
    **kwargs: Any,
) -> Reply:
    """Native tool calls (name, raw arguments JSON), each split into ``pieces`` argument deltas.

    ``logprobs`` as for :func:`text_reply`; each argument delta counts as one token. ``shape``: the
    reasoning field, or ``both`` (vLLM during its rename sends ``reasoning`` and ``reasoning_content``).
    """
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant"}}]
    if reasoning:
        fields = ("reasoning", "reasoning_content") if shape == "both" else (shape,)
        events += [_event(dict.fromkeys(fields, part), part, logprobs) for part in _split(reasoning, pieces)]
    if content:
        events.append(_event({"content": content}, content, logprobs))
    for index, (name, arguments) in enumerate(calls):
        head = {"index": index, "id": f"srv-call-{index}", "type": "function", "function": {"name": name}}
        events.append({"delta": {"tool_calls": [head]}})
        for part in _split(arguments, pieces):
            delta = {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
            events.append(_event(delta, part, logprobs))
    events.append({"delta": {}, "finish_reason": "tool_calls"})
    return Reply(events=events, usage=_usage(60, 20 + len((reasoning or "").split())), **kwargs)


def error_reply(status: int, message: str = "fake error", retry_after: float | None = None) -> Reply:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    return Reply(status=status, error=message, headers=headers)


# --- Provider shapes, from the providers' documented examples ------------------------------------


def unindexed_tool_call_reply(calls: list[tuple[str, str]], **kwargs: Any) -> Reply:
    """Tool-call deltas carrying an ``id`` but no ``index`` (some OpenAI-compatible servers)."""
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant"}}]
    for n, (name, arguments) in enumerate(calls):
        cid = f"srv-call-{n}"
        events.append({"delta": {"tool_calls": [{"id": cid, "type": "function", "function": {"name": name}}]}})
        events += [{"delta": {"tool_calls": [{"id": cid, "function": {"arguments": p}}]}} for p in _split(arguments, 2)]
    events.append({"delta": {}, "finish_reason": "tool_calls"})
    return Reply(events=events, usage=_usage(60, 20), **kwargs)


def refusal_reply(refusal: str, **kwargs: Any) -> Reply:
    """A streamed refusal (https://platform.openai.com/docs/guides/structured-outputs#refusals)."""
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": None, "refusal": ""}}]
    events += [{"delta": {"refusal": part}} for part in _split(refusal, 2)]
    events.append({"delta": {}, "finish_reason": "stop"})
    return Reply(events=events, usage=_usage(20, 5), **kwargs)


def mistral_thinking_reply(content: str, thinking: str, **kwargs: Any) -> Reply:
    """Magistral: ``content`` as a list of typed chunks, thinking chunks first
    (https://docs.mistral.ai/capabilities/reasoning/, "Usage" response example)."""
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": ""}}]
    for part in _split(thinking, 2):
        events.append({"delta": {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": part}]}]}})
    events += [{"delta": {"content": [{"type": "text", "text": part}]}} for part in _split(content, 2)]
    events.append({"delta": {}, "finish_reason": "stop"})
    return Reply(events=events, usage=_usage(30, 10), **kwargs)


def gemini_tool_call_reply(name: str, arguments: str, signature: str, **kwargs: Any) -> Reply:
    """Gemini's OpenAI-compatible endpoint: the call carries ``extra_content.google.thought_signature``
    (https://ai.google.dev/gemini-api/docs/thought-signatures, "OpenAI compatibility")."""
    call: dict[str, Any] = {
        "index": 0,
        "id": "function-call-1",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
        "extra_content": {"google": {"thought_signature": signature}},
    }
    events: list[dict[str, Any]] = [
        {"delta": {"role": "assistant", "tool_calls": [call]}},
        {"delta": {}, "finish_reason": "tool_calls"},
    ]
    return Reply(events=events, usage=_usage(40, 10), **kwargs)


def openrouter_reasoning_reply(name: str, arguments: str, thought: str, signature: str, **kwargs: Any) -> Reply:
    """OpenRouter: reasoning streamed as ``reasoning`` plus ``reasoning_details`` pieces, the signature on the
    last piece (https://openrouter.ai/docs/use-cases/reasoning-tokens, "Preserving reasoning blocks")."""
    events: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": ""}}]
    for part in _split(thought, 2):
        detail = {"type": "reasoning.text", "text": part, "format": "anthropic-claude-v1", "index": 0}
        events.append({"delta": {"reasoning": part, "reasoning_details": [detail]}})
    last = {"type": "reasoning.text", "signature": signature, "format": "anthropic-claude-v1", "index": 0}
    events.append({"delta": {"reasoning_details": [last]}})
    head = {"index": 0, "id": "toolu_01", "type": "function", "function": {"name": name, "arguments": arguments}}
    events += [{"delta": {"tool_calls": [head]}}, {"delta": {}, "finish_reason": "tool_calls"}]
    return Reply(events=events, usage=_usage(40, 10), **kwargs)


def responses_reply(
    text: str = "",
    reasoning: str | None = None,
    calls: list[tuple[str, str]] | None = None,
    encrypted: str = "sig-A",
    **kwargs: Any,
) -> Reply:
    """A streamed Responses API reply: a reasoning item (summary deltas, then the whole item with its
    ``encrypted_content``), text deltas, function calls with argument deltas, ``response.completed`` with
    usage (https://platform.openai.com/docs/api-reference/responses-streaming)."""
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}]
    if reasoning:
        events.append(
            {"type": "response.output_item.added", "item": {"type": "reasoning", "id": "rs_1", "summary": []}}
        )
        events += [
            {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "delta": part}
            for part in _split(reasoning, 2)
        ]
        item = {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": reasoning}],
            "encrypted_content": encrypted,
        }
        events.append({"type": "response.output_item.done", "item": item})
    if text:
        events += [{"type": "response.output_text.delta", "item_id": "msg_1", "delta": p} for p in _split(text, 3)]
    for n, (name, arguments) in enumerate(calls or []):
        item = {"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": name, "arguments": ""}
        events.append({"type": "response.output_item.added", "item": item})
        events += [
            {"type": "response.function_call_arguments.delta", "item_id": f"fc_{n}", "delta": p}
            for p in _split(arguments, 3)
        ]
        events.append({"type": "response.output_item.done", "item": {**item, "arguments": arguments}})
    usage = {"input_tokens": 50, "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 7}}
    events.append({"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "usage": usage}})
    body = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
    return Reply(body=body, **kwargs)


def anthropic_reply(
    text: str = "",
    thinking: str | None = None,
    calls: list[tuple[str, str]] | None = None,
    signature: str = "sig-A",
    redacted: bool = False,
    **kwargs: Any,
) -> Reply:
    """A streamed Messages API reply: a thinking block (``thinking_delta`` then ``signature_delta``), an
    optional ``redacted_thinking`` block, text deltas, ``tool_use`` blocks with ``input_json_delta``s,
    ``message_delta`` with the stop reason and usage (https://docs.anthropic.com/en/docs/build-with-claude/streaming,
    "Streaming request with extended thinking" and "with tool use")."""
    usage = {"input_tokens": 40, "output_tokens": 1}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "role": "assistant", "content": [], "usage": usage}}
    ]
    index = 0

    def block(start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        nonlocal index
        events.append({"type": "content_block_start", "index": index, "content_block": start})
        events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
        events.append({"type": "content_block_stop", "index": index})
        index += 1

    if thinking:
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _split(thinking, 2)]
        block({"type": "thinking", "thinking": ""}, [*deltas, {"type": "signature_delta", "signature": signature}])
    if redacted:
        block({"type": "redacted_thinking", "data": "opaque-redacted"}, [])
    if text:
        block({"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in _split(text, 3)])
    for n, (name, arguments) in enumerate(calls or []):
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in _split(arguments, 3)]
        block({"type": "tool_use", "id": f"toolu_{n}", "name": name, "input": {}}, deltas)
    stop = "tool_use" if calls else "end_turn"
    events.append({"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 30}})
    events.append({"type": "message_stop"})
    body = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
    return Reply(body=body, **kwargs)


def _anthropic_error(message: str) -> Reply:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return Reply(status=400, error=message, error_body=body)


def _openai_error(message: str, param: str, code: str) -> Reply:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return Reply(status=400, error=message, error_body=body)


class Provider:
    """A script behind a provider's request checks: a request the real provider refuses gets its
    documented 400 instead of the script's reply, so a test fails when parameters or echoes are wrong.

    - ``openai_reasoning``: o-series / gpt-5 refuse ``max_tokens`` and non-default sampling
      (https://platform.openai.com/docs/guides/reasoning; the error bodies are the API's).
    - ``gemini``: every earlier tool call must carry back the thought signature it was sent with
      (https://ai.google.dev/gemini-api/docs/thought-signatures: "missing thought_signature" 400).
    - ``openrouter``: an Anthropic model behind OpenRouter needs its ``reasoning_details`` (signature
      included) back on tool-use turns, else Anthropic's 400 passes through
      (https://openrouter.ai/docs/use-cases/reasoning-tokens).
    - ``openai_responses``: with ``store: false``, a ``function_call`` input item needs the reasoning
      item it came with (``encrypted_content`` included) before it, and every ``function_call_output``
      a matching call (https://platform.openai.com/docs/guides/reasoning#keeping-reasoning-items-in-context).
    - ``anthropic``: with thinking on, an assistant turn that used tools must start with its thinking
      block(s), unmodified (signature checked), before the ``tool_use`` blocks
      (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking#preserving-thinking-blocks).
    - ``vllm``: current vLLM reads earlier reasoning only from ``reasoning``; a tool-call turn echoed in
      another field reaches the chat template without it (https://docs.vllm.ai/en/latest/features/reasoning_outputs.html).
    """

    def __init__(self, name: str, script: Script, signature: str = "sig-A") -> None:
        self.name = name
        self.script = script
        self.signature = signature

    def __call__(self, request: Request) -> Reply:
        refused = getattr(self, f"_check_{self.name}")(request)
        return refused if refused is not None else self.script(request)

    def _assistant_calls(self, request: Request) -> list[tuple[int, dict[str, Any]]]:
        return [(i, m) for i, m in enumerate(request.get("messages", [])) if m.get("tool_calls")]

    def _check_openai_reasoning(self, request: Request) -> Reply | None:
        if "max_tokens" in request:
            return _openai_error(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "max_tokens",
                "unsupported_parameter",
            )
        for key in ("temperature", "top_p"):
            if key in request and request[key] != 1:
                return _openai_error(
                    f"Unsupported value: '{key}' does not support {request[key]} with this model. "
                    "Only the default (1) value is supported.",
                    key,
                    "unsupported_value",
                )
        return None

    def _check_gemini(self, request: Request) -> Reply | None:
        for index, message in self._assistant_calls(request):
            for call in message["tool_calls"]:
                google = (call.get("extra_content") or {}).get("google") or {}
                if google.get("thought_signature") != self.signature:
                    message_text = (
                        "Function call is missing a thought_signature in functionCall parts. This is required "
                        "for tools to work correctly, and missing thought_signature may lead to degraded model "
                        f"performance. Additional data, function call `default_api:{call['function']['name']}` , "
                        f"position {index}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures "
                        "for more details."
                    )
                    body = [{"error": {"code": 400, "message": message_text, "status": "INVALID_ARGUMENT"}}]
                    return Reply(status=400, error=message_text, error_body=body)
        return None

    def _check_openrouter(self, request: Request) -> Reply | None:
        for index, message in self._assistant_calls(request):
            details = message.get("reasoning_details") or []
            if not any(d.get("signature") == self.signature and d.get("text") for d in details):
                text = (
                    f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                    "`tool_use`. When `thinking` is enabled, a final `assistant` message must start with a "
                    "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
                )
                body = {"error": {"message": text, "code": 400}}
                return Reply(status=400, error=text, error_body=body)
        return None

    def _check_openai_responses(self, request: Request) -> Reply | None:
        items = request.get("input") or []
        calls = set()
        for n, item in enumerate(items):
            kind = item.get("type")
            if kind == "function_call":
                calls.add(item.get("call_id"))
                before = items[n - 1] if n else {}
                if before.get("type") not in ("reasoning", "function_call") or (
                    before.get("type") == "reasoning" and before.get("encrypted_content") != self.signature
                ):
                    message = (
                        f"Item of type 'function_call' (call_id {item.get('call_id')!r}) was provided without its "
                        "required 'reasoning' item."
                    )
                    return _openai_error(message, "input", "invalid_request_error")
            elif kind == "function_call_output" and item.get("call_id") not in calls:
                message = f"No tool call found for function call output with call_id {item.get('call_id')}."
                return _openai_error(message, "input", "invalid_request_error")
        return None

    def _check_anthropic(self, request: Request) -> Reply | None:
        if "max_tokens" not in request:
            return _anthropic_error("max_tokens: Field required")
        for index, message in enumerate(request.get("messages", [])):
            blocks = message.get("content")
            if message.get("role") != "assistant" or not isinstance(blocks, list):
                continue
            if not any(b.get("type") == "tool_use" for b in blocks):
                continue
            first = blocks[0]
            if first.get("type") not in ("thinking", "redacted_thinking"):
                return _anthropic_error(
                    f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                    f"`{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must start "
                    "with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
                )
            if first.get("type") == "thinking" and first.get("signature") != self.signature:
                return _anthropic_error(f"messages.{index}.content.0: Invalid `signature` in `thinking` block")
        return None

    def _check_vllm(self, request: Request) -> Reply | None:
        for index, message in self._assistant_calls(request):
            if not message.get("reasoning"):
                text = f"fake vllm: messages[{index}] is a tool-call turn whose reasoning is not in `reasoning`"
                return Reply(status=400, error=text)
        return None


class Scripted:
    """Replies in order; after the last one, ``default`` (or a plain answer) forever."""

    def __init__(self, replies: list[Reply], default: Reply | None = None) -> None:
        self.replies = list(replies)
        self.default = default or text_reply("done")
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        with self._lock:
            return self.replies.pop(0) if self.replies else self.default


class ReactScript:
    """A deterministic ReAct episode per trajectory: ``turns - 1`` python calls, then an answer.

    The turn is read off the request (assistant messages so far), so any number of concurrent
    trajectories can share the server. Requests without ``tools`` are tool simulations and get a
    simulated program output. Each response takes ``latency_s``: half before the first token, half
    streaming ``chunks`` deltas in two bursts.
    """

    def __init__(self, turns: int = 4, latency_s: float = 0.2, chunks: int = 16) -> None:
        self.turns = turns
        self.latency_s = latency_s
        self.chunks = chunks

    def __call__(self, request: Request) -> Reply:
        if not request.get("tools"):
            reply = text_reply("hello from the simulator\nEXIT_CODE: 0", pieces=2)
        else:
            turn = assistant_turns(request)
            thought = " ".join(["thinking"] * (self.chunks // 2))
            if turn < self.turns - 1:
                reply = tool_call_reply(
                    [("python", json.dumps({"code": f"print({turn} * 7)"}))], reasoning=thought, pieces=self.chunks // 4
                )
            else:
                reply = text_reply("The answer is 42.", reasoning=thought, pieces=self.chunks // 2)
        reply.delay_s = self.latency_s / 2
        reply.event_delay_s = -self.latency_s / 2  # negative: split the remaining latency into two bursts
        return reply


def assistant_turns(request: Request) -> int:
    """Assistant turns so far in a request of any API: chat and Anthropic ``messages``, or Responses
    ``input``, where one turn is a run of reasoning, assistant-message and function-call items."""
    if "input" not in request:
        return sum(1 for m in request.get("messages", []) if m.get("role") == "assistant")
    turns, previous = 0, False
    for item in request["input"]:
        mine = item.get("role") == "assistant" or item.get("type") in ("reasoning", "function_call")
        turns += mine and not previous
        previous = mine
    return turns


class FakeServer:
    """Run a script on 127.0.0.1 in a background thread: ``with FakeServer(script) as srv: srv.base_url``."""

    def __init__(
        self,
        script: Script,
        port: int = 0,
        record: bool = True,
        models: list[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        """``models``: what ``GET /models`` lists and the only names served (None: no ``/models``, any
        name served); ``api_key``: the one key accepted (None: any)."""
        self.script = script
        self.port = port
        self.gate = Gate(models, api_key)
        self.record = record
        self.requests: list[Request] = []
        self.headers: list[dict[str, str]] = []
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")

    def stop(self) -> None:
        if self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        server = self._server = loop.run_until_complete(
            serve(self.script, self.port, self._on_request, self._on_connect, self.gate)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0.01))  # let cancelled handlers close their sockets
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def _on_connect(self) -> None:
        self.connections += 1

    def _on_request(self, headers: dict[str, str], body: Request) -> None:
        if self.record:
            self.headers.append(headers)
            self.requests.append(body)


@dataclass
class Gate:
    """What an OpenAI-compatible server checks before generating, with OpenAI's documented answers
    (https://platform.openai.com/docs/guides/error-codes): the key (401), the model (404), the
    messages (400 for an empty list)."""

    models: list[str] | None = None
    api_key: str | None = None

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        refused = self._key(headers)
        if refused:
            return refused
        if self.models is None or not path.endswith("/models"):
            return 404, {"error": {"message": f"no route GET {path}", "type": "invalid_request_error"}}
        return 200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]}

    def check(self, request: Request, headers: dict[str, str]) -> tuple[int, Any] | None:
        refused = self._key(headers)
        if refused:
            return refused
        model = request.get("model")
        if self.models is not None and model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, {"error": {"message": message, "type": "invalid_request_error", "code": "model_not_found"}}
        if not request.get("messages", request.get("input")):
            message = "[] is too short - 'messages'"
            return 400, {"error": {"message": message, "type": "invalid_request_error", "param": "messages"}}
        return None

    def _key(self, headers: dict[str, str]) -> tuple[int, Any] | None:
        sent = headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is None or sent == self.api_key:
            return None
        masked = f"{sent[:3]}*****{sent[-4:]}"  # OpenAI shows a masked key, never the whole one
        message = f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."
        return 401, {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}}


async def serve(
    script: Script,
    port: int = 0,
    on_request: Callable[[dict[str, str], Request], None] | None = None,
    on_connect: Callable[[], None] | None = None,
    gate: Gate | None = None,
) -> asyncio.Server:
    checks = gate or Gate()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if on_connect:
            on_connect()
        try:
            while await _handle_one(reader, writer, script, on_request, checks):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)


async def _handle_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    script: Script,
    on_request: Callable[[dict[str, str], Request], None] | None,
    gate: Gate,
) -> bool:
    """Serve one request; False when the connection must close."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    body_bytes = await reader.readexactly(int(headers.get("content-length", "0")))
    if method == "GET":
        _write_json(writer, *gate.get(path, headers))
        return True
    if method != "POST" or not path.endswith(("/chat/completions", "/responses", "/messages")):
        _write_json(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        return True
    request = json.loads(body_bytes or b"{}")
    refused = gate.check(request, headers)
    if refused:
        _write_json(writer, *refused)
        return True
    if on_request:
        on_request(headers, request)
    reply = script(request)
    if reply.delay_s > 0:
        await asyncio.sleep(reply.delay_s)
    if reply.status != 200:
        body = reply.error_body or {"error": {"message": reply.error, "type": "fake"}}
        _write_json(writer, reply.status, body, reply.headers)
        return True
    if reply.body is not None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {reply.content_type}\r\n{extra}"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for data in reply.body:
            _write_chunk(writer, data)
            await writer.drain()
            if reply.event_delay_s:
                await asyncio.sleep(reply.event_delay_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    model = request.get("model", "fake")
    events = reply.events if request.get("logprobs") else [_without_logprobs(e) for e in reply.events]
    api: Api = "responses" if path.endswith("/responses") else "anthropic" if path.endswith("/messages") else "chat"
    if not request.get("stream"):
        whole = _completion(events, reply.usage, model)
        _write_json(
            writer,
            200,
            _responses_object(whole)
            if api == "responses"
            else _anthropic_object(whole)
            if api == "anthropic"
            else whole,
        )
        return True
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    frames = stream_frames(api, events, reply.usage, model, include_usage)
    if reply.event_delay_s < 0:
        # Two bursts separated by the given time: streamed, but cheap for the server to produce.
        half = len(frames) // 2
        _write_frames(writer, frames[:half])
        await writer.drain()
        await asyncio.sleep(-reply.event_delay_s)
        _write_frames(writer, frames[half:])
    else:
        for i, frame in enumerate(frames):
            if reply.drop_after is not None and i >= reply.drop_after:
                await writer.drain()
                writer.transport.abort()  # a dropped connection: no [DONE], no chunk terminator
                return False
            _write_frames(writer, [frame])
            if reply.event_delay_s:
                await writer.drain()
                await asyncio.sleep(reply.event_delay_s)
    if api == "chat":
        _write_chunk(writer, b"data: [DONE]\n\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


def _write_frames(writer: asyncio.StreamWriter, frames: list[bytes]) -> None:
    if frames:
        _write_chunk(writer, b"".join(frames))


def stream_frames(
    api: Api,
    events: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    model: str = "fake",
    include_usage: bool = True,
) -> list[bytes]:
    """``events`` (a script's chat deltas) as ``api`` streams them, one SSE frame each (without chat's ``[DONE]``)."""
    if api == "responses":
        return _named_frames(_responses_events(events, usage))
    if api == "anthropic":
        return _named_frames(_anthropic_events(events, usage))
    created = int(time.time())
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model}
    frames = [{**head, "choices": [{"index": 0, **event}]} for event in events]
    if include_usage and usage:
        frames.append({**head, "choices": [], "usage": usage})
    return [b"data: " + _payload(f).encode() + b"\n\n" for f in frames]


def stream_body(api: Api, reply: Reply) -> bytes:
    """The whole streamed body of ``reply`` in ``api``'s shape (chat's ``[DONE]`` included), for tests that
    alter the bytes (line endings, splits) and send them as ``Reply(body=...)``."""
    return b"".join(stream_frames(api, reply.events, reply.usage)) + (b"data: [DONE]\n\n" if api == "chat" else b"")


def mid_stream_error(api: Api, message: str) -> Reply:
    """A 200 stream that fails at its first event, in each API's documented error shape: a chat chunk holding
    ``error``; the Responses ``error`` event (https://platform.openai.com/docs/api-reference/responses-streaming/error);
    the Messages ``error`` event (https://docs.anthropic.com/en/docs/build-with-claude/streaming#error-events)."""
    if api == "responses":
        event: dict[str, Any] = {"type": "error", "code": "server_error", "message": message, "param": None}
    elif api == "anthropic":
        event = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    else:
        return Reply(body=[b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\n"])
    return Reply(body=_named_frames([event]))


def _payload(frame: dict[str, Any]) -> str:
    choices = frame.get("choices") or [{}]
    raw = choices[0].get("raw")
    return str(raw) if raw is not None else json.dumps(frame)


def _named_frames(events: list[dict[str, Any]]) -> list[bytes]:
    """Events as the Responses and Messages APIs stream them: an ``event:`` line naming the type, then the data."""
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]


SIGNATURE = "sig-A"
"""The opaque state (Responses ``encrypted_content``, Anthropic thinking ``signature``) a translated reply
carries; :class:`Provider` checks for the same default, so a translated conversation must echo it."""


def _thought(delta: dict[str, Any]) -> str:
    return str(delta.get("reasoning_content") or delta.get("reasoning") or "")


def _responses_events(events: list[dict[str, Any]], usage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Chat deltas as a Responses stream (https://platform.openai.com/docs/api-reference/responses-streaming):
    the reasoning as one reasoning item (summary deltas, then the whole item with ``encrypted_content``),
    text deltas, function-call items with argument deltas, then ``response.completed`` (or
    ``response.incomplete`` for ``finish_reason: length``) with usage."""
    out: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": "resp_fake", "status": "in_progress"}}]
    thought: list[str] = []
    closed = False

    def close_reasoning() -> None:
        nonlocal closed
        if thought and not closed:
            closed = True
            out.append({"type": "response.output_item.done", "item": _reasoning_item("".join(thought))})

    finish = None
    for event in events:
        delta = event.get("delta") or {}
        if _thought(delta):
            if not thought:
                item = {"type": "reasoning", "id": "rs_0", "summary": []}
                out.append({"type": "response.output_item.added", "item": item})
                out.append({"type": "response.reasoning_summary_part.added", "item_id": "rs_0", "summary_index": 0})
            thought.append(_thought(delta))
            out.append({"type": "response.reasoning_summary_text.delta", "item_id": "rs_0", "delta": thought[-1]})
        if delta.get("content"):
            close_reasoning()
            out.append({"type": "response.output_text.delta", "item_id": "msg_0", "delta": delta["content"]})
        for call in delta.get("tool_calls") or []:
            close_reasoning()
            fn, item_id = call.get("function") or {}, f"fc_{call.get('index', 0)}"
            if call.get("id"):
                item = {"type": "function_call", "id": item_id, "call_id": call["id"], "name": fn.get("name", "")}
                out.append({"type": "response.output_item.added", "item": {**item, "arguments": ""}})
            if fn.get("arguments"):
                out.append(
                    {"type": "response.function_call_arguments.delta", "item_id": item_id, "delta": fn["arguments"]}
                )
        finish = event.get("finish_reason") or finish
    close_reasoning()
    response: dict[str, Any] = {"id": "resp_fake", "usage": _responses_usage(usage)}
    if finish == "length":
        details = {"reason": "max_output_tokens"}
        out.append(
            {
                "type": "response.incomplete",
                "response": {**response, "status": "incomplete", "incomplete_details": details},
            }
        )
    else:
        out.append({"type": "response.completed", "response": {**response, "status": "completed"}})
    return out


def _reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": "rs_0",
        "summary": [{"type": "summary_text", "text": text}],
        "encrypted_content": SIGNATURE,
    }


def _responses_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }


_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def _anthropic_events(events: list[dict[str, Any]], usage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Chat deltas as a Messages stream (https://docs.anthropic.com/en/docs/build-with-claude/streaming): a
    thinking block (``thinking_delta``s, then a ``signature_delta``), a text block, ``tool_use`` blocks with
    ``input_json_delta``s, then ``message_delta`` with the stop reason and usage, and ``message_stop``."""
    usage = usage or {}
    start: dict[str, Any] = {"id": "msg_fake", "type": "message", "role": "assistant", "content": []}
    start["usage"] = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": 1}
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    index, kind = -1, None

    def block(new_kind: str, content_block: dict[str, Any]) -> None:
        nonlocal index, kind
        close()
        index, kind = index + 1, new_kind
        out.append({"type": "content_block_start", "index": index, "content_block": content_block})

    def close() -> None:
        if kind == "thinking":
            out.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "signature_delta", "signature": SIGNATURE},
                }
            )
        if kind is not None:
            out.append({"type": "content_block_stop", "index": index})

    finish = None
    for event in events:
        delta = event.get("delta") or {}
        if _thought(delta):
            if kind != "thinking":
                block("thinking", {"type": "thinking", "thinking": ""})
            out.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "thinking_delta", "thinking": _thought(delta)},
                }
            )
        if delta.get("content"):
            if kind != "text":
                block("text", {"type": "text", "text": ""})
            out.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": delta["content"]},
                }
            )
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            if call.get("id"):
                block("tool_use", {"type": "tool_use", "id": call["id"], "name": fn.get("name", ""), "input": {}})
            if fn.get("arguments"):
                json_delta = {"type": "input_json_delta", "partial_json": fn["arguments"]}
                out.append({"type": "content_block_delta", "index": index, "delta": json_delta})
        finish = event.get("finish_reason") or finish
    close()
    stop = {"stop_reason": _STOP_REASONS.get(finish or "stop", "end_turn"), "stop_sequence": None}
    out.append({"type": "message_delta", "delta": stop, "usage": {"output_tokens": usage.get("completion_tokens", 0)}})
    out.append({"type": "message_stop"})
    return out


def _responses_object(whole: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as the Responses API's non-streamed response object."""
    choice, usage = whole["choices"][0], whole.get("usage")
    message = choice["message"]
    output: list[dict[str, Any]] = []
    if _thought(message):
        output.append(_reasoning_item(_thought(message)))
    if message.get("content"):
        text = {"type": "output_text", "text": message["content"], "annotations": []}
        output.append({"type": "message", "id": "msg_0", "role": "assistant", "status": "completed", "content": [text]})
    for n, call in enumerate(message.get("tool_calls") or []):
        fn = call["function"]
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{n}",
                "call_id": call["id"],
                "name": fn["name"],
                "arguments": fn["arguments"],
            }
        )
    cut = choice.get("finish_reason") == "length"
    return {
        "id": "resp_fake",
        "object": "response",
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": output,
        "usage": _responses_usage(usage),
    }


def _anthropic_object(whole: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as the Messages API's non-streamed message."""
    choice, usage = whole["choices"][0], whole.get("usage") or {}
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if _thought(message):
        content.append({"type": "thinking", "thinking": _thought(message), "signature": SIGNATURE})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        content.append(
            {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": json.loads(fn["arguments"] or "{}")}
        )
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
        "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)},
    }


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _write_json(writer: asyncio.StreamWriter, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(data).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    writer.write(head.encode() + body)


def _without_logprobs(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "logprobs"} if "logprobs" in event else event


def _completion(events: list[dict[str, Any]], usage: dict[str, Any] | None, model: str) -> dict[str, Any]:
    """A non-streamed completion equivalent to the events: one log-prob list for all of them."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    calls: dict[int, dict[str, Any]] = {}
    logprobs: list[Any] = []
    finish = None
    for event in events:
        logprobs += (event.get("logprobs") or {}).get("content") or []
        delta = event.get("delta", {})
        for key in ("content", "reasoning_content", "reasoning"):
            if delta.get(key):
                message[key] = (message.get(key) or "") + delta[key]
        for call in delta.get("tool_calls", []):
            slot = calls.setdefault(
                call["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            slot["id"] = call.get("id") or slot["id"]
            fn = call.get("function", {})
            slot["function"]["name"] += fn.get("name", "")
            slot["function"]["arguments"] += fn.get("arguments", "")
        finish = event.get("finish_reason") or finish
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
            }
        ],
        "usage": usage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A fake OpenAI-compatible chat-completions server on 127.0.0.1 (streaming SSE or plain JSON) "
        "that plays the same ReAct episode for every trajectory: each of the first TURNS-1 replies carries "
        "reasoning and one `python` tool call (print(...)), the last reply is the answer 'The answer is 42.'. "
        "Requests that carry no tools (a simulator's) get a plain tool-output reply. It prints its base URL; "
        "point `tracegen collect --teacher-base-url` (and the simulator) at it to test a recipe without a model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--turns", type=int, default=4, help="teacher replies per trajectory: TURNS-1 tool calls, then the answer"
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.2,
        help="seconds per response: half before the first token, half over the deltas",
    )
    parser.add_argument("--chunks", type=int, default=16, help="stream deltas per response")
    args = parser.parse_args()

    async def run() -> None:
        server = await serve(ReactScript(args.turns, args.latency, args.chunks), args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}/v1", flush=True)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
