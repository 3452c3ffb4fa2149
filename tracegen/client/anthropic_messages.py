"""The Anthropic Messages API (``teacher.api: anthropic``): request body out, streamed events in.

Also what DeepSeek, Kimi, GLM and MiniMax expose as Anthropic-compatible endpoints of their thinking
models. The chat client keeps its retry, rate-limit, pool and SSE layers; this module only translates.
From the chat-shaped ``messages`` (:mod:`tracegen.client.wire`): system turns become ``system``, an
assistant turn becomes its thinking blocks (echoed unmodified, ``signature`` and ``redacted_thinking``
included, as the API requires on tool-use turns), its text and its ``tool_use`` blocks, and tool turns
become ``tool_result`` blocks of the next user turn. Streamed events
(https://docs.anthropic.com/en/docs/build-with-claude/streaming) fold into the same ``RawReply`` as
chat deltas, so the record is the same ``AssistantMessage`` whichever API produced it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tracegen.client.wire import REASONING_ITEMS, loads
from tracegen.errors import RetryableTeacherError

if TYPE_CHECKING:
    from tracegen.client.chat import RawReply

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # the API requires max_tokens
NOT_SENT = ("reasoning_effort", "seed")
"""Settings the Messages API has no field for: never sent, so a record must not claim them."""
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def max_tokens_sent(max_tokens: int | None, max_completion_tokens: int | None) -> int:
    """The Messages API's required ``max_tokens``: the completion limit set, else the default."""
    return max_completion_tokens or max_tokens or DEFAULT_MAX_TOKENS


def sampling_sent(max_tokens: int | None, max_completion_tokens: int | None) -> dict[str, Any]:
    """How a record's sampling settings differ for this API: its one limit as sent (the default
    included), and no field the API has no place for."""
    return {
        **dict.fromkeys(NOT_SENT),
        "max_tokens": max_tokens_sent(max_tokens, max_completion_tokens),
        "max_completion_tokens": None,
    }


def anthropic_body(chat: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    """A chat-completions request body -> the Messages request body."""
    system = "\n\n".join(m["content"] for m in chat["messages"] if m["role"] == "system" and m["content"])
    body: dict[str, Any] = {
        "model": chat["model"],
        "max_tokens": max_tokens_sent(chat.get("max_tokens"), chat.get("max_completion_tokens")),
        "messages": _messages(chat["messages"]),
        "stream": stream,
    }
    if system:
        body["system"] = system
    if chat.get("tools"):
        body["tools"] = [
            {"name": f["name"], "description": f.get("description", ""), "input_schema": f.get("parameters") or {}}
            for f in (tool["function"] for tool in chat["tools"])
        ]
    skip = {"model", "messages", "tools", "max_tokens", "max_completion_tokens", *NOT_SENT}
    body.update({k: v for k, v in chat.items() if k not in skip and k not in body})
    return body


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": message["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)  # all results of one turn go back in one user turn
            else:
                out.append({"role": "user", "content": [block]})
        elif role == "assistant":
            blocks: list[dict[str, Any]] = list(message.get(REASONING_ITEMS) or [])
            content = message.get("content")
            if isinstance(content, str) and content:
                blocks.append({"type": "text", "text": content})
            for call in message.get("tool_calls") or []:
                fn = call["function"]
                try:
                    arguments = json.loads(fn["arguments"] or "{}")
                except ValueError:
                    arguments = {}  # a malformed call: the teacher saw the error observation
                blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": arguments})
            out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": ""}]})
        else:
            out.append({"role": "user", "content": message["content"]})
    return out


def handle_event(payload: bytes, reply: RawReply, started: float, scrub: Callable[[str], str]) -> bool:
    """One Messages stream event; True at ``message_stop``."""
    event = loads(payload)
    kind = event.get("type")
    if kind == "content_block_delta":
        delta = event.get("delta") or {}
        dtype = delta.get("type")
        if dtype == "text_delta":
            reply.mark_first_token(started)
            reply.content.append(delta.get("text") or "")
        elif dtype == "thinking_delta":
            reply.mark_first_token(started)
            reply.reasoning.append(delta.get("thinking") or "")
            reply.items[-1]["thinking"] += delta.get("thinking") or ""
        elif dtype == "signature_delta":
            reply.items[-1]["signature"] = reply.items[-1].get("signature", "") + (delta.get("signature") or "")
        elif dtype == "input_json_delta":
            reply.add_tool_delta({"index": event.get("index"), "function": {"arguments": delta.get("partial_json")}})
    elif kind == "content_block_start":
        block = event.get("content_block") or {}
        btype = block.get("type")
        if btype == "thinking":
            reply.items.append({"type": "thinking", "thinking": block.get("thinking") or ""})
            reply.reasoning_format = "reasoning"
        elif btype == "redacted_thinking":
            reply.items.append(dict(block))  # opaque: echoed as it came
        elif btype == "tool_use":
            reply.mark_first_token(started)
            call = {"index": event.get("index"), "id": block.get("id"), "function": {"name": block.get("name")}}
            reply.add_tool_delta(call)
        elif btype == "text" and block.get("text"):
            reply.content.append(block["text"])
    elif kind == "message_start":
        usage = (event.get("message") or {}).get("usage") or {}
        reply.set_usage({"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")})
    elif kind == "message_delta":
        stop = (event.get("delta") or {}).get("stop_reason")
        if stop:
            reply.finish_reason = STOP_REASONS.get(stop, stop)
        output = (event.get("usage") or {}).get("output_tokens")
        if output is not None:
            reply.set_usage({"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": output})
    elif kind == "message_stop":
        return True
    elif kind == "error":
        _raise_error(event, scrub)
    return False


def handle_message(message: Any, reply: RawReply, scrub: Callable[[str], str]) -> None:
    """A whole (non-streamed) message, folded in as its stream would have been."""
    if isinstance(message, dict) and message.get("type") == "error":
        _raise_error(message, scrub)
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise ValueError(f"not a Messages API message: {scrub(str(message))}")
    for index, block in enumerate(message["content"]):
        btype = block.get("type")
        if btype == "thinking":
            reply.reasoning.append(block.get("thinking") or "")
            reply.reasoning_format = "reasoning"
            reply.items.append(dict(block))  # signature included: echoed unmodified
        elif btype == "redacted_thinking":
            reply.items.append(dict(block))
        elif btype == "text":
            reply.content.append(block.get("text") or "")
        elif btype == "tool_use":
            fn = {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}
            reply.add_tool_delta({"index": index, "id": block.get("id"), "function": fn})
    stop = message.get("stop_reason")
    reply.finish_reason = STOP_REASONS.get(stop, stop) if stop else None
    usage = message.get("usage") or {}
    reply.set_usage({"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")})


def _raise_error(event: dict[str, Any], scrub: Callable[[str], str]) -> None:
    error = event.get("error") or {}
    detail = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    raise RetryableTeacherError(f"server error mid-stream: {scrub(detail)}")
