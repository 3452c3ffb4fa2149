"""Recorded messages -> the ``messages`` array sent to an OpenAI-compatible server.

The trajectory keeps one canonical shape; this module decides how each turn is replayed to the
server: native tool calls as ``tool_calls`` + ``role: tool`` messages, text-protocol calls as the
teacher's verbatim text + ``<tool_response>`` user turns, reasoning echoed per ``reasoning_echo`` (in
the field ``reasoning_field`` names, or the one the server sent), and whatever opaque continuation
state the provider attached (``echo`` on the message and on each call) sent back verbatim. Few-shot
example turns go right after the system turn, verbatim. And the other direction's one hot spot:
:func:`loads`, for every streamed event of every API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from tracegen.records import AssistantMessage, ExampleTurn, Message, SystemMessage, ToolMessage, UserMessage

ReasoningEcho = Literal["auto", "always", "never"]

REASONING_ITEMS = "reasoning_items"
"""The key, on a recorded turn's ``echo``, of the API's own reasoning records to send back verbatim:
Responses API reasoning items (``encrypted_content``), Anthropic thinking blocks (``signature``)."""
ReasoningField = Literal["auto", "reasoning_content", "reasoning"]


def to_wire(
    messages: list[Message],
    echo: ReasoningEcho,
    field: ReasoningField = "auto",
    few_shot: Sequence[ExampleTurn] = (),
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    native_ids: set[str] = set()
    examples = [{"role": turn.role, "content": turn.content} for turn in few_shot]
    for message in messages:
        if isinstance(message, SystemMessage):
            if message.content:  # system_prompt "": no system turn (a student trained without one expects none)
                out.append({"role": message.role, "content": message.content})
            out += examples
            examples = []
        elif isinstance(message, UserMessage):
            out.append({"role": message.role, "content": message.content})
        elif isinstance(message, AssistantMessage):
            out.append(_assistant(message, echo, field))
            if message.tool_protocol == "native":
                native_ids.update(call.id for call in message.tool_calls)
        elif isinstance(message, ToolMessage):
            if message.tool_call_id in native_ids:
                out.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content})
            else:
                # Text protocols: the results of one turn go back together as one user turn, since
                # servers without function calling may reject role=tool or two user turns in a row.
                block = f"<tool_response>\n{message.content}\n</tool_response>"
                if out and out[-1]["role"] == "user" and out[-1].get("_tool_responses"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool_responses": True})
    for item in out:
        item.pop("_tool_responses", None)
    return out


def _assistant(message: AssistantMessage, echo: ReasoningEcho, field: ReasoningField) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_protocol == "native" and message.tool_calls:
        # A call's opaque state (Gemini's thought signature) goes back with it, or the next turn is a 400.
        wire["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}, **(c.echo or {})}
            for c in message.tool_calls
        ]
    if message.reasoning and _should_echo(message, echo):
        if message.reasoning_format == "inline":
            wire["content"] = f"<think>\n{message.reasoning}\n</think>\n\n{message.content}"
        elif message.reasoning_format == "content_parts":
            thinking = {"type": "thinking", "thinking": [{"type": "text", "text": message.reasoning}]}
            wire["content"] = [thinking, {"type": "text", "text": message.content}]
        else:
            wire[message.reasoning_format or "reasoning_content" if field == "auto" else field] = message.reasoning
    if message.echo and echo != "never":
        wire.update(message.echo)  # e.g. OpenRouter's reasoning_details, with their signatures, verbatim
    return wire


def _should_echo(message: AssistantMessage, echo: ReasoningEcho) -> bool:
    if echo == "never":
        return False
    if echo == "always":
        return True
    # auto: DeepSeek's thinking mode rejects a tool-call turn whose reasoning_content was dropped;
    # inline <think> is the chat template's business (Qwen3 drops earlier turns' thinking itself).
    return bool(message.tool_calls) and message.reasoning_format != "inline"


_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(payload: bytes) -> Any:
    """``json.loads(payload)`` for one streamed event, at about half its cost: the C scanner called directly
    (``json.loads`` adds encoding detection and two whitespace passes per call, which at ~20 events a turn
    are a tenth of the client's CPU). Anything but one bare JSON value in UTF-8 falls back to ``json.loads``,
    so what is accepted and every error are exactly its."""
    try:
        text = payload.decode("utf-8", "surrogatepass")  # as json.loads decodes UTF-8
        value, end = _scan(text, 0)
    except (UnicodeDecodeError, StopIteration):
        return json.loads(payload)
    return value if end == len(text) else json.loads(payload)
