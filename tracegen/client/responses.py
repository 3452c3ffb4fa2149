"""The OpenAI Responses API (``teacher.api: responses``): request body out, streamed events in.

The chat client keeps its retry, rate-limit, pool and SSE layers; this module only translates. The
request is built from the same chat-shaped ``messages`` every other API gets (:mod:`tracegen.client.wire`):
system and user turns become input messages, an assistant turn becomes its reasoning items (echoed
verbatim, ``encrypted_content`` included, so multi-turn tool use keeps its reasoning), its text and
its ``function_call`` items, and a tool turn becomes a ``function_call_output``. Events
(https://platform.openai.com/docs/api-reference/responses-streaming) fold into the same ``RawReply``
as chat deltas, so the record is the same ``AssistantMessage`` whichever API produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tracegen.client.wire import REASONING_ITEMS, loads
from tracegen.errors import RetryableTeacherError, TeacherError

if TYPE_CHECKING:
    from tracegen.client.chat import RawReply

_SAMPLING = ("temperature", "top_p", "seed")


def responses_body(chat: dict[str, Any], reasoning_effort: str | None, stream: bool = True) -> dict[str, Any]:
    """A chat-completions request body -> the Responses request body (nothing stored)."""
    body: dict[str, Any] = {
        "model": chat["model"],
        "input": _input_items(chat["messages"]),
        "stream": stream,
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"summary": "auto", **({"effort": reasoning_effort} if reasoning_effort else {})},
    }
    limit = chat.get("max_completion_tokens", chat.get("max_tokens"))
    if limit is not None:
        body["max_output_tokens"] = limit
    body.update({key: chat[key] for key in _SAMPLING if key in chat})
    if chat.get("tools"):
        body["tools"] = [{"type": "function", **tool["function"]} for tool in chat["tools"]]
    if chat.get("top_logprobs") is not None:
        body["top_logprobs"] = chat["top_logprobs"]
    skip = {"model", "messages", "tools", "max_tokens", "max_completion_tokens", "reasoning_effort", "logprobs"}
    body.update({k: v for k, v in chat.items() if k not in skip and k not in body and k not in _SAMPLING})
    return body


def _input_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            items.append(
                {"type": "function_call_output", "call_id": message["tool_call_id"], "output": message["content"]}
            )
        elif role == "assistant":
            items += message.get(REASONING_ITEMS) or []
            content = message.get("content")
            if isinstance(content, str) and content:
                items.append({"role": "assistant", "content": content})
            for call in message.get("tool_calls") or []:
                fn = call["function"]
                items.append(
                    {"type": "function_call", "call_id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}
                )
        else:
            items.append({"role": role, "content": message["content"]})
    return items


def handle_event(payload: bytes, reply: RawReply, started: float, scrub: Callable[[str], str]) -> bool:
    """One Responses stream event; True when the response is over (``response.completed`` and kin)."""
    event = loads(payload)
    kind = event.get("type")
    if kind == "response.output_text.delta":
        reply.mark_first_token(started)
        reply.content.append(event.get("delta") or "")
    elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
        reply.mark_first_token(started)
        reply.reasoning.append(event.get("delta") or "")
        reply.reasoning_format = "reasoning"
    elif kind == "response.reasoning_summary_part.added" and reply.reasoning:
        reply.reasoning.append("\n\n")  # summary parts are paragraphs
    elif kind == "response.output_item.added" and (event.get("item") or {}).get("type") == "function_call":
        item = event["item"]
        reply.mark_first_token(started)
        reply.add_tool_delta({"index": item.get("id"), "id": item.get("call_id"), "function": {"name": item["name"]}})
    elif kind == "response.function_call_arguments.delta":
        reply.add_tool_delta({"index": event.get("item_id"), "function": {"arguments": event.get("delta") or ""}})
    elif kind == "response.output_item.done" and (event.get("item") or {}).get("type") == "reasoning":
        reply.items.append(event["item"])  # whole, encrypted_content included: echoed verbatim
    elif kind in ("response.completed", "response.incomplete"):
        _finish(event.get("response") or {}, reply, incomplete=kind == "response.incomplete")
        return True
    elif kind in ("error", "response.failed"):
        _raise_error(event.get("error") or (event.get("response") or {}).get("error") or event, scrub)
    elif kind == "response.refusal.delta":
        reply.refusal.append(event.get("delta") or "")
    elif kind is None:
        raise TeacherError("a Responses stream event without a type", hint="check that base_url serves /responses")
    return False


def handle_response(response: Any, reply: RawReply, scrub: Callable[[str], str]) -> None:
    """A whole (non-streamed) response object, folded in as its stream would have been."""
    if not isinstance(response, dict) or "output" not in response:
        raise ValueError(f"not a Responses API response object: {scrub(str(response))}")
    if response.get("status") == "failed":
        _raise_error(response.get("error") or response, scrub)
    for item in response["output"] or []:
        kind = item.get("type")
        if kind == "reasoning":
            summary = [part.get("text") or "" for part in item.get("summary") or []]
            text = [
                part.get("text") or "" for part in item.get("content") or [] if part.get("type") == "reasoning_text"
            ]
            if summary or text:
                if reply.reasoning:
                    reply.reasoning.append("\n\n")
                reply.reasoning.append("\n\n".join(summary) if summary else "".join(text))
                reply.reasoning_format = "reasoning"
            reply.items.append(item)  # whole, encrypted_content included: echoed verbatim
        elif kind == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    reply.content.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    reply.refusal.append(part.get("refusal") or "")
        elif kind == "function_call":
            fn = {"name": item.get("name"), "arguments": item.get("arguments") or ""}
            reply.add_tool_delta({"index": item.get("id"), "id": item.get("call_id"), "function": fn})
    _finish(response, reply, incomplete=response.get("status") == "incomplete")


def _finish(response: dict[str, Any], reply: RawReply, incomplete: bool) -> None:
    """The finish reason and usage of a completed (or cut-off) response."""
    if incomplete:
        reason = (response.get("incomplete_details") or {}).get("reason")
        reply.finish_reason = "length" if reason == "max_output_tokens" else (reason or "incomplete")
    else:
        reply.finish_reason = "tool_calls" if reply.tools else "stop"
    usage = response.get("usage") or {}
    details = usage.get("output_tokens_details") or {}
    reply.set_usage(
        {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "completion_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens")},
        }
    )


def _raise_error(error: Any, scrub: Callable[[str], str]) -> None:
    detail = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    raise RetryableTeacherError(f"server error mid-stream: {scrub(detail)}")
